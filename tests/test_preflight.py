"""Preflight: what would fail late fails before any stage runs, as one clear message, and the plan says what the
run builds, reuses and writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import clips4.tasks.common as common
import clips4.tasks.preflight as pf
from clips4.storage import Store, human_bytes
from clips4.tasks.preflight import PreflightError, preflight
from conftest import tiny_cli, tiny_config

ALL = ["data", "teacher", "features", "cluster", "train", "evaluate"]


def _cfg(*extra: str):
    return tiny_config(*extra)


def test_a_fresh_store_plans_every_stage_with_an_estimate(tmp_path) -> None:
    plan = preflight(_cfg(), ALL, None, Store(tmp_path / "store"))
    assert plan.build == ALL and plan.reuse == []
    assert plan.estimate > 0 and plan.free is not None
    assert plan.lines()[0] == f"plan: build {', '.join(ALL)}; reuse nothing"
    assert plan.lines()[1].startswith("estimated new storage: ")


def test_the_estimate_grows_with_the_images_and_the_feature_size(tmp_path) -> None:
    store = Store(tmp_path / "store")
    small = preflight(_cfg(), ["data", "features"], None, store).estimate
    more = preflight(_cfg("data.synthetic.num_train=240"), ["data", "features"], None, store).estimate
    wide = preflight(_cfg("features.dtype=float32"), ["data", "features"], None, store).estimate
    assert more > 5 * small and wide > small


@pytest.mark.parametrize(
    ("stages", "force", "message"),
    [
        (["train", "nope"], None, "unknown stage(s) 'nope'; stages are data, teacher"),
        (["train"], "everything", "force must be one of data, teacher"),
    ],
)
def test_bad_stages_and_force_name_the_choices(tmp_path, stages, force, message) -> None:
    with pytest.raises(PreflightError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preflight(_cfg(), stages, force, Store(tmp_path))


def test_a_missing_teacher_file_fails_before_the_data_stage(tmp_path) -> None:
    cfg = _cfg("teacher.train=none", "teacher.model=ViT-B-16", f"teacher.pretrained={tmp_path / 'missing.pt'}")
    with pytest.raises(PreflightError, match="missing.pt"):
        preflight(cfg, ALL, None, Store(tmp_path / "store"))
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_a_dataset_root_without_images_is_named(tmp_path) -> None:
    folder = ["data.dataset=imagefolder", f"data.root={tmp_path / 'photos'}", "data.splits=[val]"]
    with pytest.raises(PreflightError, match="photos does not exist"):
        preflight(_cfg(*folder, "data.held_out=[]"), ["data"], None, Store(tmp_path / "store"))
    (tmp_path / "photos").mkdir()
    with pytest.raises(PreflightError, match="unknown class name 'star' in data.held_out"):
        preflight(_cfg(*folder), ["data"], None, Store(tmp_path / "store"))
    with pytest.raises(PreflightError, match="photos"):
        preflight(_cfg(*folder, "data.held_out=[]"), ["data"], None, Store(tmp_path / "store"))


def test_an_unwritable_store_is_named(tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PreflightError, match="is not writable"):
        preflight(_cfg(), ["data"], None, Store(blocker / "store"))


def test_the_features_estimate_counts_keys_of_the_splits_that_keep_them() -> None:
    cfg = _cfg()
    cells, dim, key_dim = pf._feature_grid(cfg)
    (features,) = pf.estimate_bytes(cfg, ["features"], {"train": 100, "val": 10})
    assert features.size == 110 * cells * cells * dim * 2 + 10 * cells * cells * key_dim * 2  # no train keys
    assert "110 images" in features.how and "keys of 10 images" in features.how
    (keyless,) = pf.estimate_bytes(_cfg("features.keep_keys=false"), ["features"], {"train": 100, "val": 10})
    assert keyless.size == 110 * cells * cells * dim * 2


def test_evaluating_the_train_split_says_it_scores_no_key_smoothing_row(tmp_path) -> None:
    stages = ["data", "teacher", "features", "evaluate"]
    on_train = preflight(_cfg("evaluate.split=train"), stages, None, Store(tmp_path)).notes
    assert any("keeps no keys of the train split" in note for note in on_train)
    assert not any("maskclip+kspd" in note for note in preflight(_cfg(), stages, None, Store(tmp_path)).notes)


def test_a_full_disk_is_refused_naming_the_stage_its_estimate_and_the_free_space(tmp_path, monkeypatch) -> None:
    plan = preflight(_cfg(), ["data", "teacher", "features"], None, Store(tmp_path))
    assert [e.stage for e in plan.estimates] == ["data", "teacher", "features"]
    assert any(line.startswith("  features writes about ") for line in plan.lines())
    earlier = sum(e.size for e in plan.estimates[:2])
    free = int(earlier * pf.HEADROOM) + 1  # room for the data and the teacher, not for the features after them
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda path: SimpleNamespace(total=10 * free, used=9 * free, free=free))
    with pytest.raises(PreflightError) as refused:
        preflight(_cfg(), ["data", "teacher", "features"], None, Store(tmp_path))
    message = str(refused.value)
    assert message.startswith(f"stage features writes about {human_bytes(plan.estimates[2].size)} (")
    assert f"more than the {human_bytes(free)} free in the store {tmp_path}" in message
    assert "clips4 store gc" in message and "--store PATH" in message and "\n" not in message


def test_missing_faiss_is_named_with_the_install_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(PreflightError, match=r"faiss is not installed: pip install 'clips4\[cpu\]'"):
        preflight(_cfg(), ["cluster"], None, Store(tmp_path))
    preflight(_cfg(), ["data"], None, Store(tmp_path))  # stages that need no faiss still run


def test_a_real_data_run_warns_that_a_resnet_student_without_weights_starts_random(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(common, "HASH_CACHE", tmp_path / "file-sha256.json")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(photos / f"{i}.png")
    real = ["data.dataset=imagefolder", f"data.root={photos}", "data.splits=[val]", "data.held_out=[]"]
    weights = tmp_path / "resnet50.pth"
    weights.write_bytes(b"weights")  # only hashed into the train key here

    def warned(*extra: str) -> list[str]:
        plan = preflight(_cfg(*extra), ["train"], None, Store(tmp_path / "store"))
        return [line for line in plan.lines() if "random weights" in line]

    for student, file in (("resnet50", "resnet50-11ad3fa6.pth"), ("resnet101", "resnet101-cd907fc2.pth")):
        (line,) = warned(*real, f"train.student={student}")
        assert line.startswith(f"warning: the {student} student starts from random weights")
        assert file in line and "set train.backbone_weights to that file" in line
    assert warned(*real, "train.student=resnet50", f"train.backbone_weights={weights}") == []
    assert warned(*real) == []  # the small CNN
    assert warned("train.student=resnet50") == []  # the synthetic world


@pytest.mark.slow
def test_evaluate_without_a_student_says_so_and_the_cli_errors_are_one_line(tmp_path, child_env) -> None:
    store = tmp_path / "store"
    cli = [sys.executable, "-m", "clips4.flows.cli", "run", "--store", str(store)]
    tiny = tiny_cli()
    built = subprocess.run([*cli, *tiny, "--stages", "data,teacher,features"], env=child_env,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    plan = preflight(_cfg(), ["evaluate"], None, Store(store))
    assert plan.reuse == [] and any("scores MaskCLIP alone" in n for n in plan.notes)

    for extra, needle in [
        (["--force", "everything"], "force must be one of"),
        (["--set", f"teacher.pretrained={tmp_path / 'gone.safetensors'}", "--set", "teacher.train=none"], "gone.safetensors"),
    ]:
        run = subprocess.run([*cli, *tiny, *extra], env=child_env, capture_output=True, text=True, timeout=300)
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert run.returncode != 0
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], run.stderr[-2000:]
        assert not list(Path(store).glob(".staging/*")), "a refused run must not start any stage"
