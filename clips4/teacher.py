"""The frozen CLIP teacher: any open_clip model, loaded the way open_clip loads it, or pre-trained here.

Weights come from an open_clip pretrained tag, a local checkpoint file, or a Hugging Face Hub repo (``hf-hub:``) /
local folder (``local-dir:``) in open_clip's own layout. A local file of OpenAI's CLIP release (its TorchScript
archive, or a state dict of it) loads with the QuickGELU activation OpenAI trained with. The synthetic world has no
real CLIP, so :func:`pretrain_synthetic` trains a small open_clip model from scratch on its captions with open_clip's
contrastive loss; :func:`save_teacher` stores the result in the hf-hub layout so it loads back through the same
open_clip path as a user's checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import load_state_dict as open_clip_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from clips4.data.prepare import normalize_images
from clips4.progress import track
from clips4.atomic import atomic_write
from clips4.checkpoints import unwrap_state_dict

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
TINY_MODELS: tuple[str, ...] = ("clips4-vit-tiny", "clips4-rn-tiny")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
RESUME_FILE = "last.pt"
# Entries of OpenAI's CLIP release (its TorchScript archives, and state dicts taken from them) that no open_clip model
# has; open_clip drops them from TorchScript archives only.
OPENAI_METADATA_KEYS = frozenset({"input_resolution", "context_length", "vocab_size"})
# Short captions for one class, used by the caption augmentation of pre-training.
SINGLE_CLASS_TEMPLATES = ("a photo of a {}.", "{}.", "an image with a {}.", "the {}.")


class TeacherLoadError(RuntimeError):
    """The teacher could not be built; the message says which weights and what the user can do."""


@dataclass
class Teacher:
    """A frozen open_clip model with what callers need to feed it."""

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    model_name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def register_model_configs() -> None:
    """Make the small clips4 architectures known to open_clip (idempotent)."""
    if not set(TINY_MODELS) <= set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


# ------------------------------------------------------------------------------------------------------- loading
def is_checkpoint_path(pretrained: str) -> bool:
    """Tags are bare words (``openai``, ``laion2b_s34b_b88k``); anything path-like is a checkpoint file."""
    return Path(pretrained).suffix in CHECKPOINT_SUFFIXES or "/" in pretrained or os.sep in pretrained


def _checkpoint_header_error(path: Path) -> str | None:
    """Why ``path`` is not a checkpoint file, read from its first bytes only (None when it looks like one)."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                f.keys()
            return None
        with path.open("rb") as f:
            head = f.read(4)
    except Exception as err:  # noqa: BLE001 - any failure to read the header means the same to the user
        return str(err) or type(err).__name__
    # torch.save and TorchScript archives are zip files; legacy torch.save files are pickles
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    return "it is neither a zip archive (torch.save, TorchScript) nor a pickle"


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with a top-level ``constants.pkl`` (torch.load tells them apart the same way)."""
    if path.suffix == ".safetensors" or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def _state_dict_keys(path: Path) -> set[str]:
    """The names in a state-dict checkpoint, unwrapped as open_clip unwraps it; tensors stay on disk (memory-mapped)
    where the format allows."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return set(f.keys())
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 - any failure to read it means the same to the user
        reason = re.split(r"(?<=\.)\s", (str(err).strip().splitlines() or [""])[0])[0]  # its first sentence
        raise TeacherLoadError(f"teacher checkpoint {path} is not a readable checkpoint ({type(err).__name__}: "
                               f"{reason}); set teacher.pretrained to an intact state-dict file") from None
    state = unwrap_state_dict(loaded)
    if state is None:
        raise TeacherLoadError(f"teacher checkpoint {path} holds a {type(loaded).__name__}, not a state dict; "
                               "set teacher.pretrained to a file saved from model.state_dict()")
    return set(state)


def _openai_release(path: Path) -> str | None:
    """How ``path`` shows itself to be OpenAI's CLIP release, or None when it does not."""
    if _is_torchscript(path):
        return "a TorchScript archive, the form OpenAI releases CLIP in"
    if OPENAI_METADATA_KEYS <= _state_dict_keys(path):
        return f"a state dict with OpenAI's {', '.join(sorted(OPENAI_METADATA_KEYS))} entries"
    return None


def _folder_quick_gelu(path: Path) -> tuple[bool | None, str]:
    """Whether the ``open_clip_config.json`` of the hf-hub folder ``path`` sits in records QuickGELU (None when there
    is none), and that record in words."""
    config = path.parent / CONFIG_FILE
    if not config.is_file():
        return None, ""
    try:
        model_cfg = json.loads(config.read_text())["model_cfg"]
        quick_gelu = bool(model_cfg.get("quick_gelu", False))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise TeacherLoadError(f"{config}, beside teacher checkpoint {path}, is not an open_clip config ({err!r}); "
                               "fix it or move the checkpoint out of that folder") from None
    return quick_gelu, f"{config} records quick_gelu={str(quick_gelu).lower()}"


def checkpoint_activation(model: str, path: Path) -> tuple[bool, str | None]:
    """Whether checkpoint ``path`` loads into ``model`` with QuickGELU, and how it is OpenAI's release (or None).

    OpenAI trained CLIP with QuickGELU and open_clip picks it only for the ``openai`` tag, so OpenAI's release, or the
    hf-hub folder config beside the file, decides it; otherwise the model name does (``ViT-B-16-quickgelu`` says
    QuickGELU). A QuickGELU name for a checkpoint recorded as GELU is an error, not a silent change.
    """
    openai = _openai_release(path)
    if openai:
        return True, openai
    named = bool((open_clip.get_model_config(model) or {}).get("quick_gelu", False))
    recorded, record = _folder_quick_gelu(path)
    if recorded is None or recorded == named:
        return named, None
    if named:
        raise TeacherLoadError(
            f"teacher.model {model} uses QuickGELU but teacher checkpoint {path} was trained with GELU ({record}); "
            f"set teacher.model to the architecture without QuickGELU ({model.removesuffix('-quickgelu')})"
        )
    return True, None


@contextmanager
def _weights_follow() -> Iterator[None]:
    """Silence open_clip's 'initialized randomly' warning for a model whose weights are loaded right after."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _load_openai_release(model: str, path: Path, device: torch.device) -> nn.Module:
    """OpenAI's release (TorchScript, or a state dict of it) in the named open_clip architecture, with QuickGELU."""
    if _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=FutureWarning)
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = open_clip_state_dict(str(path))
    with _weights_follow():
        net = open_clip.create_model(model, force_quick_gelu=True)
    net.load_state_dict({k: v for k, v in state.items() if k not in OPENAI_METADATA_KEYS})  # fp16 is cast to fp32
    return net.to(device)


def check_teacher_source(model: str, pretrained: str | None) -> None:
    """Fail fast, without loading weights, when the teacher named by ``model`` / ``pretrained`` cannot resolve.

    Hours of data preparation can precede the teacher stage, so the pipeline calls this before any stage runs.
    """
    register_model_configs()
    if model.startswith("local-dir:"):
        folder = Path(model.removeprefix("local-dir:")).expanduser()
        if not (folder / CONFIG_FILE).is_file():
            raise TeacherLoadError(f"teacher folder {folder} has no {CONFIG_FILE}; teacher.model 'local-dir:PATH' "
                                   "must name a folder in open_clip's hf-hub layout")
        return
    if model.startswith(SCHEMA_PREFIXES):
        return  # hf-hub ids resolve through the Hugging Face cache when loaded
    model = model.replace("/", "-")
    if model not in open_clip.list_models():
        raise TeacherLoadError(
            f"unknown open_clip model {model!r}; use one of open_clip.list_models() (e.g. ViT-B-16, RN50, "
            f"{', '.join(TINY_MODELS)}) or an 'hf-hub:org/repo' id"
        )
    if pretrained is None:
        return
    if is_checkpoint_path(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise TeacherLoadError(
                f"teacher checkpoint {path} does not exist; set teacher.pretrained to an existing "
                f"{'/'.join(CHECKPOINT_SUFFIXES)} file or to an open_clip pretrained tag"
            )
        problem = _checkpoint_header_error(path)
        if problem:
            raise TeacherLoadError(f"teacher checkpoint {path} is not a readable checkpoint ({problem}); "
                                   "set teacher.pretrained to an intact checkpoint file")
        checkpoint_activation(model, path)
        return
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise TeacherLoadError(
            f"{pretrained!r} is neither a file nor a pretrained tag of {model}; tags: {', '.join(tags) or 'none'}"
        )


def _create_open_clip(model: str, pretrained: str | None, device: torch.device) -> nn.Module:
    """open_clip's own loading paths, with errors that tell the user what to change."""
    if model.startswith(SCHEMA_PREFIXES):
        try:
            return open_clip.create_model(model, device=device)
        except Exception as err:
            raise TeacherLoadError(
                f"could not load teacher {model!r}: {err}. Without internet the repo must already be in the local "
                "Hugging Face cache (HF_HUB_CACHE); otherwise set teacher.model to the architecture name and "
                "teacher.pretrained to a local checkpoint file"
            ) from err
    check_teacher_source(model, pretrained)
    if pretrained is None:
        log.warning("teacher %s has random weights (pretrained is null)", model)
        return open_clip.create_model(model, device=device)
    if is_checkpoint_path(pretrained):
        path = Path(pretrained).expanduser()
        quick_gelu, openai = checkpoint_activation(model, path)
        if quick_gelu:
            log.info("teacher checkpoint %s loads into %s with QuickGELU%s", path, model,
                     f" ({openai})" if openai else "")
        try:
            if openai:
                return _load_openai_release(model, path, device)
            return open_clip.create_model(model, pretrained=str(path), device=device, force_quick_gelu=quick_gelu)
        except Exception as err:
            raise TeacherLoadError(f"teacher checkpoint {path} could not be loaded into {model}: {err}") from err
    # OpenAI's weights were trained with QuickGELU; open_clip only warns when the architecture config disagrees
    quick_gelu = bool(open_clip.get_pretrained_cfg(model, pretrained).get("quick_gelu", False))
    try:
        return open_clip.create_model(model, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu)
    except Exception as err:
        raise TeacherLoadError(
            f"pretrained weights {model}/{pretrained} could not be fetched ({err}). On a machine without internet, "
            f"download them elsewhere (open_clip.create_model({model!r}, pretrained={pretrained!r}) caches them "
            "under ~/.cache/huggingface) and set teacher.pretrained to the local checkpoint file "
            "(.pt, .bin or .safetensors), or copy the Hugging Face cache over and set HF_HUB_OFFLINE=1"
        ) from err


def _as_teacher(model: nn.Module, model_name: str, device: torch.device) -> Teacher:
    """Freeze the model and read size/mean/std from its preprocess config, the embedding dim from its output."""
    model = model.to(device).eval().requires_grad_(False)
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp["size"]
    image_size = int(size if isinstance(size, int) else max(size))
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        embed_dim = int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])
    return Teacher(
        model=model,
        tokenizer=tokenizer,
        model_name=model_name,
        image_size=image_size,
        mean=tuple(float(m) for m in pp["mean"]),  # type: ignore[arg-type]
        std=tuple(float(s) for s in pp["std"]),  # type: ignore[arg-type]
        embed_dim=embed_dim,
    )


def create_teacher(model: str, pretrained: str | None, device: torch.device) -> Teacher:
    """Build the frozen teacher.

    ``model`` is an open_clip architecture name (then ``pretrained`` is a tag, a local checkpoint path, or None for
    random weights) or an ``hf-hub:org/repo`` / ``local-dir:/path`` id (then ``pretrained`` is ignored).
    """
    register_model_configs()
    if not model.startswith(SCHEMA_PREFIXES):
        model = model.replace("/", "-")  # OpenAI spelling (ViT-B/16) of open_clip names (ViT-B-16)
    return _as_teacher(_create_open_clip(model, pretrained, device), model, device)


# --------------------------------------------------------------------------------------------------- save / load
def _registry_name(model_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name).strip("-")


def save_teacher(teacher_or_model: Teacher | nn.Module, model_name: str, out_dir: Path) -> Path:
    """Store weights and config in open_clip's hf-hub layout (``open_clip_config.json`` + safetensors).

    The folder loads back with :func:`load_saved_teacher`, with open_clip as ``local-dir:<out_dir>``, or as a Hugging
    Face repo once uploaded. ``<name>.json`` next to them is the bare architecture, the form open_clip's registry reads.
    """
    register_model_configs()
    model = teacher_or_model.model if isinstance(teacher_or_model, Teacher) else teacher_or_model
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(f"open_clip knows no model config named {model_name!r}; cannot save the teacher")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = _registry_name(model_name)
    config = {"model_name": name, "model_cfg": model_cfg, "preprocess_cfg": open_clip.get_model_preprocess_cfg(model)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out_dir / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
    atomic_write(out_dir / f"{name}.json", lambda p: p.write_text(json.dumps(model_cfg, indent=2)))
    atomic_write(out_dir / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2)))
    return out_dir


def load_saved_teacher(out_dir: Path, device: torch.device) -> Teacher:
    """Load a :func:`save_teacher` folder: register its architecture with open_clip, then load the weights file
    through open_clip's checkpoint path, exactly like a user's local checkpoint."""
    out_dir = Path(out_dir)
    config_path = out_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"saved teacher config {config_path} is missing; run the teacher stage again")
    config = json.loads(config_path.read_text())
    name = config["model_name"]
    register_model_configs()
    if name not in open_clip.list_models():
        open_clip.add_model_config(out_dir / f"{name}.json")
    if open_clip.get_model_config(name) != config["model_cfg"]:
        raise TeacherLoadError(
            f"the teacher saved in {out_dir} is not the architecture open_clip now calls {name!r}; "
            "run the teacher stage again"
        )
    model = _create_open_clip(name, str(out_dir / WEIGHTS_FILE), device)
    preprocess = {**open_clip.get_model_preprocess_cfg(model), **config["preprocess_cfg"]}
    open_clip.set_model_preprocess_cfg(model, preprocess)
    return _as_teacher(model, name, device)


# ------------------------------------------------------------------------------------------------- pre-training
def images_to_tensor(images: np.ndarray | torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,size,size] in [0,1] on ``device`` (antialiased bicubic when resizing)."""
    x = torch.as_tensor(np.asarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
    return x


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flips, quarter turns, mild brightness/contrast: nothing leaves the frame and no hue moves, so captions hold."""
    n = x.shape[0]
    draws = torch.rand(n, 4, generator=generator).to(x.device)
    turns = torch.stack([x.rot90(k, dims=(-2, -1)) for k in range(4)])
    x = turns[(draws[:, 0] * 4).long().clamp(max=3), torch.arange(n, device=x.device)]
    x = torch.where((draws[:, 1] < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
    brightness = (1 + 0.2 * (draws[:, 2] - 0.5)).view(-1, 1, 1, 1)
    contrast = (1 + 0.3 * (draws[:, 3] - 0.5)).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean * brightness).clamp(0, 1)


def _cosine_with_warmup(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class _CaptionSampler:
    """Caption augmentation that keeps captions true: with probability ``prob`` a caption is swapped for a short one
    naming a single class that it mentions. Web captions often name one thing; without such captions a small text
    encoder never learns what a lone class name (a prompt like "a photo of a star.") means."""

    def __init__(self, captions: list[str], class_names: list[str], prob: float, tokenizer: Callable, device):
        self.full = tokenizer(list(captions)).to(device)
        prompts = [t.format(name) for name in class_names for t in SINGLE_CLASS_TEMPLATES]
        self.prompts = tokenizer(prompts).to(device) if prompts else self.full[:0]
        per_class = len(SINGLE_CLASS_TEMPLATES)
        patterns = [re.compile(rf"(?<!\w){re.escape(name)}(?!\w)", re.IGNORECASE) for name in class_names]
        self.options = [
            [k * per_class + t for k, pat in enumerate(patterns) if pat.search(c) for t in range(per_class)]
            for c in captions
        ]
        self.prob = prob

    def __call__(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        tokens = self.full[idx].clone()
        draws = torch.rand(len(idx), 2, generator=generator).tolist()
        for row, (i, (swap, pick)) in enumerate(zip(idx.tolist(), draws, strict=True)):
            if swap < self.prob and self.options[i]:
                tokens[row] = self.prompts[self.options[i][int(pick * len(self.options[i]))]]
        return tokens


def _run_signature(model_name: str, images: np.ndarray, captions: list[str], **hyper: Any) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed (the epoch count may grow)."""
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    digest.update("\n".join(captions).encode())
    return {"model_name": model_name, "data": digest.hexdigest()[:16], **hyper}


def pretrain_synthetic(
    model_name: str,
    images: np.ndarray,
    captions: list[str],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    device: torch.device,
    workdir: Path,
    checkpoint_every: int = 1,
    class_names: list[str] | None = None,
    single_class_prob: float = 0.25,
) -> tuple[nn.Module, list[float]]:
    """Train ``model_name`` from scratch with open_clip's contrastive loss on (image, caption) pairs.

    Augmentation keeps captions true: flips, quarter turns and mild brightness/contrast on the images and, when
    ``class_names`` are given, single-class captions (see :class:`_CaptionSampler`) with ``single_class_prob``.
    AdamW with a one-epoch linear warmup then cosine decay. Every ``checkpoint_every`` epochs the full state goes to
    ``workdir/last.pt`` (atomically); a later call with the same data and hyper-parameters resumes from it. All
    randomness of an epoch comes from a generator seeded by (seed, epoch), so a resumed run repeats exactly what an
    uninterrupted one would have done. Returns the frozen, eval-mode model and the mean loss of every epoch.
    """
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if len(images) < 2:
        raise ValueError("contrastive pre-training needs at least 2 images")
    register_model_configs()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name, load_weights=False, device=device)
    tokenizer = open_clip.get_tokenizer(model_name)
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp["size"] if isinstance(pp["size"], int) else max(pp["size"])
    pixels = images_to_tensor(images, size, device)
    sampler = _CaptionSampler(list(captions), list(class_names or []), single_class_prob, tokenizer, device)

    n = len(images)
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size  # drop the ragged tail: contrastive batches should be full
    total = epochs * steps_per_epoch
    no_decay = [p for name, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in name]
    decay = [p for name, p in model.named_parameters() if not (p.ndim < 2 or "logit_scale" in name)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _cosine_with_warmup(total, min(steps_per_epoch, max(1, total // 5)))
    )
    loss_fn = open_clip.ClipLoss()
    signature = _run_signature(
        model_name, images, captions, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
        class_names=list(class_names or []), single_class_prob=single_class_prob,
    )  # fmt: skip

    resume_path = workdir / RESUME_FILE
    start, history = 0, []
    if resume_path.is_file():
        state = torch.load(resume_path, map_location=device, weights_only=True)
        if state["signature"] != signature:
            raise ValueError(
                f"{resume_path} belongs to another pre-training run ({state['signature']} != {signature}); "
                "delete it or use another work directory"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = int(state["epoch"]), list(state["history"])
        log.info("resuming teacher pre-training from %s at epoch %d of %d", resume_path, start, epochs)

    for epoch in range(start, epochs):
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=generator).to(device)
        model.train()
        running = 0.0
        for step in track(range(steps_per_epoch), f"teacher pre-training epoch {epoch + 1}/{epochs}", unit="batch"):
            idx = order[step * batch_size : (step + 1) * batch_size]
            x = normalize_images(_augment(pixels[idx], generator), pp["mean"], pp["std"])
            image_features, text_features, logit_scale = model(x, sampler(idx, generator))[:3]
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # as open_clip's training does
            running += loss.item()
        history.append(running / steps_per_epoch)
        if (epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs:
            state = {
                "signature": signature,
                "epoch": epoch + 1,
                "history": history,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            }
            atomic_write(resume_path, lambda p: torch.save(state, p))
    return model.eval().requires_grad_(False), history


# ---------------------------------------------------------------------------------------------------- retrieval
@torch.no_grad()
def encode_images(teacher: Teacher, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings [N, D] of uint8 [N,H,W,3] images."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images_to_tensor(images[i : i + batch_size], teacher.image_size, teacher.device)
        embedded = teacher.model.encode_image(normalize_images(x, teacher.mean, teacher.std))
        out.append(F.normalize(embedded.float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def encode_texts(teacher: Teacher, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings [N, D]."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = teacher.tokenizer(texts[i : i + batch_size]).to(teacher.device)
        out.append(F.normalize(teacher.model.encode_text(tokens).float(), dim=-1))
    return torch.cat(out)


def retrieval_top1(teacher: Teacher, images: np.ndarray, captions: list[str]) -> dict[str, float]:
    """Image-to-text retrieval over the given set; a hit is a retrieved caption whose text equals the image's own.

    ``chance`` is the expected top-1 of a random pick, which counts duplicate captions the same way.
    """
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    similarity = encode_images(teacher, images) @ encode_texts(teacher, captions).T
    retrieved = similarity.argmax(dim=1).cpu().numpy()
    caps = np.asarray(captions, dtype=object)
    same = caps[:, None] == caps[None, :]
    return {"top1": float(same[np.arange(len(caps)), retrieved].mean()), "chance": float(same.mean())}
