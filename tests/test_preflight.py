"""Preflight: what would fail late fails before any stage runs, as one clear message, and the plan says what the
run builds, reuses and writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import clips4.tasks.preflight as pf
from clips4.config import resolve_config
from clips4.storage import Store
from clips4.tasks.preflight import PreflightError, preflight
from conftest import TINY

ALL = ["data", "teacher", "features", "cluster", "train", "evaluate"]


def _cfg(*extra: str):
    return resolve_config("demo", overrides=[*TINY, *extra])


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


def test_a_full_disk_is_refused_with_the_estimate(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(pf, "_free_bytes", lambda root: 1000)
    with pytest.raises(PreflightError, match=r"has 1000 B free but this run writes about"):
        preflight(_cfg(), ALL, None, Store(tmp_path))


def test_missing_faiss_is_named_with_the_install_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(PreflightError, match=r"faiss is not installed: pip install 'clips4\[cpu\]'"):
        preflight(_cfg(), ["cluster"], None, Store(tmp_path))
    preflight(_cfg(), ["data"], None, Store(tmp_path))  # stages that need no faiss still run


@pytest.mark.slow
def test_evaluate_without_a_student_says_so_and_the_cli_errors_are_one_line(tmp_path, child_env) -> None:
    store = tmp_path / "store"
    cli = [sys.executable, "-m", "clips4.flows.cli", "run", "--preset", "demo", "--store", str(store)]
    tiny = [arg for o in TINY for arg in ("--set", o)]
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
