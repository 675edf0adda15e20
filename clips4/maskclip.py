"""MaskCLIP dense features and prompt-ensembled text embeddings of an open_clip teacher (docs/method.md §5).

CLIP's image tower is trained to align one pooled vector with text. MaskCLIP observed that the *value* path of the
last attention block, applied to every patch (ViT) or every layer-4 location (ResNet), lands each location in the
same joint space, so a frozen CLIP gives a dense, text-comparable feature map without any training. Everything here
works on an open_clip ``CLIP`` (or directly on its ``visual`` tower) of any size and any input resolution that the
tower's stride divides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import ResidualAttentionBlock, Transformer, VisionTransformer
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn

SCENE_TEMPLATES: tuple[str, ...] = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
LOGIT_SCALE = 100.0
DENOISE_THRESHOLD = 0.5


@dataclass
class DenseFeatures:
    """Per-location CLIP embeddings ``features`` [B,h,w,D] (unit length); last-block ``keys`` [B,h,w,C] (ViT only)."""

    features: torch.Tensor
    keys: torch.Tensor | None


def _visual(model: nn.Module) -> nn.Module:
    """Accept a CLIP model or its image tower, and refuse towers whose dense path we do not know."""
    visual = getattr(model, "visual", model)
    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg") or visual.final_ln_after_pool:
            raise ValueError(
                "MaskCLIP dense features need a ViT pooled by its class token or by a token average (ln_post "
                "before pooling); this open_clip VisionTransformer pools with "
                f"{'an attentional pooler' if visual.attn_pool is not None else repr(visual.pool_type)}"
            )
        if visual.proj is None:
            raise ValueError("this open_clip VisionTransformer has no output projection (proj is None)")
        last = visual.transformer.resblocks[-1]
        if not isinstance(last, ResidualAttentionBlock) or not last.attn._qkv_same_embed_dim:
            raise ValueError(
                f"MaskCLIP dense features support open_clip's default ResidualAttentionBlock with a packed in_proj, "
                f"not {type(last).__name__}; pick a model config without custom attention blocks"
            )
        return visual
    if isinstance(visual, ModifiedResNet):
        return visual
    raise TypeError(
        f"MaskCLIP dense features support open_clip VisionTransformer and ModifiedResNet towers, not "
        f"{type(visual).__name__} (timm and Hugging Face towers are not supported); choose a native open_clip "
        f"ViT-* or RN* model"
    )


def _check_size(images: torch.Tensor, stride: int, tower: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a float tensor [B,3,H,W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be normalised floats, got dtype {images.dtype}; apply the teacher's mean/std")
    h, w = images.shape[-2:]
    if h % stride or w % stride:
        raise ValueError(f"{tower} needs an input size divisible by {stride}, got {h}x{w}; resize the images first")


# ---------------------------------------------------------------------------------------------------------- ViT
def _positional_embedding(visual: VisionTransformer, h: int, w: int) -> torch.Tensor:
    """The positional table for an ``h`` x ``w`` patch grid: bicubic resize of the patch part, CLS position kept."""
    table = visual.positional_embedding
    gh, gw = visual.grid_size
    if (h, w) == (gh, gw):
        return table
    grid = table[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)
    return torch.cat([table[:1], grid.to(table.dtype).flatten(2).squeeze(0).T], dim=0)


def _run_blocks(transformer: Transformer, x: torch.Tensor, blocks: Sequence[nn.Module]) -> torch.Tensor:
    """Run ``blocks`` on batch-first tokens, honouring the installed open_clip's sequence-first option."""
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    for block in blocks:
        x = block(x)
    return x.transpose(0, 1) if not transformer.batch_first else x


def _vit_trunk(visual: VisionTransformer, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Tokens [B,1+h*w,width] after all blocks but the last, without patch dropout."""
    _check_size(images, visual.patch_size[0], "this ViT")
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    b, _, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(b, 1, -1)
    x = torch.cat([cls, x], dim=1) + _positional_embedding(visual, h, w).to(x.dtype)
    x = visual.ln_pre(x)
    return _run_blocks(visual.transformer, x, visual.transformer.resblocks[:-1]), h, w


def _vit_dense(visual: VisionTransformer, images: torch.Tensor, with_keys: bool) -> DenseFeatures:
    tokens, h, w = _vit_trunk(visual, images)
    block: ResidualAttentionBlock = visual.transformer.resblocks[-1]
    patches = tokens[:, 1:]  # the value path is per token, so the CLS token can be dropped before the last block
    y = block.ln_1(patches)
    width = y.shape[-1]
    weight, bias = block.attn.in_proj_weight, block.attn.in_proj_bias
    v = F.linear(y, weight[2 * width :], None if bias is None else bias[2 * width :])
    x = patches + block.ls_1(block.attn.out_proj(v))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    features = F.normalize((visual.ln_post(x) @ visual.proj).float(), dim=-1)
    keys = None
    if with_keys:
        keys = F.linear(y, weight[width : 2 * width], None if bias is None else bias[width : 2 * width])
        keys = keys.float().reshape(len(x), h, w, width)
    return DenseFeatures(features.reshape(len(x), h, w, -1), keys)


# ------------------------------------------------------------------------------------------------------- ResNet
def _resnet_trunk(visual: ModifiedResNet, images: torch.Tensor) -> torch.Tensor:
    _check_size(images, 32, "this ResNet")
    x = visual.stem(images.to(visual.conv1.weight.dtype))
    return visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))


def _resnet_dense(visual: ModifiedResNet, images: torch.Tensor) -> DenseFeatures:
    x = _resnet_trunk(visual, images).permute(0, 2, 3, 1)
    pool = visual.attnpool
    return DenseFeatures(F.normalize(pool.c_proj(pool.v_proj(x)).float(), dim=-1), None)


# ------------------------------------------------------------------------------------------------------- public
@torch.no_grad()
def dense_features(model: nn.Module, images: torch.Tensor, with_keys: bool = True) -> DenseFeatures:
    """MaskCLIP dense features of normalised ``images`` [B,3,H,W]; the model must be in eval mode (BatchNorm).

    ViT: one feature per patch (h = H/patch), keys of the last block kept when ``with_keys``; ResNet: one feature per
    layer-4 location (h = H/32), no keys. Features are float32 and L2-normalised over the last dim.
    """
    visual = _visual(model)
    if isinstance(visual, VisionTransformer):
        return _vit_dense(visual, images, with_keys)
    return _resnet_dense(visual, images)


def input_stride(model: nn.Module) -> int:
    """The number every input side of the dense path must be a multiple of: a ViT's patch, 32 for a ResNet."""
    visual = _visual(model)
    return int(visual.patch_size[0]) if isinstance(visual, VisionTransformer) else 32


@torch.no_grad()
def cls_embedding(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The image embedding [B,D] through the same token pipeline, unmodified; equals ``model.encode_image``.

    Exists to prove the dense path's plumbing (embedding, positions, blocks, norms, projection) is CLIP's own.
    """
    visual = _visual(model)
    if isinstance(visual, VisionTransformer):
        tokens, _, _ = _vit_trunk(visual, images)
        tokens = _run_blocks(visual.transformer, tokens, visual.transformer.resblocks[-1:])
        normed = visual.ln_post(tokens)  # open_clip normalises before pooling (final_ln_after_pool is refused)
        pooled = normed[:, 0] if visual.pool_type == "tok" else normed[:, 1:].mean(dim=1)
        return pooled @ visual.proj
    return visual.attnpool(_resnet_trunk(visual, images))


def prompt_templates(scene: bool = True) -> list[str]:
    """open_clip's 80 CLIP ImageNet templates (+ MaskCLIP's 5 scene templates) as ``str.format`` strings."""
    templates = [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
    return templates + list(SCENE_TEMPLATES) if scene else templates


@torch.no_grad()
def text_embeddings(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    synonyms: list[list[str]],
    templates: list[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Prompt-ensembled class embeddings [K,D], float32 on the CPU, L2-normalised.

    Every (synonym, template) prompt of a class is encoded and normalised; the class embedding is their mean,
    normalised again (each synonym has the same number of templates, so synonyms weigh equally).
    """
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("templates must be a non-empty list of strings with a '{}' placeholder for the class name")
    empty = [k for k, names in enumerate(synonyms) if not names]
    if not synonyms or empty:
        raise ValueError(f"every class needs at least one name; classes without names: {empty or 'all'}")
    prompts, owner = [], []
    for k, names in enumerate(synonyms):
        for name in names:
            prompts += [t.format(name) for t in templates]
            owner += [k] * len(templates)
    device = next(model.parameters()).device
    encoded = torch.cat(
        [
            F.normalize(model.encode_text(tokenizer(prompts[i : i + batch_size]).to(device)).float(), dim=-1).cpu()
            for i in range(0, len(prompts), batch_size)
        ]
    )
    sums = torch.zeros(len(synonyms), encoded.shape[1]).index_add_(0, torch.tensor(owner), encoded)
    return F.normalize(sums, dim=-1)


def maskclip_logits(
    features: torch.Tensor,
    text: torch.Tensor,
    keys: torch.Tensor | None = None,
    key_smoothing: bool = False,
    prompt_denoise: bool = False,
) -> torch.Tensor:
    """Per-location class scores [B,K,h,w] from dense ``features`` [B,h,w,D] and class embeddings ``text`` [K,D].

    Scores are cosine x 100 (CLIP's logit scale). ``prompt_denoise`` sets a class to -inf in an image when its
    softmax probability stays below 0.5 at every location (the image's most confident class always survives).
    ``key_smoothing`` needs ``keys`` [B,h,w,C] and replaces the softmax probabilities P by (K̂K̂ᵀ)P over the
    image's locations, K̂ the unit keys; the result is then smoothed probabilities rather than logits (argmax and
    bilinear upsampling are unaffected; dropped classes stay -inf).
    """
    if features.ndim != 4 or text.ndim != 2 or features.shape[-1] != text.shape[-1]:
        raise ValueError(
            f"features must be [B,h,w,D] and text [K,D] with the same D, got {tuple(features.shape)} and "
            f"{tuple(text.shape)}"
        )
    features = features.float()
    logits = LOGIT_SCALE * torch.einsum("bhwd,kd->bkhw", features, text.to(features))
    b, k, h, w = logits.shape
    dropped = torch.zeros(b, k, dtype=torch.bool, device=logits.device)
    if prompt_denoise:
        best = logits.softmax(dim=1).flatten(2).amax(dim=2)
        dropped = best < DENOISE_THRESHOLD
        dropped[torch.arange(b), best.argmax(dim=1)] = False
        logits = logits.masked_fill(dropped[:, :, None, None], float("-inf"))
    if key_smoothing:
        if keys is None or keys.shape[:3] != features.shape[:3]:
            raise ValueError(
                "key_smoothing needs the keys [B,h,w,C] of the same images (ViT teachers only; store them with "
                "features.keep_keys)"
            )
        unit = F.normalize(keys.float().flatten(1, 2), dim=-1)
        probs = logits.softmax(dim=1).flatten(2).transpose(1, 2)
        smoothed = unit @ (unit.transpose(1, 2) @ probs)  # (K̂K̂ᵀ)P without the [hw,hw] matrix
        logits = smoothed.transpose(1, 2).reshape(b, k, h, w).masked_fill(dropped[:, :, None, None], float("-inf"))
    return logits


def extract_dense(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int,
    device: torch.device,
    amp: bool = True,
    with_keys: bool = True,
) -> DenseFeatures:
    """Dense features of many images [N,3,H,W] in batches on ``device`` (float16 autocast on CUDA when ``amp``).

    Returns CPU float16 tensors, the storage format of the features stage; the model must already be on ``device``.
    """
    features, keys = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
            out = dense_features(model, batch, with_keys=with_keys)
        features.append(out.features.half().cpu())
        if out.keys is not None:
            keys.append(out.keys.half().cpu())
    return DenseFeatures(torch.cat(features), torch.cat(keys) if keys else None)
