"""The open_clip teacher: registration, every loading path, save/load round trip, resumable pre-training."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time

import huggingface_hub
import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from clips4.config import SyntheticConfig
from clips4.data.synthetic import SyntheticWorld
from clips4.teacher import (
    SINGLE_CLASS_TEMPLATES,
    TINY_MODELS,
    TeacherLoadError,
    check_teacher_source,
    _CaptionSampler,
    create_teacher,
    load_saved_teacher,
    pretrain_synthetic,
    register_model_configs,
    retrieval_top1,
    save_teacher,
)

CPU = torch.device("cpu")
MICRO = "clips4-test-micro"  # a much smaller architecture than the shipped ones, so training tests take seconds
MICRO_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is as fast as two, and far faster on a machine busy with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model_configs") / f"{MICRO}.json"
    path.write_text(json.dumps(MICRO_CFG))
    open_clip.add_model_config(path)
    return str(path)


@pytest.fixture(scope="module")
def world_data():
    world = SyntheticWorld(SyntheticConfig(seed=0, image_size=32))
    samples = [world.sample("train", i) for i in range(8)]
    return np.stack([s.image for s in samples]), [s.caption for s in samples]


def _outputs(teacher, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, teacher.image_size, teacher.image_size, generator=g)
    tokens = teacher.tokenizer(["a photo of a kite on grass.", "sand."])
    with torch.no_grad():
        return teacher.model.encode_image(x), teacher.model.encode_text(tokens)


def _assert_same_outputs(a, b) -> None:
    for x, y in zip(_outputs(a), _outputs(b), strict=True):
        assert torch.equal(x, y)


def test_register_is_idempotent(monkeypatch):
    register_model_configs()
    assert set(TINY_MODELS) <= set(open_clip.list_models())
    calls = []
    monkeypatch.setattr(open_clip, "add_model_config", lambda path: calls.append(path))
    register_model_configs()
    assert calls == []


@pytest.mark.parametrize("name", TINY_MODELS)
def test_create_tiny_teacher_is_frozen_and_described(name):
    t = create_teacher(name, None, CPU)
    assert t.model_name == name and t.image_size == 64 and t.embed_dim == 128
    assert len(t.mean) == 3 and len(t.std) == 3
    assert not t.model.training
    assert not any(p.requires_grad for p in t.model.parameters())
    image, text = _outputs(t)
    assert image.shape == (2, 128) and text.shape == (2, 128)
    assert t.tokenizer(["a b"]).shape == (1, 32)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_saved_teacher_loads_back(name, tmp_path):
    t = create_teacher(name, None, CPU)
    out = save_teacher(t, name, tmp_path / "saved")
    assert {p.name for p in out.iterdir()} >= {"open_clip_config.json", "open_clip_model.safetensors"}
    _assert_same_outputs(t, load_saved_teacher(out, CPU))


def test_saved_teacher_is_an_ordinary_open_clip_checkpoint(micro, tmp_path):
    t = create_teacher(MICRO, None, CPU)
    out = save_teacher(t, MICRO, tmp_path / "saved")
    _assert_same_outputs(t, create_teacher(MICRO, str(out / "open_clip_model.safetensors"), CPU))
    _assert_same_outputs(t, create_teacher(f"local-dir:{out}", None, CPU))


def test_local_torch_checkpoint(micro, tmp_path):
    t = create_teacher(MICRO, None, CPU)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": t.model.state_dict()}, path)
    _assert_same_outputs(t, create_teacher(MICRO, str(path), CPU))


def test_saved_teacher_of_an_unregistered_architecture(tmp_path):
    """A saved teacher carries its own architecture: it loads in a process that never heard of that name."""
    cfg = {**MICRO_CFG, "embed_dim": 24}
    model = open_clip.CLIP(**cfg)
    out = tmp_path / "saved"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_name": "clips4-test-unregistered", "model_cfg": cfg, "preprocess_cfg": {}})
    )
    (out / "clips4-test-unregistered.json").write_text(json.dumps(cfg))
    assert "clips4-test-unregistered" not in open_clip.list_models()
    t = load_saved_teacher(out, CPU)
    assert t.embed_dim == 24
    model.eval().requires_grad_(False)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(t.model.encode_image(x), model.encode_image(x))


def test_hf_hub_teacher_from_offline_cache(micro, tmp_path, monkeypatch):
    source = create_teacher(MICRO, None, CPU)
    save_teacher(source, MICRO, tmp_path / "export")
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--clips4-test--micro"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copyfile(tmp_path / "export" / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    # huggingface_hub reads both variables at import time, which has happened already
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = create_teacher("hf-hub:clips4-test/micro", None, CPU)
    assert loaded.model_name == "hf-hub:clips4-test/micro" and loaded.embed_dim == 32
    _assert_same_outputs(source, loaded)
    with pytest.raises(TeacherLoadError, match="Hugging Face cache"):
        create_teacher("hf-hub:clips4-test/absent", None, CPU)


def test_unfetchable_pretrained_tag_says_how_to_use_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(TeacherLoadError, match="could not be fetched.*local checkpoint file"):
        create_teacher("RN50", "openai", CPU)


def test_bad_names_and_missing_files_are_named(tmp_path):
    missing = tmp_path / "nowhere" / "teacher.safetensors"
    with pytest.raises(TeacherLoadError, match=f"{missing} does not exist"):
        create_teacher("clips4-vit-tiny", str(missing), CPU)
    garbage = tmp_path / "teacher.pt"
    garbage.write_text("not weights")
    with pytest.raises(TeacherLoadError, match="not a readable checkpoint"):
        check_teacher_source("clips4-vit-tiny", str(garbage))
    truncated = tmp_path / "teacher.safetensors"
    truncated.write_bytes(b"\x10\x00\x00")
    with pytest.raises(TeacherLoadError, match="not a readable checkpoint"):
        check_teacher_source("clips4-vit-tiny", str(truncated))
    with pytest.raises(TeacherLoadError, match="unknown open_clip model 'ViT-Nope'"):
        create_teacher("ViT-Nope", None, CPU)
    with pytest.raises(TeacherLoadError, match="neither a file nor a pretrained tag"):
        create_teacher("RN50", "no-such-tag", CPU)
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_saved_teacher(tmp_path, CPU)


def test_wrong_checkpoint_for_architecture(micro, tmp_path):
    t = create_teacher(MICRO, None, CPU)
    path = save_teacher(t, MICRO, tmp_path) / "open_clip_model.safetensors"
    with pytest.raises(TeacherLoadError, match="could not be loaded into clips4-vit-tiny"):
        create_teacher("clips4-vit-tiny", str(path), CPU)


def test_retrieval_top1_counts_duplicate_captions():
    t = create_teacher("clips4-vit-tiny", None, CPU)
    images = np.zeros((4, 64, 64, 3), dtype=np.uint8)  # identical images: every image retrieves the same caption
    result = retrieval_top1(t, images, ["x", "x", "x", "x"])
    assert result == {"top1": 1.0, "chance": 1.0}
    result = retrieval_top1(t, images, ["a", "b", "c", "a"])
    assert result["chance"] == pytest.approx((2 + 1 + 1 + 2) / 16)
    assert result["top1"] in (0.5, 0.25)  # all four retrieve the same caption: either an "a" or a unique one


def test_single_class_captions_only_name_what_the_caption_names():
    tokenizer = open_clip.get_tokenizer("clips4-vit-tiny")
    captions = ["a photo of a kite on grass.", "sand with a ring and a kite.", "snow."]
    names = ["grass", "sand", "snow", "kite", "ring", "star"]
    sampler = _CaptionSampler(captions, names, 1.0, tokenizer, CPU)
    allowed = [{"grass", "kite"}, {"sand", "ring", "kite"}, {"snow"}]
    prompts = {
        tuple(tokenizer([t.format(n)])[0].tolist()): n for n in names for t in SINGLE_CLASS_TEMPLATES
    }  # fmt: skip
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        for row, i in zip(sampler(torch.arange(3), g), range(3), strict=True):
            name = prompts[tuple(row.tolist())]
            assert name in allowed[i]
            seen.add(name)
    assert seen == {"grass", "sand", "snow", "kite", "ring"}
    never = _CaptionSampler(captions, names, 0.0, tokenizer, CPU)
    assert torch.equal(never(torch.arange(3), g), tokenizer(captions))


def test_pretrain_resumes_from_checkpoint(micro, world_data, tmp_path, caplog):
    images, captions = world_data
    kwargs = dict(batch_size=4, lr=1e-3, weight_decay=0.1, seed=0, device=CPU, workdir=tmp_path)
    model, history = pretrain_synthetic(MICRO, images, captions, epochs=1, **kwargs)
    assert len(history) == 1 and np.isfinite(history[0])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    state["history"] = [123.0]  # a marker only the checkpoint carries
    torch.save(state, tmp_path / "last.pt")
    with caplog.at_level(logging.INFO, logger="clips4.teacher"):
        _, history = pretrain_synthetic(MICRO, images, captions, epochs=2, **kwargs)
    assert history[0] == 123.0 and len(history) == 2
    assert "resuming teacher pre-training" in caplog.text and "at epoch 1 of 2" in caplog.text
    with pytest.raises(ValueError, match="another pre-training run"):
        pretrain_synthetic(MICRO, images, captions, epochs=3, **{**kwargs, "lr": 5e-4})


def test_pretrain_learns_the_pairs(micro, world_data, tmp_path):
    images, captions = world_data
    model, history = pretrain_synthetic(
        MICRO, images, captions, epochs=25, batch_size=8, lr=2e-3, weight_decay=0.0, seed=0, device=CPU,
        workdir=tmp_path, checkpoint_every=25,
    )  # fmt: skip
    assert history[-1] < 0.5 * history[0]
    t = load_saved_teacher(save_teacher(model, MICRO, tmp_path / "saved"), CPU)
    result = retrieval_top1(t, images, captions)
    assert result["top1"] > 2 * result["chance"]


_KILLABLE = """
import sys, numpy as np, open_clip, torch
from pathlib import Path
from clips4.teacher import pretrain_synthetic
open_clip.add_model_config(sys.argv[1])
data = np.load(sys.argv[2])
pretrain_synthetic({micro!r}, data["images"], list(data["captions"]), epochs={epochs}, batch_size=4, lr=1e-3,
                   weight_decay=0.1, seed=0, device=torch.device("cpu"), workdir=Path(sys.argv[3]))
"""


@pytest.mark.slow
def test_pretrain_survives_sigkill(micro, world_data, tmp_path, caplog, child_env):
    """Kill a pre-training process after its first checkpoint; the rerun resumes and ends where an uninterrupted
    run ends."""
    images, captions = world_data
    epochs = 24
    np.savez(tmp_path / "data.npz", images=images, captions=np.array(captions))
    workdir = tmp_path / "killed"
    script = _KILLABLE.format(micro=MICRO, epochs=epochs)
    proc = subprocess.Popen([sys.executable, "-c", script, micro, str(tmp_path / "data.npz"), str(workdir)],
                            env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (workdir / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    done = torch.load(workdir / "last.pt", weights_only=True)["epoch"]
    assert 1 <= done < epochs
    kwargs = dict(epochs=epochs, batch_size=4, lr=1e-3, weight_decay=0.1, seed=0, device=CPU)
    with caplog.at_level(logging.INFO, logger="clips4.teacher"):
        resumed, resumed_history = pretrain_synthetic(MICRO, images, captions, workdir=workdir, **kwargs)
    assert f"at epoch {done} of {epochs}" in caplog.text
    straight, straight_history = pretrain_synthetic(MICRO, images, captions, workdir=tmp_path / "straight", **kwargs)
    assert np.allclose(resumed_history, straight_history, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
