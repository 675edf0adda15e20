"""Pictures for reports: prediction overlays, embedding PCA, loss curves, the prototype map. Each writes one PNG.

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas) rather than pyplot, so no global backend state is
touched and the functions are safe in worker processes and headless servers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from clips4.data.records import IGNORE_INDEX

CELL_INCHES = 2.2


def _save(fig: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _pca(points: np.ndarray, components: int) -> np.ndarray:
    """Projection [N,components] of ``points`` [N,D] on their top principal axes (zero columns if D is smaller)."""
    centred = points - points.mean(axis=0, keepdims=True)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ axes[:components].T
    return np.pad(projected, ((0, 0), (0, components - projected.shape[1])))


def pca_rgb(emb: torch.Tensor | np.ndarray) -> np.ndarray:
    """Colour picture uint8 [h,w,3] of an embedding map [D,h,w]: its top 3 principal components as R, G, B.

    Each component is stretched between its 1st and 99th percentile, so a few outlier pixels do not wash it out.
    """
    emb = _numpy(emb).astype(np.float64)
    if emb.ndim != 3:
        raise ValueError(f"expected an embedding map [D,h,w], got shape {emb.shape}")
    d, h, w = emb.shape
    rgb = _pca(emb.reshape(d, -1).T, 3)
    low, high = np.percentile(rgb, 1, axis=0), np.percentile(rgb, 99, axis=0)
    rgb = np.clip((rgb - low) / np.maximum(high - low, 1e-12), 0, 1)
    return (rgb.reshape(h, w, 3) * 255).round().astype(np.uint8)


def _colour(label: np.ndarray, palette: np.ndarray, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB of each pixel's class and the mask of pixels that have one."""
    valid = label != ignore_index
    if valid.any() and label[valid].max() >= len(palette):
        raise ValueError(f"label value {label[valid].max()} has no palette colour ({len(palette)} colours)")
    return palette[np.where(valid, label, 0)], valid


def blend_labels(
    image: np.ndarray, label: np.ndarray, palette: np.ndarray, ignore_index: int = IGNORE_INDEX, alpha: float = 0.6
) -> np.ndarray:
    """uint8 [H,W,3]: class colours of ``label`` blended over ``image``; ignored pixels show the bare image."""
    label = _numpy(label).astype(np.int64)
    if label.shape != image.shape[:2]:
        raise ValueError(f"map of shape {label.shape} for an image of shape {image.shape[:2]}")
    colour, valid = _colour(label, np.asarray(palette, dtype=np.float64), ignore_index)
    return np.where(valid[..., None], (1 - alpha) * image + alpha * colour, image).astype(np.uint8)


def overlay_grid(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    predictions: Mapping[str, Sequence[np.ndarray]],
    class_names: Sequence[str],
    *,
    palette: np.ndarray,
    path: Path | str,
    ignore_index: int = IGNORE_INDEX,
    alpha: float = 0.6,
) -> Path:
    """Rows = images; columns = image | ground truth | one per method (label colours blended over the image).

    ``images`` uint8 [H,W,3]; ``labels`` and each method's predictions int [H,W] class ids; ``palette`` [K,3] uint8.
    The legend names the classes that appear in any shown map. Ignored pixels show the bare image.
    """
    if not images or len(labels) != len(images) or any(len(p) != len(images) for p in predictions.values()):
        raise ValueError("overlay_grid needs one label map and one prediction per method for every image")
    palette = np.asarray(palette, dtype=np.float64)
    columns = ["image", "ground truth", *predictions]
    fig = Figure(figsize=(CELL_INCHES * len(columns), CELL_INCHES * len(images) + 0.6))
    axes = fig.subplots(len(images), len(columns), squeeze=False)
    present: set[int] = set()
    for row, image in enumerate(images):
        maps = [labels[row], *(p[row] for p in predictions.values())]
        axes[row, 0].imshow(image)
        for col, label in enumerate(maps, start=1):
            label = _numpy(label).astype(np.int64)
            present.update(np.unique(label[label != ignore_index]).tolist())
            axes[row, col].imshow(blend_labels(image, label, palette, ignore_index, alpha))
    for col, title in enumerate(columns):
        axes[0, col].set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    handles = [Patch(color=palette[k] / 255, label=class_names[k]) for k in sorted(present)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    return _save(fig, path)


def embedding_comparison(
    images: Sequence[np.ndarray],
    student: Sequence[torch.Tensor | np.ndarray],
    teacher: Sequence[torch.Tensor | np.ndarray],
    path: Path | str,
) -> Path:
    """Rows = images; columns = image | student PCA | teacher PCA (each map [D,h,w] gets its own PCA)."""
    if not images or not len(images) == len(student) == len(teacher):
        raise ValueError("embedding_comparison needs one student and one teacher map per image")
    fig = Figure(figsize=(CELL_INCHES * 3, CELL_INCHES * len(images)))
    axes = fig.subplots(len(images), 3, squeeze=False)
    for row, (image, s, t) in enumerate(zip(images, student, teacher, strict=True)):
        for ax, picture in zip(axes[row], (image, pca_rgb(s), pca_rgb(t)), strict=True):
            ax.imshow(picture, interpolation="nearest")
            ax.axis("off")
    for ax, title in zip(axes[0], ("image", "student (PCA)", "teacher (PCA)"), strict=True):
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_curves(df: pd.DataFrame, path: Path | str) -> Path:
    """One panel per loss component from a long table with columns step, component, value."""
    missing = {"step", "component", "value"} - set(df.columns)
    if missing or df.empty:
        raise ValueError(f"plot_curves needs a non-empty table with columns step, component, value; missing {missing}")
    components = list(dict.fromkeys(df["component"]))
    fig = Figure(figsize=(4 * len(components), 3))
    axes = fig.subplots(1, len(components), squeeze=False)[0]
    for ax, name in zip(axes, components, strict=True):
        rows = df[df["component"] == name].sort_values("step")
        ax.plot(rows["step"], rows["value"], linewidth=1)
        ax.set_title(str(name), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def prototype_map(
    known: torch.Tensor | np.ndarray,
    unknown: torch.Tensor | np.ndarray,
    names: Sequence[str],
    path: Path | str,
) -> Path:
    """2-D PCA scatter of the known-class text embeddings [K,D] (named) and the unknown prototypes [M,D] (u0, u1...)."""
    known, unknown = _numpy(known).astype(np.float64), _numpy(unknown).astype(np.float64).reshape(-1, known.shape[1])
    if len(names) != len(known):
        raise ValueError(f"{len(names)} names for {len(known)} known embeddings")
    xy = _pca(np.concatenate([known, unknown]), 2)
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    ax.scatter(*xy[: len(known)].T, marker="o", color="tab:blue", label="known classes (text)")
    ax.scatter(*xy[len(known) :].T, marker="x", color="tab:orange", label="unknown prototypes")
    labels = [*names, *(f"u{i}" for i in range(len(unknown)))]
    for (x, y), text in zip(xy, labels, strict=True):
        ax.annotate(text, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=8)
    return _save(fig, path)


def share_bars(table: pd.DataFrame, path: Path | str) -> Path:
    """Grouped bars per class of the argmax shares in a calibration table (``class``, ``held_out`` and one column
    per ``*_share*``): what MaskCLIP and the student give each class, before and after the held-out share floor."""
    columns = [c for c in table.columns if "_share" in c]
    if table.empty or not columns or not {"class", "held_out"} <= set(table.columns):
        raise ValueError("share_bars needs a non-empty table with columns class, held_out and at least one *_share column")
    x = np.arange(len(table))
    width = 0.8 / len(columns)
    fig = Figure(figsize=(max(5.0, 0.7 * len(table)), 3.2))
    ax = fig.subplots()
    for i, column in enumerate(columns):
        ax.bar(x + (i - (len(columns) - 1) / 2) * width, table[column], width, label=column.replace("_", " "))
    ax.set_xticks(x, [f"{c}*" if h else str(c) for c, h in zip(table["class"], table["held_out"], strict=True)],
                  rotation=45, fontsize=8)
    ax.set_yscale("symlog", linthresh=1e-3)  # a vanished class (share 0) stays on the axis
    ax.set_ylabel("share of train pixels (argmax)")
    ax.set_title("* held out: named only at test time", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
