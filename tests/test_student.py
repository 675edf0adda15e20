from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clips4.student import Preprocessing, build_student, load_backbone_weights, load_student, save_student

PRE = Preprocessing(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_small_cnn_gives_unit_stride_two_map_and_trains():
    torch.manual_seed(0)
    model = build_student("small_cnn", 24, PRE, width=16)
    images = torch.randn(3, 3, 64, 64)
    out = model(images)
    assert model.stride == 2
    assert out.shape == (3, 24, 32, 32)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3, 32, 32))
    out[:, 0].sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_small_cnn_uses_one_parameter_group():
    model = build_student("small_cnn", 8, PRE, width=8)
    groups = model.param_groups(lr=0.1, head_lr_mult=10.0)
    assert len(groups) == 1 and groups[0]["lr"] == 0.1
    assert len(groups[0]["params"]) == len(list(model.parameters()))


def test_resnet_student_is_dilated_with_split_learning_rates():
    torch.manual_seed(0)
    model = build_student("resnet50", 16, PRE)
    out = model(torch.randn(2, 3, 64, 64))
    assert model.stride == 8 and out.shape == (2, 16, 8, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 8, 8))
    backbone, head = model.param_groups(lr=0.01, head_lr_mult=10.0)
    assert backbone["lr"] == 0.01 and head["lr"] == pytest.approx(0.1)
    ids = [id(p) for p in backbone["params"]] + [id(p) for p in head["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


@pytest.fixture(scope="module")
def resnet50() -> torchvision.models.ResNet:
    """A torchvision ResNet-50 whose BatchNorm statistics differ from a fresh one's, so loading them shows."""
    torch.manual_seed(1)
    net = torchvision.models.resnet50(weights=None)
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("batch_counts", [True, False], ids=["with", "without-num-batches-tracked"])
def test_resnet_backbone_weights_load_from_a_torchvision_imagenet_file(tmp_path: Path, resnet50, batch_counts: bool):
    """A state dict as torchvision publishes it (resnet50-11ad3fa6.pth): the trunk, its BatchNorm statistics and the
    ImageNet classifier; older files carry no num_batches_tracked."""
    reference = resnet50
    state = {k: v for k, v in reference.state_dict().items() if batch_counts or "num_batches_tracked" not in k}
    assert {"fc.weight", "fc.bias"} <= set(state)
    path = tmp_path / "resnet50-11ad3fa6.pth"
    torch.save(state, path)
    trunk = build_student("resnet50", 8, PRE, backbone_weights=path).backbone
    torch.testing.assert_close(trunk.stem[0].weight, reference.conv1.weight)
    torch.testing.assert_close(trunk.stem[1].running_mean, reference.bn1.running_mean)
    torch.testing.assert_close(trunk.layers[3][2].conv3.weight, reference.layer4[2].conv3.weight)
    torch.testing.assert_close(trunk.layers[3][2].bn3.running_var, reference.layer4[2].bn3.running_var)


def _bad_backbone_file(kind: str, path: Path) -> None:
    if kind == "not-torch":
        path.write_text("not weights")
    elif kind == "pickled-model":
        torch.save(torchvision.models.resnet18(weights=None), path)
    elif kind == "resnet18":
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    elif kind == "partial":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    else:
        torch.save(torch.zeros(3), path)


@pytest.fixture(scope="module")
def scratch() -> torchvision.models.ResNet:
    """A ResNet-50 that refused files may have partly written into."""
    return torchvision.models.resnet50(weights=None)


@pytest.mark.parametrize("kind", ["not-torch", "pickled-model", "resnet18", "partial", "tensor"])
def test_a_wrong_backbone_file_is_one_clear_error(tmp_path: Path, scratch, kind: str):
    path = tmp_path / f"{kind}.pth"
    _bad_backbone_file(kind, path)
    with pytest.raises(ValueError) as refused:
        load_backbone_weights(scratch, path, "resnet50")
    message = str(refused.value)
    assert message.startswith(f"backbone weights file {path} is not resnet50 weights (")
    assert "resnet50-11ad3fa6.pth) and set train.backbone_weights to that file" in message and "\n" not in message


def test_a_missing_backbone_file_is_named(scratch):
    with pytest.raises(FileNotFoundError, match=r"missing.pth does not exist; download torchvision's ImageNet "
                                                r"weights \(https://\S+/resnet101-cd907fc2.pth\)"):
        load_backbone_weights(scratch, Path("missing.pth"), "resnet101")


def test_bad_student_requests_are_refused():
    with pytest.raises(ValueError, match="unknown student"):
        build_student("vgg", 8, PRE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ResNet students only"):
        build_student("small_cnn", 8, PRE, backbone_weights=Path("x.pth"))
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        build_student("small_cnn", 8, PRE, width=8)(torch.zeros(1, 1, 16, 16))


def test_small_cnn_context_sets_the_receptive_field():
    """A pixel's embedding depends on a window of input pixels 15 + 8 x sum(context) px wide."""
    torch.manual_seed(0)
    for context, width in (([1, 1], 31), ([1, 2, 4], 71)):
        model = build_student("small_cnn", 4, PRE, width=8, context=context).eval()
        x = torch.rand(1, 3, 128, 128, requires_grad=True)
        model(x)[0, :, 32, 32].sum().backward()
        cols = torch.nonzero(x.grad.abs().sum((0, 1, 2)) > 0).flatten()
        assert int(cols.max() - cols.min()) + 1 == width
    with pytest.raises(ValueError, match="context dilations"):
        build_student("small_cnn", 4, PRE, width=8, context=[])


def test_the_student_carries_its_preprocessing_through_save_and_load(tmp_path):
    """Whoever loads a student feeds it as it was trained: input side and normalisation come back with the weights,
    and the loaded network embeds images as the saved one did."""
    torch.manual_seed(0)
    pre = Preprocessing(48, (0.4, 0.45, 0.5), (0.2, 0.25, 0.3))
    model = build_student("small_cnn", 8, pre, width=8, context=[1, 2]).eval()
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    save_student(model, tmp_path / "student.safetensors", step=7)
    loaded = load_student(tmp_path / "student.safetensors", torch.device("cpu"))
    assert loaded.preprocessing == pre and loaded.arch == model.arch
    torch.testing.assert_close(loaded.embed(images, batch_size=2), model.embed(images))
    by_hand = model((torch.from_numpy(images).permute(0, 3, 1, 2) / 255 - torch.tensor(pre.mean).view(3, 1, 1))
                    / torch.tensor(pre.std).view(3, 1, 1))
    torch.testing.assert_close(model.embed(images), by_hand)


def test_a_weights_file_without_preprocessing_needs_it_given(tmp_path):
    """Files written before the student carried its preprocessing load only with it given (their student.json)."""
    model = build_student("small_cnn", 8, PRE, width=8)
    save_student(model, tmp_path / "new.safetensors", step=1)
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as handle:
        meta = {k: v for k, v in (handle.metadata() or {}).items() if k != "preprocessing"}
    save_file(load_file(str(tmp_path / "new.safetensors")), str(tmp_path / "old.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="does not say how its images were normalised"):
        load_student(tmp_path / "old.safetensors", torch.device("cpu"))
    assert load_student(tmp_path / "old.safetensors", torch.device("cpu"), PRE).preprocessing == PRE
