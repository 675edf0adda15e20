"""MaskCLIP dense features: CLS parity with encode_image, the value-path modification, shapes, text, refinements."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clips4.maskclip import (
    SCENE_TEMPLATES,
    _positional_embedding,
    cls_embedding,
    dense_features,
    extract_dense,
    maskclip_logits,
    prompt_templates,
    text_embeddings,
)

TEXT_CFG = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)
TINY_VISION = {
    "vit": dict(image_size=32, patch_size=8, width=48, layers=2, head_width=16),
    "rn": dict(image_size=64, layers=[1, 1, 1, 1], width=8, head_width=8),
}


def tiny_clip(kind: str) -> open_clip.CLIP:
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=24, vision_cfg=TINY_VISION[kind], text_cfg=TEXT_CFG).eval()


@pytest.fixture(scope="module", params=["ViT-B-16", "RN50"])
def released_architecture(request, tmp_path_factory):
    """A full-size open_clip architecture with random weights, saved locally and loaded back as a pretrained file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / f"{request.param}.pt"
    torch.save(open_clip.create_model(request.param, pretrained=None).state_dict(), path)
    model, _, _ = open_clip.create_model_and_transforms(request.param, pretrained=str(path))
    path.unlink()
    return model.eval()


@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_cls_path_equals_encode_image_tiny(kind):
    model = tiny_clip(kind)
    size = TINY_VISION[kind]["image_size"]
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model.encode_image(images)
    torch.testing.assert_close(cls_embedding(model, images), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_released_architecture_cls_parity_and_dense_shape(released_architecture):
    model = released_architecture
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model.encode_image(images)
    torch.testing.assert_close(cls_embedding(model, images), expected, atol=1e-5, rtol=0)
    out = dense_features(model, torch.randn(1, 3, 96, 64))
    stride = 16 if isinstance(model.visual, open_clip.transformer.VisionTransformer) else 32
    assert out.features.shape == (1, 96 // stride, 64 // stride, model.visual.output_dim)
    torch.testing.assert_close(out.features.norm(dim=-1), torch.ones(out.features.shape[:3]))


def test_vit_dense_is_the_value_path_of_the_last_block():
    """With attention forced onto the diagonal, open_clip's own last block computes exactly MaskCLIP's value path."""
    model = tiny_clip("vit")
    visual = model.visual
    images = torch.randn(2, 3, 32, 32)
    last = visual.transformer.resblocks[-1]
    with torch.no_grad():
        x = visual._embeds(images)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        n, width = x.shape[1:]
        keys = F.linear(last.ln_1(x), last.attn.in_proj_weight, last.attn.in_proj_bias)[:, 1:, width : 2 * width]
        diagonal_only = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
        x = last(x, attn_mask=diagonal_only)
        expected = F.normalize(visual.ln_post(x)[:, 1:] @ visual.proj, dim=-1).reshape(2, 4, 4, -1)
    out = dense_features(model, images)
    torch.testing.assert_close(out.features, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.keys, keys.reshape(2, 4, 4, width), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("kind", "size", "grid"), [("vit", (40, 24), (5, 3)), ("rn", (96, 160), (3, 5))])
def test_dense_shape_on_non_square_non_native_input(kind, size, grid):
    model = tiny_clip(kind)
    out = dense_features(model, torch.randn(2, 3, *size))
    assert out.features.shape == (2, *grid, 24) and out.features.dtype == torch.float32
    torch.testing.assert_close(out.features.norm(dim=-1), torch.ones(2, *grid))
    assert (out.keys is None) == (kind == "rn")
    if kind == "vit":
        assert out.keys.shape == (2, *grid, 48)


def test_positional_embedding_interpolation_keeps_cls_and_native_table():
    visual = tiny_clip("vit").visual
    native = _positional_embedding(visual, 4, 4)
    assert native is visual.positional_embedding
    resized = _positional_embedding(visual, 6, 2)
    assert resized.shape == (1 + 12, 48)
    torch.testing.assert_close(resized[0], visual.positional_embedding[0])


def test_unsupported_tower_and_bad_sizes_are_refused():
    holder = nn.Module()
    holder.visual = nn.Identity()
    with pytest.raises(TypeError, match="Identity"):
        dense_features(holder, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="divisible by 8"):
        dense_features(tiny_clip("vit"), torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="divisible by 32"):
        dense_features(tiny_clip("rn"), torch.randn(1, 3, 48, 64))


def test_prompt_templates():
    scene, plain = prompt_templates(), prompt_templates(scene=False)
    assert len(plain) == 80 and len(scene) == 85
    assert scene[-5:] == list(SCENE_TEMPLATES) and scene[:80] == plain
    assert all(t.count("{}") == 1 for t in scene)
    assert plain[0].format("cat") == "a bad photo of a cat."


def test_text_embeddings_average_normalised_prompts_over_templates_and_synonyms():
    model = tiny_clip("vit")
    tokenize = open_clip.get_tokenizer("ViT-B-16", context_length=16)
    synonyms = [["cat", "kitty"], ["dog"]]
    templates = ["a photo of a {}.", "a {} in the scene.", "{}"]
    text = text_embeddings(model, tokenize, synonyms, templates, batch_size=4)

    def encode(prompts):
        with torch.no_grad():
            return F.normalize(model.encode_text(tokenize(prompts)), dim=-1)

    expected = torch.stack(
        [F.normalize(encode([t.format(n) for n in names for t in templates]).mean(0), dim=0) for names in synonyms]
    )
    assert text.shape == (2, 24) and text.dtype == torch.float32
    torch.testing.assert_close(text, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="placeholder"):
        text_embeddings(model, tokenize, synonyms, ["no placeholder"])
    with pytest.raises(ValueError, match="at least one name"):
        text_embeddings(model, tokenize, [["cat"], []], templates)


def _features_and_text():
    text = torch.eye(3, 4)
    features = torch.zeros(1, 2, 2, 4)
    features[0, 0, 0, 0] = features[0, 0, 1, 0] = features[0, 1, 0, 1] = 1.0
    features[0, 1, 1] = F.normalize(torch.tensor([1.0, 1.0, 0.2, 0.0]), dim=0)
    return features, text


def test_maskclip_logits_are_scaled_cosines():
    features, text = _features_and_text()
    logits = maskclip_logits(features, text)
    assert logits.shape == (1, 3, 2, 2)
    torch.testing.assert_close(logits, 100 * torch.einsum("bhwd,kd->bkhw", features, text))


def test_prompt_denoise_drops_classes_that_are_never_confident():
    features, text = _features_and_text()
    logits = maskclip_logits(features, text, prompt_denoise=True)
    assert torch.isinf(logits[0, 2]).all()  # class 2 never reaches probability 0.5
    assert torch.isfinite(logits[0, :2]).all()
    weak = torch.full((1, 1, 1, 4), 0.5)  # every class equally likely: only the most confident one survives
    kept = torch.isfinite(maskclip_logits(weak, text, prompt_denoise=True)[0, :, 0, 0])
    assert kept.sum() == 1


def test_key_smoothing():
    features, text = _features_and_text()
    probs = maskclip_logits(features, text).softmax(dim=1)
    one_hot_keys = torch.eye(4).reshape(1, 2, 2, 4)  # K̂K̂ᵀ = I: nothing changes
    torch.testing.assert_close(maskclip_logits(features, text, one_hot_keys, key_smoothing=True), probs)
    same_keys = torch.ones(1, 2, 2, 5)  # K̂K̂ᵀ = all ones: every location gets the image's summed probabilities
    smoothed = maskclip_logits(features, text, same_keys, key_smoothing=True)
    torch.testing.assert_close(smoothed, probs.sum(dim=(2, 3), keepdim=True).expand_as(smoothed))
    both = maskclip_logits(features, text, same_keys, key_smoothing=True, prompt_denoise=True)
    assert torch.isinf(both[0, 2]).all() and torch.isfinite(both[0, :2]).all()
    with pytest.raises(ValueError, match="keys"):
        maskclip_logits(features, text, key_smoothing=True)


def test_extract_dense_batches_to_cpu_float16():
    model = tiny_clip("vit")
    images = torch.randn(5, 3, 32, 48)
    out = extract_dense(model, images, batch_size=2, device=torch.device("cpu"))
    reference = dense_features(model, images)
    assert out.features.dtype == torch.float16 and out.keys.dtype == torch.float16
    torch.testing.assert_close(out.features.float(), reference.features, atol=2e-3, rtol=0)
    torch.testing.assert_close(out.keys.float(), reference.keys, atol=1e-2, rtol=1e-2)
    assert extract_dense(model, images[:1], 2, torch.device("cpu"), with_keys=False).keys is None


def test_cls_parity_for_token_average_pooling() -> None:
    """A ViT pooled by averaging tokens (as the synthetic teacher may be) keeps CLS-path parity and a dense path."""
    import open_clip

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8, "pool_type": "avg"},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    model = open_clip.model.CLIP(**cfg).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(cls_embedding(model, images), model.encode_image(images), atol=1e-5, rtol=1e-5)
        assert dense_features(model, images).features.shape == (2, 4, 4, 32)
