import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from clips4 import training
from clips4.config import TrainConfig
from clips4.training import (
    STATE_FILE,
    TrainData,
    batch_indices,
    train_student,
)
from clips4.student import load_student

MEAN_STD = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
CPU = torch.device("cpu")
N, SIZE, DIM, KNOWN, UNKNOWN = 8, 32, 16, 3, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine waiting for them dominates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def tiny_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """8 random 32px images, 8x8 CLIP maps of dim 16, 4x4 block superpixels, 3 known texts, 2 prototypes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return {
        "images": rng.integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8),
        "clip_maps": unit(rng.standard_normal((N, 8, 8, DIM))).astype(np.float16),
        "regions": np.broadcast_to(((yy // 8) * 4 + xx // 8).astype(np.int32), (N, SIZE, SIZE)).copy(),
        "known_text": unit(rng.standard_normal((KNOWN, DIM))),
        "prototypes": unit(rng.standard_normal((UNKNOWN, DIM))),
    }


def tiny_cfg(**overrides) -> TrainConfig:
    base = dict(width=8, input_size=16, steps=3, batch_size=4, grid_seeds=2, kmeans_iters=3, refresh_every=2,
                checkpoint_every=2, device="cpu", seed=0)
    return TrainConfig(**{**base, **overrides})


def run(workdir: Path, log=None, **overrides) -> training.TrainResult:
    return train_student(TrainData(**tiny_arrays()), tiny_cfg(**overrides), MEAN_STD, workdir, CPU, log=log)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


class CountingArray:
    """A lazy array-like that records which images were read."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.reads = array, array.shape, []

    def __getitem__(self, index: int) -> np.ndarray:
        self.reads.append(index)
        return self.array[index]


def test_tiny_training_runs_and_writes_its_files(tmp_path):
    arrays = tiny_arrays()
    arrays["clip_maps"] = lazy = CountingArray(arrays["clip_maps"])
    result = train_student(TrainData(**arrays), tiny_cfg(steps=3), MEAN_STD, tmp_path, CPU)
    assert len(lazy.reads) == 3 * 4  # batch by batch, never the whole array
    assert result.steps_done == 3 and result.resumed_from == 0
    assert set(result.losses["component"]) == {"contrast", "emb", "sem", "total"}
    assert sorted(result.losses["step"].unique()) == [0, 1, 2]
    assert np.isfinite(result.losses["value"]).all()
    assert result.prototypes.shape == (UNKNOWN, DIM)
    for name in ("student.safetensors", "train_state.pt", "losses.csv"):
        assert (tmp_path / name).is_file()
    assert not list(tmp_path.glob("*.tmp"))
    total = result.losses.pivot(index="step", columns="component", values="value")
    np.testing.assert_allclose(total["total"], total["contrast"] + total["emb"] + total["sem"], rtol=1e-5)


@pytest.mark.parametrize("component", ["contrast", "emb", "sem"])
def test_zero_weight_removes_its_component(tmp_path, component, monkeypatch):
    skipped = {"contrast": "pixel_segment_contrastive", "emb": "embedding_consistency",
               "sem": "semantic_consistency"}[component]
    monkeypatch.setattr(training, skipped, lambda *a, **k: pytest.fail(f"{skipped} computed with weight 0"))
    result = run(tmp_path, steps=2, **{f"lambda_{component}": 0.0})
    assert set(result.losses["component"]) == {"contrast", "emb", "sem", "total"} - {component}
    assert np.isfinite(result.losses["value"]).all()


def test_all_weights_zero_is_refused(tmp_path):
    with pytest.raises(ValueError, match="nothing to train"):
        run(tmp_path, lambda_contrast=0.0, lambda_emb=0.0, lambda_sem=0.0)


def test_targets_are_the_given_known_texts_then_the_prototypes(tmp_path, monkeypatch):
    seen = []
    real = training.semantic_consistency

    def spy(seg_emb, clip_seg, targets, tau, **labels):
        seen.append(targets.detach().clone())
        return real(seg_emb, clip_seg, targets, tau, **labels)

    monkeypatch.setattr(training, "semantic_consistency", spy)
    arrays = tiny_arrays()
    result = run(tmp_path, steps=3, refresh_every=2)
    assert len(seen) == 3
    for targets in seen:
        assert targets.shape == (KNOWN + UNKNOWN, DIM)  # K known texts + M prototypes, nothing else
        torch.testing.assert_close(targets[:KNOWN], torch.from_numpy(arrays["known_text"]))
    torch.testing.assert_close(seen[0][KNOWN:], torch.from_numpy(arrays["prototypes"]))
    # the refresh after step 2 changed the prototypes used at step 3, never the known texts
    assert not torch.equal(seen[2][KNOWN:], seen[0][KNOWN:])
    torch.testing.assert_close(seen[2][KNOWN:], torch.from_numpy(result.prototypes))


def test_segment_labels_use_clip_embeddings_moved_across_the_gap(tmp_path, monkeypatch):
    """L_sem labels the CLIP segment embeddings after the modality-gap offset; the student side is left alone."""
    seen = {}
    real = training.semantic_consistency

    def spy(seg_emb, clip_seg, targets, tau, **labels):
        seen.setdefault("clip", []).append(clip_seg.detach().clone())
        return real(seg_emb, clip_seg, targets, tau, **labels)

    monkeypatch.setattr(training, "semantic_consistency", spy)
    arrays = tiny_arrays()
    train_student(TrainData(**arrays), tiny_cfg(steps=1), MEAN_STD, tmp_path / "plain", CPU)
    gap = np.zeros(DIM, np.float32)
    gap[0] = 3.0  # large enough that every moved segment embedding points almost along the first axis
    train_student(TrainData(**arrays, gap=gap), tiny_cfg(steps=1), MEAN_STD, tmp_path / "moved", CPU)
    plain, moved = seen["clip"]
    torch.testing.assert_close(moved.norm(dim=1), torch.ones(len(moved)))
    assert plain[:, 0].mean() < 0.9 < moved[:, 0].min()


def test_known_first_labels_reach_the_loss_and_are_counted(tmp_path, monkeypatch):
    """The train loop labels with the data's rule: at a tiny logit scale nothing is surely known, so every label is
    a prototype; with the plain nearest rule and a gap toward the first text, every label is that known class."""
    seen = []
    real = training.semantic_consistency

    def spy(seg_emb, clip_seg, targets, tau, labels=None):
        seen.append(labels)
        return real(seg_emb, clip_seg, targets, tau, labels=labels)

    monkeypatch.setattr(training, "semantic_consistency", spy)
    arrays = tiny_arrays()
    never_sure = training.LabelRule("known_first", known_scale=1e-3, known_confidence=0.5, fit_on="unexplained")
    result = train_student(TrainData(**arrays, label_rule=never_sure), tiny_cfg(steps=2), MEAN_STD, tmp_path / "a", CPU)
    assert all((labels >= KNOWN).all() for labels in seen) and result.known_label_share == 0.0
    seen.clear()
    gap = 3.0 * arrays["known_text"][0]  # every moved segment points almost at the first text
    result = train_student(TrainData(**arrays, gap=gap), tiny_cfg(steps=1), MEAN_STD, tmp_path / "b", CPU)
    assert all((labels == 0).all() for labels in seen) and result.known_label_share == 1.0
    assert run(tmp_path / "c", steps=1, lambda_sem=0.0).known_label_share is None


def test_named_clusters_label_by_anchor_and_refresh_around_fixed_anchors(tmp_path, monkeypatch):
    """With named clusters a segment takes its nearest anchor's class or its nearest prototype, and a refresh moves
    the prototypes while the anchors (not the known texts) stay fixed."""
    seen, held = [], []
    real_sem, real_kmeans = training.semantic_consistency, training.spherical_kmeans

    def spy_sem(seg_emb, clip_seg, targets, tau, labels=None):
        seen.append(labels)
        return real_sem(seg_emb, clip_seg, targets, tau, labels=labels)

    def spy_kmeans(*args, fixed=None, **kwargs):
        held.append(fixed)
        return real_kmeans(*args, fixed=fixed, **kwargs)

    monkeypatch.setattr(training, "semantic_consistency", spy_sem)
    monkeypatch.setattr(training, "spherical_kmeans", spy_kmeans)
    arrays = tiny_arrays()
    anchors = unit(np.random.default_rng(5).standard_normal((4, DIM)))
    rule = training.LabelRule("named_clusters").with_anchors(anchors, np.array([2, 2, 0, 1]))
    result = train_student(TrainData(**arrays, label_rule=rule), tiny_cfg(steps=3, refresh_every=2), MEAN_STD,
                           tmp_path, CPU)
    assert len(held) == 1
    np.testing.assert_allclose(held[0], anchors, atol=1e-6)
    assert not np.allclose(result.prototypes, arrays["prototypes"])
    assert all(((labels >= 0) & (labels < KNOWN + UNKNOWN)).all() for labels in seen)
    assert 0.0 < result.known_label_share < 1.0  # random segments go to anchors and to prototypes alike


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    first = run(tmp_path, steps=4, checkpoint_every=2)
    assert first.steps_done == 4
    messages = []
    second = run(tmp_path, log=messages.append, steps=6, checkpoint_every=2)
    assert second.resumed_from == 4 and second.steps_done == 6
    assert any("resuming training from step 4" in m for m in messages)
    assert sorted(second.losses["step"].unique()) == list(range(6))
    assert len(second.losses) == 6 * 4  # no step logged twice


def test_interrupted_run_ends_like_an_uninterrupted_one(tmp_path):
    whole = run(tmp_path / "whole", steps=6, checkpoint_every=2, refresh_every=3)

    def crash_after_step_4(message: str) -> None:
        if message.startswith("step 4:") and "checkpoint written" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "split", log=crash_after_step_4, steps=6, checkpoint_every=2, refresh_every=3)
    resumed = run(tmp_path / "split", steps=6, checkpoint_every=2, refresh_every=3)
    assert resumed.resumed_from == 4
    assert_same_weights(whole.model, resumed.model)
    np.testing.assert_array_equal(whole.prototypes, resumed.prototypes)
    np.testing.assert_allclose(whole.losses["value"], resumed.losses["value"], rtol=1e-6)


SCRIPT = """
import sys
from pathlib import Path
import numpy as np, torch
from clips4.config import TrainConfig
from clips4.training import TrainData, train_student
arrays = dict(np.load(sys.argv[1]))
cfg = TrainConfig.model_validate_json(sys.argv[2])
train_student(TrainData(**arrays), cfg, {mean_std!r}, Path(sys.argv[3]), torch.device("cpu"))
"""


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(tmp_path, child_env):
    arrays = tiny_arrays()
    np.savez(tmp_path / "data.npz", **arrays)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(mean_std=MEAN_STD))
    workdir = tmp_path / "work"
    cfg = tiny_cfg(steps=500, checkpoint_every=2)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "data.npz"), cfg.model_dump_json(),
                             str(workdir)], env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (workdir / STATE_FILE).is_file():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = torch.load(workdir / STATE_FILE, weights_only=True)["step"]
    result = train_student(TrainData(**arrays), cfg.model_copy(update={"steps": done + 2}), MEAN_STD, workdir, CPU)
    assert result.resumed_from == done > 0
    assert result.steps_done == done + 2
    assert sorted(result.losses["step"].unique()) == list(range(done + 2))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_path_with_one_process_matches_plain_training(tmp_path, monkeypatch):
    plain = run(tmp_path / "plain", steps=2)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    joined = []
    real_init = dist.init_process_group
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.append(backend) or
                        real_init(backend, **kw))
    ddp = run(tmp_path / "ddp", steps=2)
    assert joined == ["gloo"]
    assert not dist.is_initialized()  # the group it created is torn down again
    assert_same_weights(plain.model, ddp.model)
    np.testing.assert_allclose(plain.losses["value"], ddp.losses["value"], rtol=1e-6)


def test_batches_cover_every_image_once_per_epoch():
    first_epoch = np.concatenate([batch_indices(s, 3, 9, seed=1) for s in range(3)])
    assert sorted(first_epoch.tolist()) == list(range(9))
    np.testing.assert_array_equal(batch_indices(4, 3, 9, seed=1), batch_indices(4, 3, 9, seed=1))
    assert not np.array_equal(batch_indices(0, 9, 9, seed=1), batch_indices(0, 9, 9, seed=2))
    spanning = batch_indices(1, 6, 9, seed=0)  # positions 6..11: end of epoch 0, start of epoch 1
    assert len(spanning) == 6


def test_the_trained_student_embeds_images_and_reloads(tmp_path):
    result = run(tmp_path, steps=1)
    images = tiny_arrays()["images"][:5]
    emb = result.model.embed(images, batch_size=2)
    assert emb.shape == (5, DIM, SIZE // result.model.stride, SIZE // result.model.stride)  # full images, not views
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5, *emb.shape[2:]))
    reloaded = load_student(tmp_path / "student.safetensors", CPU)
    assert reloaded.preprocessing.mean == MEAN_STD[0] and reloaded.preprocessing.std == MEAN_STD[1]
    torch.testing.assert_close(reloaded.embed(images), emb)


def test_mismatched_inputs_are_refused():
    arrays = tiny_arrays()
    with pytest.raises(ValueError, match="regions must be"):
        TrainData(**{**arrays, "regions": arrays["regions"][:, :16]})
    with pytest.raises(ValueError, match="known_text must be"):
        TrainData(**{**arrays, "known_text": np.ones((3, 8), np.float32)})
    with pytest.raises(ValueError, match="gap must be"):
        TrainData(**arrays, gap=np.zeros(DIM + 1, np.float32))


def test_patch_consistency_is_zero_when_each_footprint_averages_to_its_patch(device):
    """L_emb with emb_pooling=patches: a student map that repeats every CLIP patch over its footprint (in a flipped
    and in a zoomed view) scores 0, the same map with patches swapped does not; the gap moves the targets. The
    maps live on ``device`` and the views on the CPU, as in training."""
    from clips4.views import ViewBatch

    interpolate = torch.nn.functional.interpolate
    clip = torch.nn.functional.normalize(torch.randn(1, DIM, 4, 4), dim=1).to(device)
    views = ViewBatch(torch.tensor([[0.0, 0.0, 16.0, 16.0], [4.0, 4.0, 12.0, 12.0]]), torch.tensor([True, False]), 8)
    full = interpolate(clip, size=8, mode="nearest").flip(-1)  # view 0: the whole frame, flipped
    zoom = interpolate(clip[..., 1:3, 1:3], size=8, mode="nearest")  # view 1: the middle 2x2
    z = torch.cat([full, zoom])
    no_gap = torch.zeros(DIM, device=device)
    assert training.patch_consistency(z, clip, views, (16, 16), no_gap) < 0.01  # bilinear samples blur edges
    swapped = torch.cat([full.flip(-1), zoom.flip(-2)])
    assert training.patch_consistency(swapped, clip, views, (16, 16), no_gap) > 0.3
    gap = no_gap.clone()
    gap[0] = 3.0
    moved = torch.nn.functional.normalize(clip + gap.view(1, -1, 1, 1), dim=1)
    z_moved = torch.cat([interpolate(moved, size=8, mode="nearest").flip(-1),
                         interpolate(moved[..., 1:3, 1:3], size=8, mode="nearest")])
    assert training.patch_consistency(z_moved, clip, views, (16, 16), gap) < 0.01
    assert training.patch_consistency(z_moved, clip, views, (16, 16), no_gap) > 0.1


def test_patch_norm_power_sets_how_much_a_mixed_footprint_may_amplify_its_residual():
    """A footprint whose pixels alternate between two embeddings u, w: with power 1 only the direction of their
    mean counts (0 when the patch is that direction), with power 0 every pixel is pulled to the patch (1 - |m|
    left over), and powers between lie between."""
    from clips4.views import ViewBatch

    u, w = torch.eye(DIM)[0], torch.eye(DIM)[1]
    clip = torch.nn.functional.normalize(u + w, dim=0).view(1, DIM, 1, 1).expand(1, DIM, 2, 2).contiguous()
    columns = torch.stack([u, w]).repeat(4, 1)  # u, w, u, w, ... across the 8 columns of the student map
    z = columns.T.view(1, DIM, 1, 8).expand(2, DIM, 8, 8).contiguous()
    views = ViewBatch(torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2), torch.tensor([False, True]), 8)
    loss = {p: float(training.patch_consistency(z, clip, views, (16, 16), None, p)) for p in (0.0, 0.5, 1.0)}
    mean_length = 2**-0.5  # |(u + w) / 2|
    assert loss[1.0] == pytest.approx(0.0, abs=5e-3)  # bilinear samples straddle the columns unevenly
    assert loss[0.0] == pytest.approx(1 - mean_length, abs=5e-3)
    assert loss[1.0] < loss[0.5] < loss[0.0]


@pytest.mark.parametrize("pooling", ["segments", "patches"])
def test_text_side_embedding_targets_follow_the_gap(tmp_path, pooling):
    """emb_space=text pulls the student toward CLIP features moved across the gap: with a gap along one axis the
    student's pixels turn toward that axis, and stay put in the image space."""
    arrays = tiny_arrays()
    gap = np.zeros(DIM, np.float32)
    gap[0] = 3.0
    mean_axis0 = {}
    for space in ("image", "text"):
        cfg = tiny_cfg(steps=30, lambda_contrast=0.0, lambda_sem=0.0, emb_pooling=pooling, emb_space=space, lr=0.05)
        result = train_student(TrainData(**arrays, gap=gap), cfg, MEAN_STD, tmp_path / space, CPU)
        emb = result.model.embed(arrays["images"])
        mean_axis0[space] = float(emb[:, 0].mean())
    assert mean_axis0["text"] > 0.9 > 0.5 > mean_axis0["image"]


def test_patch_embedding_alone_computes_no_segments(tmp_path, monkeypatch):
    """L_emb over patches needs no segments: the per-view k-means is skipped when no other loss is on."""
    monkeypatch.setattr(training, "segment_views", lambda *a, **k: pytest.fail("segments computed for nothing"))
    result = run(tmp_path, steps=2, lambda_contrast=0.0, lambda_sem=0.0, emb_pooling="patches")
    assert set(result.losses["component"]) == {"emb", "total"}
    assert np.isfinite(result.losses["value"]).all()


def test_both_poolings_average_the_patch_and_segment_terms(tmp_path, monkeypatch):
    """emb_pooling=both logs L_emb as the mean of the per-patch and the per-segment terms."""
    monkeypatch.setattr(training, "patch_consistency", lambda *a: torch.tensor(0.2, requires_grad=True))
    monkeypatch.setattr(training, "embedding_consistency", lambda *a: torch.tensor(0.6, requires_grad=True))
    result = run(tmp_path, steps=1, lambda_contrast=0.0, lambda_sem=0.0, emb_pooling="both")
    emb = result.losses[result.losses["component"] == "emb"]["value"]
    np.testing.assert_allclose(emb, [0.4], rtol=1e-6)


def test_teacher_contrast_targets_are_the_teachers_pixels_and_segments_across_the_gap(tmp_path, monkeypatch):
    """contrast_targets=teacher replaces the region positives by the teacher's pixel-to-segment relations: the
    teacher side is the CLIP map at the same pixels and pooled over the same segments, both moved across the gap."""
    monkeypatch.setattr(training, "pixel_segment_contrastive", lambda *a, **k: pytest.fail("region targets used"))
    seen = []
    real = training.relational_contrastive

    def spy(z, seg_emb, clip_pix, clip_seg, kappa, kappa_teacher):
        seen.append((z.shape, seg_emb.shape, clip_pix.detach().clone(), clip_seg.detach().clone(), kappa_teacher))
        return real(z, seg_emb, clip_pix, clip_seg, kappa, kappa_teacher)

    monkeypatch.setattr(training, "relational_contrastive", spy)
    gap = np.zeros(DIM, np.float32)
    gap[0] = 3.0
    cfg = tiny_cfg(steps=2, contrast_targets="teacher", kappa_teacher=8.0, contrast_pixels=50)
    result = train_student(TrainData(**tiny_arrays(), gap=gap), cfg, MEAN_STD, tmp_path, CPU)
    assert len(seen) == 2 and np.isfinite(result.losses["value"]).all()
    z_shape, seg_shape, clip_pix, clip_seg, kappa_teacher = seen[0]
    assert clip_pix.shape == (50, DIM) == z_shape and clip_seg.shape == seg_shape and kappa_teacher == 8.0
    torch.testing.assert_close(clip_pix.norm(dim=1), torch.ones(50))
    assert clip_pix[:, 0].min() > 0.9 and clip_seg[:, 0].min() > 0.9  # moved across the gap


def test_torchrun_with_more_processes_than_gpus_is_refused_by_name(monkeypatch) -> None:
    """A rank whose LOCAL_RANK has no GPU must say so before it touches CUDA or the process group."""
    local_rank = torch.cuda.device_count()  # one past the last GPU (0 on a CPU machine)
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", str(local_rank + 1))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    with pytest.raises(ValueError, match=rf"local rank {local_rank} but this machine has {local_rank} GPU"):
        training.setup_distributed(torch.device("cuda"))
