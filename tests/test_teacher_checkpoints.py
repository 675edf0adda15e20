"""Teacher checkpoints as users have them: OpenAI's release (a TorchScript archive, or a state dict of it) loads with
the QuickGELU it was trained with, open_clip state dicts with the activation their name or folder config says."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import convert_weights_to_lp
from open_clip.transformer import QuickGELU
from torch import nn

from clips4.teacher import TeacherLoadError, check_teacher_source, create_teacher, save_teacher

CPU = torch.device("cpu")
SMALL = "clips4-test-release"  # a micro CLIP, so the logic is tested in the fast loop
SMALL_QUICKGELU = f"{SMALL}-quickgelu"
SMALL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
FORMS = ("torchscript", "openai_state_dict", "open_clip_state_dict")


class OpenAILayout(nn.Module):
    """An open_clip CLIP laid out as OpenAI's release: the towers at the top level, plus the input_resolution,
    context_length and vocab_size entries of OpenAI's archives (open_clip keeps the same names for everything else)."""

    def __init__(self, clip: nn.Module, image_size: int) -> None:
        super().__init__()
        for name, child in clip.named_children():
            setattr(self, name, child)
        for name, param in clip.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.register_buffer("input_resolution", torch.tensor(image_size))
        self.register_buffer("context_length", torch.tensor(clip.context_length))
        self.register_buffer("vocab_size", torch.tensor(clip.vocab_size))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def release(arch: str, image_size: int, folder: Path) -> tuple[nn.Module, dict[str, Path]]:
    """A random QuickGELU CLIP in fp16 (as OpenAI ships it) written in every form; returns it in fp32, frozen."""
    torch.manual_seed(0)
    clip = open_clip.create_model(arch, force_quick_gelu=True).eval()
    convert_weights_to_lp(clip)
    laid_out = OpenAILayout(clip, image_size)
    paths = {form: folder / f"{arch}-{form}.pt" for form in FORMS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, and still how OpenAI ships CLIP
        torch.jit.save(torch.jit.script(laid_out), paths["torchscript"])
    torch.save(laid_out.state_dict(), paths["openai_state_dict"])
    clip.float().requires_grad_(False)
    torch.save(clip.state_dict(), paths["open_clip_state_dict"])
    return clip, paths


def activations(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if isinstance(m, (QuickGELU, nn.GELU))}


@torch.no_grad()
def outputs(model: nn.Module, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    text = open_clip.tokenize(["a photo of a kite."], context_length=model.context_length)
    return model.encode_image(image), model.encode_text(text)


def assert_same_outputs(model: nn.Module, reference: nn.Module | tuple[torch.Tensor, ...], image_size: int) -> None:
    """``reference``: a model, or its :func:`outputs`."""
    want = outputs(reference, image_size) if isinstance(reference, nn.Module) else reference
    for got, expected in zip(outputs(model, image_size), want, strict=True):
        assert torch.equal(got, expected)


def with_gelu(clip: nn.Module, arch: str) -> nn.Module:
    """The same weights in the GELU build of ``arch``: what an open_clip state dict of them loads as."""
    gelu = open_clip.create_model(arch).eval().requires_grad_(False)
    gelu.load_state_dict(clip.state_dict())
    return gelu


# ------------------------------------------------------------------------------------------ the logic, on a micro CLIP
@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[nn.Module, dict[str, Path]]:
    folder = tmp_path_factory.mktemp("release")
    (folder / f"{SMALL}.json").write_text(json.dumps(SMALL_CFG))
    (folder / f"{SMALL_QUICKGELU}.json").write_text(json.dumps({**SMALL_CFG, "quick_gelu": True}))
    open_clip.add_model_config(folder)
    return release(SMALL, 32, folder)


@pytest.mark.parametrize("name", [SMALL, SMALL_QUICKGELU])
@pytest.mark.parametrize("form", ["torchscript", "openai_state_dict"])
def test_openai_release_loads_with_quick_gelu(small, form, name):
    clip, paths = small
    teacher = create_teacher(name, str(paths[form]), CPU)
    assert activations(teacher.model) == {"QuickGELU"}
    assert_same_outputs(teacher.model, clip, 32)


def test_openai_state_dict_wrapped_as_a_training_checkpoint(small, tmp_path):
    clip, paths = small
    path = tmp_path / "wrapped.pt"
    state = torch.load(paths["openai_state_dict"], weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    assert activations(create_teacher(SMALL, str(path), CPU).model) == {"QuickGELU"}


def test_open_clip_state_dict_takes_the_activation_its_name_says(small):
    clip, paths = small
    gelu = create_teacher(SMALL, str(paths["open_clip_state_dict"]), CPU)
    assert activations(gelu.model) == {"GELU"}
    assert_same_outputs(gelu.model, with_gelu(clip, SMALL), 32)
    quick = create_teacher(SMALL_QUICKGELU, str(paths["open_clip_state_dict"]), CPU)
    assert activations(quick.model) == {"QuickGELU"}
    assert_same_outputs(quick.model, clip, 32)


def test_hf_hub_folder_config_records_the_activation(small, tmp_path):
    clip, _ = small
    gelu_folder = save_teacher(with_gelu(clip, SMALL), SMALL, tmp_path / "gelu")
    weights = gelu_folder / "open_clip_model.safetensors"
    for check in (check_teacher_source, lambda m, p: create_teacher(m, p, CPU)):
        with pytest.raises(TeacherLoadError, match=rf"{SMALL_QUICKGELU} uses QuickGELU.*quick_gelu=false.*{SMALL}\)"):
            check(SMALL_QUICKGELU, str(weights))
    quick_folder = save_teacher(clip, SMALL_QUICKGELU, tmp_path / "quick")
    teacher = create_teacher(SMALL, str(quick_folder / "open_clip_model.safetensors"), CPU)
    assert activations(teacher.model) == {"QuickGELU"}
    assert_same_outputs(teacher.model, clip, 32)


def test_openai_release_for_another_architecture_is_named(small):
    _, paths = small
    with pytest.raises(TeacherLoadError, match=f"{paths['torchscript']} could not be loaded into clips4-vit-tiny"):
        create_teacher("clips4-vit-tiny", str(paths["torchscript"]), CPU)


def test_a_checkpoint_that_is_no_state_dict_is_named(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(TeacherLoadError, match="tensor.pt holds a Tensor, not a state dict"):
        check_teacher_source("clips4-vit-tiny", str(path))
    pickled = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2), pickled)
    with pytest.raises(TeacherLoadError, match=r"model.pt is not a readable checkpoint \(UnpicklingError: [^\n]*\.\);"):
        check_teacher_source("clips4-vit-tiny", str(pickled))


# ------------------------------------------------------------------------- the real architectures, randomly initialised
@pytest.fixture(scope="module", params=[("ViT-B-16", 224), ("RN50", 224)], ids=["ViT-B-16", "RN50"])
def full_size(request, tmp_path_factory) -> Iterator[tuple[str, int, nn.Module, dict[str, Path], tuple]]:
    """Written once per architecture (hundreds of MB each) and deleted after the module's tests."""
    arch, size = request.param
    clip, paths = release(arch, size, tmp_path_factory.mktemp(arch))
    yield arch, size, clip, paths, outputs(clip, size)
    for path in paths.values():
        path.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_full_size_checkpoints_load_with_their_activation(full_size, form):
    arch, size, clip, paths, expected = full_size
    teacher = create_teacher(arch, str(paths[form]), CPU)
    if form == "open_clip_state_dict":
        assert activations(teacher.model) == {"GELU"}
        expected = outputs(with_gelu(clip, arch), size)
    else:
        assert activations(teacher.model) == {"QuickGELU"}
    assert_same_outputs(teacher.model, expected, size)
