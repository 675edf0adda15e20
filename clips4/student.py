"""The student: a fully convolutional pixel encoder with unit-length d-dim output (docs/method.md §1).

d equals the teacher's joint embedding dim, so student pixels compare directly with CLIP text and pixel embeddings.
Two backbones: a small CNN for the synthetic world (cheap enough for CPU training) and torchvision ResNet-50/101
with dilation (output stride 8) for real data. Both end in the HSG-style head conv-BN-ReLU-conv (1x1).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from clips4.atomic import atomic_write
from clips4.checkpoints import unwrap_state_dict
from clips4.data.prepare import normalize_images, to_unit_images

StudentName = Literal["small_cnn", "resnet50", "resnet101"]
DEFAULT_CONTEXT = (1, 1)
RESNET_HEAD_HIDDEN = 512
# torchvision's ImageNet weights of each ResNet student; train.backbone_weights takes the file their url names.
IMAGENET_WEIGHTS = {
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
    "resnet101": torchvision.models.ResNet101_Weights.IMAGENET1K_V2,
}


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Output stride 2: a stride-2 branch for detail and a stride-4 context branch, fused FPN-style.

    A 64px view gives a 32x32 map, enough resolution for superpixel-sized segments, at a cost that trains on CPU.
    ``context`` holds the dilation of each 3x3 conv of the context branch after its stride-2 conv; it sets the
    receptive field, 15 + 8 x sum(context) px (31 px for the default (1, 1); the 71 px of (1, 2, 4) spans a whole
    demo image). Kept small on purpose: a student that sees the whole image can learn the teacher's context-dependent
    confusions (a thing read as the ground it lies on); one that sees only the neighbourhood learns what the teacher
    says about that look on average over every context it appears in.
    """

    def __init__(self, width: int = 64, context: Sequence[int] = DEFAULT_CONTEXT) -> None:
        super().__init__()
        if not context or min(context) < 1:
            raise ValueError(f"small_cnn context dilations must be a non-empty list of positive ints, got {context}")
        half = max(width // 2, 8)
        self.fine = nn.Sequential(conv_bn_relu(3, half, stride=2), conv_bn_relu(half, half))
        self.coarse = nn.Sequential(
            conv_bn_relu(half, width, stride=2), *(conv_bn_relu(width, width, dilation=d) for d in context)
        )
        self.out_channels = half + width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fine = self.fine(x)
        coarse = F.interpolate(self.coarse(fine), size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([fine, coarse], dim=1)


class ResNetTrunk(nn.Module):
    """torchvision ResNet up to layer4, dilated in layers 3-4 so the output stride is 8."""

    def __init__(self, depth: Literal[50, 101], weights: Path | None = None) -> None:
        super().__init__()
        factory = torchvision.models.resnet50 if depth == 50 else torchvision.models.resnet101
        net = factory(weights=None, replace_stride_with_dilation=[False, True, True])
        if weights is not None:
            load_backbone_weights(net, Path(weights), f"resnet{depth}")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)
        self.out_channels = net.fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))


def imagenet_weights_hint(student: str) -> str:
    """Where a ResNet student's ImageNet weights come from and how to give them (the file is never downloaded here)."""
    return (f"download torchvision's ImageNet weights ({IMAGENET_WEIGHTS[student].url}) and set "
            "train.backbone_weights to that file")


def load_backbone_weights(net: nn.Module, path: Path, student: str) -> None:
    """Load a local torchvision ResNet state dict, as torchvision saves it (its classifier `fc.*` is not needed)."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} does not exist; {imagenet_weights_hint(student)}, "
                                "or set it to null for random initialisation")
    wrong = f"backbone weights file {path} is not {student} weights"
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - no torch file, a pickled whole model, ...: the same fix for the user
        raise ValueError(f"{wrong} (torch.load reads no state dict from it: {type(err).__name__}); "
                         f"{imagenet_weights_hint(student)}") from None
    state = unwrap_state_dict(loaded)
    if state is None:
        raise ValueError(f"{wrong} (it holds a {type(loaded).__name__}, not a state dict); "
                         f"{imagenet_weights_hint(student)}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches, one line each
        shapes = [line.strip().rstrip(".") for line in str(err).splitlines() if "size mismatch" in line] or [str(err)]
        more = f" and {len(shapes) - 1} more" if len(shapes) > 1 else ""
        raise ValueError(f"{wrong} ({shapes[0]}{more}); {imagenet_weights_hint(student)}") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"{wrong} (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                         f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}); {imagenet_weights_hint(student)}")


@dataclass(frozen=True)
class Preprocessing:
    """How images become the student's input: the side of its square training views (test scales multiply it) and
    the teacher's pixel normalisation, so student and teacher read the same pixels the same way."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_dict(cls, values: Mapping) -> Preprocessing:
        return cls(int(values["input_size"]), tuple(map(float, values["mean"])), tuple(map(float, values["std"])))  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std)}


class PixelEncoder(nn.Module):
    """backbone -> head (conv-BN-ReLU-conv 1x1) -> L2 normalisation over channels.

    `stride` is the output stride (input side / map side). `split_head_lr` says whether the head trains with its own
    learning-rate multiplier (a pretrained-style backbone) or everything shares one rate (the small CNN).
    `preprocessing` travels with the weights (:func:`save_student`), so whoever loads a student feeds it as it was
    trained; `arch` is what :func:`build_student` needs to rebuild it.
    """

    def __init__(self, backbone: nn.Module, channels: int, hidden: int, out_dim: int, stride: int,
                 split_head_lr: bool, preprocessing: Preprocessing, arch: dict[str, str]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_dim, 1),
        )
        self.stride = stride
        self.out_dim = out_dim
        self.split_head_lr = split_head_lr
        self.preprocessing = preprocessing
        self.arch = arch
        # Not in the state dict: the weights file's metadata holds them, as numbers a reader can see.
        self.register_buffer("pixel_mean", torch.tensor(preprocessing.mean), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(preprocessing.std), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unit embeddings [B,D,h,w] of normalised images [B,3,H,W] (:meth:`normalize`)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"student expects images of shape [B,3,H,W], got {tuple(images.shape)}")
        return F.normalize(self.head(self.backbone(images)), dim=1)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] [B,3,H,W] -> the student's input (the teacher's normalisation)."""
        return normalize_images(images, self.pixel_mean, self.pixel_std)

    @torch.no_grad()
    def embed(self, images: np.ndarray, batch_size: int = 16) -> torch.Tensor:
        """Unit embeddings float32 [B,D,h,w] (on the CPU) of uint8 RGB images [B,H,W,3], in eval mode."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"the student embeds uint8 RGB images [B,H,W,3], got shape {images.shape}")
        was_training, device = self.training, self.pixel_mean.device
        self.eval()
        out = [self(self.normalize(to_unit_images(images[i : i + batch_size], device))).float().cpu()
               for i in range(0, len(images), batch_size)]
        self.train(was_training)
        return torch.cat(out)

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """Optimiser parameter groups: backbone at `lr`, head at `lr * head_lr_mult` (one group for the small CNN)."""
        if not self.split_head_lr:
            return [{"params": list(self.parameters()), "lr": lr}]
        return [
            {"params": list(self.backbone.parameters()), "lr": lr},
            {"params": list(self.head.parameters()), "lr": lr * head_lr_mult},
        ]


def build_student(name: StudentName, out_dim: int, preprocessing: Preprocessing, *, width: int = 64,
                  backbone_weights: Path | None = None, context: Sequence[int] = DEFAULT_CONTEXT) -> PixelEncoder:
    """The pixel encoder named in the config (``width`` and ``context``: small_cnn only); ResNet weights come only
    from a local file (never downloaded)."""
    arch = {"student": name, "out_dim": str(out_dim), "width": str(width), "context": json.dumps(list(context))}
    if out_dim < 1:
        raise ValueError(f"student out_dim must be positive, got {out_dim}")
    if name == "small_cnn":
        if backbone_weights is not None:
            raise ValueError("train.backbone_weights applies to ResNet students only; set it to null for small_cnn")
        trunk = SmallCNN(width, context)
        return PixelEncoder(trunk, trunk.out_channels, width, out_dim, stride=2, split_head_lr=False,
                            preprocessing=preprocessing, arch=arch)
    if name in ("resnet50", "resnet101"):
        trunk = ResNetTrunk(50 if name == "resnet50" else 101, backbone_weights)
        return PixelEncoder(trunk, trunk.out_channels, RESNET_HEAD_HIDDEN, out_dim, stride=8, split_head_lr=True,
                            preprocessing=preprocessing, arch=arch)
    raise ValueError(f"unknown student {name!r}; choose small_cnn, resnet50 or resnet101")


def save_student(model: PixelEncoder, path: Path, step: int) -> None:
    """Weights as safetensors; the metadata holds how to rebuild the network and how to feed it."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {**model.arch, "preprocessing": json.dumps(model.preprocessing.to_dict()), "step": str(step)}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def load_student(path: Path, device: torch.device, preprocessing: Preprocessing | None = None) -> PixelEncoder:
    """Rebuild a trained student from its weights file (:func:`save_student`), in eval mode. ``preprocessing`` is
    used only for files whose metadata lacks it (written before the student carried it)."""
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if not {"student", "width", "context", "out_dim"} <= meta.keys():
        raise ValueError(f"{path} has no clips4 student metadata (student, width, context, out_dim); it was not "
                         "written by this version of clips4: train it again")
    if "preprocessing" in meta:
        preprocessing = Preprocessing.from_dict(json.loads(meta["preprocessing"]))
    elif preprocessing is None:
        raise ValueError(f"{path} does not say how its images were normalised (no preprocessing metadata); "
                         "load it through its train artifact, whose student.json says it, or train it again")
    model = build_student(meta["student"], int(meta["out_dim"]), preprocessing,  # type: ignore[arg-type]
                          width=int(meta["width"]), context=json.loads(meta["context"]))
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()
