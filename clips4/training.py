"""CLIP-S4 training loop (docs/method.md §2-4): two views per image, segments, and the three losses against a frozen
teacher whose dense maps were precomputed on the un-augmented images.

The loop only sees arrays and a work folder; the task layer reads and writes artifacts. Every random draw of a step
is seeded from (seed, step, rank), so a run killed at any point resumes from its last checkpoint and continues
exactly as if it had not stopped. Under torchrun (RANK / WORLD_SIZE set) it trains with DDP, each rank taking its
share of every global batch; rank 0 alone writes checkpoints and refreshes the unknown prototypes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.ops import roi_align

from clips4.config import TrainConfig
from clips4.data.prepare import to_unit_images
from clips4.losses import (
    embedding_consistency,
    pixel_segment_contrastive,
    relational_contrastive,
    segment_means,
    semantic_consistency,
)
from clips4.progress import track
from clips4.prototypes import LabelRule, move_across_gap, spherical_kmeans
from clips4.segments import segment_views
from clips4.student import PixelEncoder, Preprocessing, build_student, save_student
from clips4.views import ViewBatch, cell_footprints, color_jitter, sample_views, warp
from clips4.atomic import atomic_write

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "student.safetensors"
STATE_FILE = "train_state.pt"
LOSSES_FILE = "losses.csv"
COMPONENTS = ("contrast", "emb", "sem")  # loss log names of L_contrast, L_emb, L_sem
POLY_POWER = 0.9
SGD_MOMENTUM = 0.9
BUFFER_SIZE = 20_000  # recent (gap-corrected) CLIP segment embeddings the prototypes are refreshed on
REFRESH_ITERATIONS = 10  # k-means iterations per refresh; it starts from the current prototypes
NORM_EPS = 1e-6  # smallest footprint-mean length divided by (a footprint whose pixels cancel out)
FOOTPRINT_SAMPLES = 6  # bilinear samples per side when averaging the student over a CLIP patch's footprint
_BATCH_STREAM, _VIEW_STREAM = 0, 1  # seed-sequence tags, so batch order and augmentation never share a stream


class ArrayLike(Protocol):
    """numpy array or a lazy array (e.g. Zarr) that is read one image at a time."""

    shape: tuple[int, ...]

    def __getitem__(self, index: int) -> Any: ...


@dataclass
class TrainData:
    """Training inputs, image-aligned: ``images`` uint8 [N,H,W,3], ``clip_maps`` [N,h,w,D] (teacher dense features
    of the same un-augmented frame), ``regions`` int [N,H,W] superpixel ids; ``known_text`` [K,D] text embeddings of
    the known classes only (held-out classes must never be here); ``prototypes`` [M,D] initial unknown prototypes;
    ``gap`` [D] the modality-gap offset the prototypes were clustered with (CLIP segment embeddings are moved by it
    before they are labelled over known texts + prototypes; None = no correction); ``label_rule`` how L_sem labels
    a segment and which segments refresh the prototypes (the cluster stage's rule; default: the nearest target)."""

    images: ArrayLike
    clip_maps: ArrayLike
    regions: ArrayLike
    known_text: np.ndarray
    prototypes: np.ndarray
    gap: np.ndarray | None = None
    label_rule: LabelRule = field(default_factory=LabelRule)

    def __post_init__(self) -> None:
        if len(self.images.shape) != 4 or self.images.shape[3] != 3:
            raise ValueError(f"training images must be RGB [N,H,W,3], got shape {tuple(self.images.shape)}")
        n, height, width, _ = self.images.shape
        if tuple(self.regions.shape) != (n, height, width):
            raise ValueError(f"regions must be [N,H,W] = {(n, height, width)} like the images, "
                             f"got {tuple(self.regions.shape)}")
        if len(self.clip_maps.shape) != 4 or self.clip_maps.shape[0] != n:
            raise ValueError(f"clip_maps must be [N,h,w,D] with N = {n} images, got {tuple(self.clip_maps.shape)}")
        dim = self.clip_maps.shape[3]
        for name in ("known_text", "prototypes"):
            value = np.asarray(getattr(self, name), dtype=np.float32)
            if value.ndim != 2 or value.shape[1] != dim:
                raise ValueError(f"{name} must be [*, {dim}] (the CLIP feature dim), got {value.shape}")
            setattr(self, name, value)
        self.gap = np.zeros(dim, np.float32) if self.gap is None else np.asarray(self.gap, dtype=np.float32)
        if self.gap.shape != (dim,):
            raise ValueError(f"gap must be [{dim}] (the CLIP feature dim), got {self.gap.shape}")

    @property
    def dim(self) -> int:
        return int(self.clip_maps.shape[3])

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])


@dataclass
class TrainResult:
    """The trained student (unwrapped, eval mode), the final prototypes [M,D], the loss log (step, component,
    value; components unweighted, "total" the weighted sum, one row each per step), the number of optimiser steps
    done, the step the run resumed from (0 for a fresh start), how many DDP processes trained it, and the share of
    L_sem's segment labels that were known classes rather than prototypes (this process, steps since the start or
    resume; None without L_sem)."""

    model: PixelEncoder
    prototypes: np.ndarray
    losses: pd.DataFrame
    steps_done: int
    resumed_from: int
    processes: int = 1
    known_label_share: float | None = None


@dataclass
class Distributed:
    """This process's place in a torchrun job; rank 0 of world 1 when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    enabled: bool = False
    owns_group: bool = False


class EmbeddingBuffer:
    """Ring buffer of the most recent CLIP segment embeddings (float16, CPU) for refreshing the prototypes."""

    def __init__(self, capacity: int, dim: int) -> None:
        self.data = torch.zeros(capacity, dim, dtype=torch.float16)
        self.size = 0
        self.cursor = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach()[-len(self.data):].to("cpu", torch.float16)
        slots = (self.cursor + torch.arange(len(rows))) % len(self.data)
        self.data[slots] = rows
        self.cursor = int((self.cursor + len(rows)) % len(self.data))
        self.size = min(self.size + len(rows), len(self.data))

    def rows(self) -> np.ndarray:
        return self.data[: self.size].float().numpy()

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.data[: self.size].clone(), "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size = len(state["data"])
        self.data[: self.size] = state["data"]
        self.cursor = int(state["cursor"])


def derive_seed(*parts: int) -> int:
    """One well-mixed 63-bit seed from several integers (run seed, stream, step, rank)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def batch_indices(step: int, batch_size: int, num_images: int, seed: int) -> np.ndarray:
    """Images of global step ``step``: consecutive slices of a fresh seeded permutation per epoch, so every image is
    seen once per epoch and any step's batch can be recomputed after a restart."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // num_images
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        generator = torch.Generator().manual_seed(derive_seed(seed, _BATCH_STREAM, epoch))
        chosen = epochs == epoch
        out[chosen] = torch.randperm(num_images, generator=generator).numpy()[positions[chosen] % num_images]
    return out


def take(array: ArrayLike, indices: np.ndarray) -> np.ndarray:
    """Stack ``array[i]`` for each index: one read per image, so lazy arrays never load more than the batch."""
    return np.stack([np.asarray(array[int(i)]) for i in indices])


@dataclass
class Batch:
    """One step's images uint8 [B,H,W,3], regions [B,H,W] and CLIP maps [B,h,w,D], as read from ``TrainData``."""

    images: np.ndarray
    regions: np.ndarray
    clip_maps: np.ndarray


def read_batch(data: TrainData, indices: np.ndarray) -> Batch:
    return Batch(take(data.images, indices), take(data.regions, indices), take(data.clip_maps, indices))


def poly_decay(total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor (1 - step/total)^0.9, the poly schedule of DeepLab/HSG."""
    return lambda step: (1.0 - min(step, total_steps) / total_steps) ** POLY_POWER


def make_optimizer(model: PixelEncoder, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = model.param_groups(cfg.lr, cfg.head_lr_mult)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=SGD_MOMENTUM, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def loss_weights(cfg: TrainConfig) -> dict[str, float]:
    """The loss components that are switched on, with their weights."""
    lambdas = (cfg.lambda_contrast, cfg.lambda_emb, cfg.lambda_sem)
    weights = {name: w for name, w in zip(COMPONENTS, lambdas) if w > 0}
    if not weights:
        raise ValueError("train.lambda_contrast, lambda_emb and lambda_sem are all 0: nothing to train; "
                         "set at least one of them above 0")
    return weights


def contrast_subset(count: int, limit: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Indices of at most ``limit`` of ``count`` pixels (all of them when ``limit`` is 0 or not smaller)."""
    if limit == 0 or count <= limit:
        return torch.arange(count, device=device)
    return torch.randperm(count, generator=generator)[:limit].to(device)


def step_losses(
    model: nn.Module,
    batch: Batch,
    cfg: TrainConfig,
    targets: torch.Tensor,
    *,
    gap: torch.Tensor,
    generator: torch.Generator,
    device: torch.device,
    rule: LabelRule = LabelRule(),
    num_known: int = 0,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """The switched-on loss components of one batch (two views per image), the CLIP segment embeddings u moved
    across the modality gap (the space the targets live in, and the one the prototypes are refreshed in; None when
    no switched-on loss needs segments: L_emb over patches alone) and L_sem's segment labels, indices into
    ``targets`` whose first ``num_known`` rows are the known texts, by ``rule`` (None without L_sem)."""
    weights = loss_weights(cfg)
    images = to_unit_images(batch.images, device)
    clip = torch.from_numpy(batch.clip_maps).to(device).permute(0, 3, 1, 2).float()
    count, _, height, width = images.shape

    views = sample_views(2 * count, (height, width), cfg.input_size, cfg.crop_scale, generator)
    pixels = color_jitter(warp(images.repeat(2, 1, 1, 1), views), cfg.color_jitter, generator,
                          grayscale_p=cfg.grayscale)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
        z = model(getattr(model, "module", model).normalize(pixels))  # DDP wraps the student in .module
    z = z.float()

    losses: dict[str, torch.Tensor] = {}
    emb_gap = gap if cfg.emb_space == "text" else None
    if "emb" in weights and cfg.emb_pooling in ("patches", "both"):
        losses["emb"] = patch_consistency(z, clip, views, (height, width), emb_gap, cfg.patch_norm_power)
    if not ({"contrast", "sem"} & weights.keys() or ("emb" in weights and cfg.emb_pooling != "patches")):
        return losses, None, None

    # Region ids unique per image and shared by its two views: the same region in both views is one positive group.
    regions = torch.from_numpy(batch.regions.astype(np.int64)).to(device)
    span = int(regions.max().clamp(min=0)) + 1
    offsets = torch.arange(count, device=device).view(-1, 1, 1) * span
    regions = torch.where(regions >= 0, regions + offsets, -1)
    size = z.shape[-1]
    view_regions = warp(regions.repeat(2, 1, 1)[:, None], views, size, mode="nearest")[:, 0]
    view_clip = warp(clip.repeat(2, 1, 1, 1), views, size, mode="bilinear", frame_size=(height, width))

    segments = segment_views(z.detach(), view_regions, cfg.grid_seeds, cfg.kmeans_iters)
    valid = segments.ids >= 0
    seg = segments.ids[valid]
    z_pix = z.permute(0, 2, 3, 1)[valid]
    v = segment_means(z_pix, seg, segments.num)
    clip_pix = view_clip.permute(0, 2, 3, 1)[valid]
    u = segment_means(clip_pix, seg, segments.num)
    u_text_side = move_across_gap(u, gap)

    if "contrast" in weights:
        # A random subset of pixels is an unbiased estimate of the mean over pixels at a fraction of the N x S cost.
        keep = contrast_subset(len(seg), cfg.contrast_pixels, generator, device)
        if cfg.contrast_targets == "teacher":
            losses["contrast"] = relational_contrastive(z_pix[keep], v, move_across_gap(clip_pix[keep], gap),
                                                        u_text_side, cfg.kappa, cfg.kappa_teacher)
        else:
            losses["contrast"] = pixel_segment_contrastive(z_pix[keep], seg[keep], v, segments.region, cfg.kappa)
    if "emb" in weights and cfg.emb_pooling != "patches":
        per_segment = embedding_consistency(v, u if emb_gap is None else u_text_side)
        losses["emb"] = (losses["emb"] + per_segment) / 2 if "emb" in losses else per_segment
    labels = None
    if "sem" in weights:
        labels = rule.label(u_text_side, targets, num_known)
        losses["sem"] = semantic_consistency(v, u_text_side, targets, cfg.tau, labels=labels)
    return {name: losses[name] for name in weights}, u_text_side, labels


def patch_consistency(z: torch.Tensor, clip: torch.Tensor, views: ViewBatch, frame_size: tuple[int, int],
                      gap: torch.Tensor | None, norm_power: float = 1.0) -> torch.Tensor:
    """L_emb per CLIP patch: the student map of each view ``z`` [2B,D,s,s] averaged over the footprint of every
    patch of the source's CLIP map ``clip`` [B,D,h,w] that lies inside the view, against that patch (moved across
    the modality gap by ``gap`` [D] when given): mean over patches of 1 - <m, t> / |m|^norm_power.

    A patch feature describes everything inside its footprint, so only the footprint's mean m is asked to match it;
    a small thing that fills part of a patch is free to keep its own embedding instead of inheriting the mix. With
    norm_power 1 only m's direction counts, and a thing covering a fraction c of the patch must make up the whole
    residual the ground leaves, scaled by 1/c; lower powers weigh m's length too (0: every pixel is pulled to t),
    which bounds that amplification.
    """
    rois, cell = cell_footprints(views, frame_size, tuple(clip.shape[-2:]), z.shape[-1])
    rois, cell = rois.to(z.device), cell.to(z.device)  # the views live on the CPU, the map where the model runs
    # float32 boxes and map: under bf16 autocast a box corner 60 px in would round to the nearest 0.25 px
    pooled = roi_align(z.float(), rois, output_size=1, spatial_scale=1.0, sampling_ratio=FOOTPRINT_SAMPLES,
                       aligned=True).flatten(1)
    targets = clip.repeat(2, 1, 1, 1).flatten(2).transpose(1, 2).reshape(-1, clip.shape[1])[cell]
    targets = F.normalize(targets, dim=1) if gap is None else move_across_gap(targets, gap)
    length = pooled.norm(dim=1).clamp(min=NORM_EPS)
    return (1 - (pooled * targets.detach()).sum(1) / length**norm_power).mean()


def train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: Batch,
    *,
    cfg: TrainConfig,
    targets: torch.Tensor,
    gap: torch.Tensor,
    generator: torch.Generator,
    device: torch.device,
    group: Distributed,
    rule: LabelRule = LabelRule(),
    num_known: int = 0,
) -> tuple[dict[str, float], torch.Tensor | None, torch.Tensor | None]:
    """One optimiser step; returns the loss values to log (components unweighted, total weighted; averaged over
    DDP ranks), the gap-corrected CLIP segment embeddings of the batch (None when no loss needed segments) and
    L_sem's segment labels (None without L_sem)."""
    losses, u, labels = step_losses(net, batch, cfg, targets, gap=gap, generator=generator, device=device,
                                    rule=rule, num_known=num_known)
    weights = loss_weights(cfg)
    total = sum(weights[name] * value for name, value in losses.items())
    if not torch.isfinite(total):
        raise FloatingPointError(f"training loss is {total.item()}; lower train.lr or check the inputs "
                                 "(CLIP maps and text embeddings must be finite)")
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    scheduler.step()
    values = torch.stack([*losses.values(), total]).detach()
    if group.enabled:
        dist.all_reduce(values)
        values /= group.world
    return dict(zip([*losses, "total"], values.tolist())), u, labels


def setup_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the torchrun process group when RANK / WORLD_SIZE say so (nccl on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed(), device
    if device.type == "cuda":
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= gpus:
            raise ValueError(f"torchrun gave this process local rank {local_rank} but this machine has {gpus} GPU(s); "
                             f"start at most {gpus} process(es) per node, or train on CPU with train.device=cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), enabled=True, owns_group=owns), device


def losses_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["step", "component", "value"])


def train_student(
    data: TrainData,
    cfg: TrainConfig,
    normalization: tuple[Sequence[float], Sequence[float]],
    workdir: Path,
    device: torch.device,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train the student for ``cfg.steps`` optimiser steps, resuming from the checkpoint in ``workdir`` if any.

    ``normalization`` is the teacher's pixel (mean, std), which the student adopts (:class:`Preprocessing`); ``log`` receives progress messages (start/resume,
    checkpoints, prototype refreshes). Writes ``student.safetensors``, ``train_state.pt`` and ``losses.csv`` to
    ``workdir`` every ``cfg.checkpoint_every`` steps and at the end.
    """
    loss_weights(cfg)  # refuse an all-zero loss before joining any process group
    group, device = setup_distributed(device)
    try:
        result = _train(data, cfg, normalization, Path(workdir), device, group, log or logger.info)
        if group.enabled:
            dist.barrier()
        return result
    finally:
        if group.owns_group:
            dist.destroy_process_group()


def _train(
    data: TrainData,
    cfg: TrainConfig,
    normalization: tuple[Sequence[float], Sequence[float]],
    workdir: Path,
    device: torch.device,
    group: Distributed,
    log: Callable[[str], None],
) -> TrainResult:
    if cfg.batch_size < group.world:
        raise ValueError(f"train.batch_size={cfg.batch_size} is smaller than the {group.world} DDP processes; "
                         "each process needs at least one image per step")
    is_main = group.rank == 0
    say = log if is_main else lambda message: None
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)

    with torch.random.fork_rng(devices=[]):  # same initial weights on every rank and in every rerun
        torch.manual_seed(cfg.seed)
        preprocessing = Preprocessing(cfg.input_size, tuple(map(float, normalization[0])),  # type: ignore[arg-type]
                                      tuple(map(float, normalization[1])))
        model = build_student(cfg.student, data.dim, preprocessing, width=cfg.width,
                              backbone_weights=cfg.backbone_weights, context=cfg.context)
    if group.world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_decay(cfg.steps))
    known_text = torch.from_numpy(data.known_text).to(device)
    prototypes = torch.from_numpy(data.prototypes).to(device)
    gap = torch.from_numpy(data.gap).to(device)
    buffer = EmbeddingBuffer(BUFFER_SIZE, data.dim)
    rows: list[dict[str, Any]] = []
    start = 0
    if (workdir / STATE_FILE).is_file():
        start, prototypes, rows = load_checkpoint(workdir, model, optimizer, scheduler, buffer, device)
        if prototypes.shape != data.prototypes.shape:
            raise ValueError(f"checkpoint in {workdir} has prototypes {tuple(prototypes.shape)} but the data has "
                             f"{data.prototypes.shape}; delete {workdir} to start over")
        say(f"resuming training from step {start} of {cfg.steps} ({workdir})")
    else:
        say(f"training {cfg.student} for {cfg.steps} steps, batch {cfg.batch_size}, "
            f"losses {', '.join(loss_weights(cfg))}")

    net: nn.Module = model
    if group.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    refresh = cfg.refresh_every > 0 and len(prototypes) > 0 and "sem" in loss_weights(cfg)  # only L_sem uses them

    label_counts = torch.zeros(2, dtype=torch.long)  # L_sem labels that were known classes, all L_sem labels

    def indices(step: int) -> np.ndarray:
        return batch_indices(step, cfg.batch_size, data.num_images, cfg.seed)[group.rank :: group.world]

    net.train()
    steps = range(start, cfg.steps)
    with ThreadPoolExecutor(max_workers=1) as reader:  # reads the next batch while this one trains
        pending = reader.submit(read_batch, data, indices(start)) if steps else None
        for step in track(steps, "train student", unit="step") if is_main else steps:
            batch = pending.result()  # type: ignore[union-attr]
            if step + 1 < cfg.steps:
                pending = reader.submit(read_batch, data, indices(step + 1))
            generator = torch.Generator().manual_seed(derive_seed(cfg.seed, _VIEW_STREAM, step, group.rank))
            targets = torch.cat([known_text, prototypes])
            values, u, labels = train_step(
                net, optimizer, scheduler, batch, cfg=cfg, targets=targets, gap=gap, generator=generator,
                device=device, group=group, rule=data.label_rule, num_known=len(known_text),
            )
            rows.extend({"step": step, "component": name, "value": value} for name, value in values.items())
            if labels is not None:
                label_counts += torch.tensor([int((labels < len(known_text)).sum()), len(labels)])
            if refresh and is_main:  # the segments the rule leaves to the prototypes
                buffer.add(u[torch.from_numpy(data.label_rule.fit_rows(u.detach().cpu().numpy(),
                                                                       data.known_text)).to(u.device)])
            done = step + 1
            if refresh and done % cfg.refresh_every == 0:
                fixed = known_text if data.label_rule.anchors is None else data.label_rule.anchors.to(known_text)
                prototypes = refresh_prototypes(buffer, fixed, prototypes, cfg.seed + done, group, say)
            if is_main and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                save_checkpoint(workdir, model, optimizer=optimizer, scheduler=scheduler, buffer=buffer,
                                prototypes=prototypes, rows=rows, step=done)
                shown = ", ".join(f"{name} {value:.4f}" for name, value in values.items())
                share = f"; {label_share(label_counts):.1%} of L_sem labels known classes" if label_counts[1] else ""
                say(f"step {done}: loss {shown}{share}; checkpoint written to {workdir}")

    return TrainResult(
        model=model.eval(),
        prototypes=prototypes.cpu().numpy(),
        losses=losses_frame(rows),
        steps_done=max(start, cfg.steps),
        resumed_from=start,
        processes=group.world,
        known_label_share=label_share(label_counts) if label_counts[1] else None,
    )


def label_share(counts: torch.Tensor) -> float:
    """Known-class labels / all labels, from [known, all] counts."""
    return float(counts[0]) / max(int(counts[1]), 1)


def refresh_prototypes(
    buffer: EmbeddingBuffer,
    fixed: torch.Tensor,
    prototypes: torch.Tensor,
    seed: int,
    group: Distributed,
    say: Callable[[str], None],
) -> torch.Tensor:
    """Re-cluster the recent CLIP segment embeddings with the ``fixed`` centres (the known texts, or the named
    clusters) held, starting from the current prototypes (docs/method.md §4); rank 0 computes, every rank receives
    the result."""
    if group.rank == 0 and buffer.size >= len(fixed) + len(prototypes):
        result = spherical_kmeans(buffer.rows(), len(prototypes), REFRESH_ITERATIONS, seed, BUFFER_SIZE,
                                  fixed=fixed.cpu().numpy(), init=prototypes.cpu().numpy())
        prototypes = torch.from_numpy(result.centroids[len(fixed):]).to(prototypes.device)
        sizes = result.sizes[len(fixed):].tolist()
        say(f"refreshed {len(prototypes)} unknown prototypes from {buffer.size} segment embeddings (sizes {sizes})")
    if group.enabled:
        prototypes = prototypes.contiguous()
        dist.broadcast(prototypes, src=0)
    return prototypes


def save_checkpoint(
    workdir: Path,
    model: PixelEncoder,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    buffer: EmbeddingBuffer,
    prototypes: torch.Tensor,
    rows: list[dict[str, Any]],
    step: int,
) -> None:
    """Weights, loss log, then the state file last: the state's step is what a resumed run trusts."""
    save_student(model, workdir / WEIGHTS_FILE, step)
    atomic_write(workdir / LOSSES_FILE, lambda tmp: losses_frame(rows).to_csv(tmp, index=False))
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "prototypes": prototypes.detach().cpu(),
        "buffer": buffer.state_dict(),
    }
    atomic_write(workdir / STATE_FILE, lambda tmp: torch.save(state, tmp))


def load_checkpoint(
    workdir: Path,
    model: PixelEncoder,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    buffer: EmbeddingBuffer,
    device: torch.device,
) -> tuple[int, torch.Tensor, list[dict[str, Any]]]:
    """Restore everything :func:`save_checkpoint` wrote; returns (step, prototypes, loss rows before step)."""
    state = torch.load(workdir / STATE_FILE, map_location="cpu", weights_only=True)
    step = int(state["step"])
    weights_path = workdir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{workdir} has {STATE_FILE} but no {WEIGHTS_FILE}; delete {workdir} to start over")
    with safe_open(str(weights_path), framework="pt") as handle:
        weights_step = int((handle.metadata() or {}).get("step", step))
    if weights_step != step:
        logger.warning("%s is from step %d but %s from step %d (killed between the two writes); resuming with them",
                       weights_path, weights_step, STATE_FILE, step)
    try:
        model.load_state_dict(load_file(str(weights_path), device=str(device)))
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"the checkpoint in {workdir} was written for a different student or optimiser "
                         f"({err}); delete {workdir} to start over") from err
    scheduler.load_state_dict(state["scheduler"])
    buffer.load_state_dict(state["buffer"])
    rows: list[dict[str, Any]] = []
    if (workdir / LOSSES_FILE).is_file():
        frame = pd.read_csv(workdir / LOSSES_FILE)
        rows = frame[frame["step"] < step].to_dict("records")
    return step, state["prototypes"].to(device), rows
