from pathlib import Path

import pytest
import torch
import torchvision

from clips4.student import build_student


def test_small_cnn_gives_unit_stride_two_map_and_trains():
    torch.manual_seed(0)
    model = build_student("small_cnn", out_dim=24, width=16)
    images = torch.randn(3, 3, 64, 64)
    out = model(images)
    assert model.stride == 2
    assert out.shape == (3, 24, 32, 32)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3, 32, 32))
    out[:, 0].sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_small_cnn_uses_one_parameter_group():
    model = build_student("small_cnn", out_dim=8, width=8)
    groups = model.param_groups(lr=0.1, head_lr_mult=10.0)
    assert len(groups) == 1 and groups[0]["lr"] == 0.1
    assert len(groups[0]["params"]) == len(list(model.parameters()))


def test_resnet_student_is_dilated_with_split_learning_rates():
    torch.manual_seed(0)
    model = build_student("resnet50", out_dim=16)
    out = model(torch.randn(2, 3, 64, 64))
    assert model.stride == 8 and out.shape == (2, 16, 8, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 8, 8))
    backbone, head = model.param_groups(lr=0.01, head_lr_mult=10.0)
    assert backbone["lr"] == 0.01 and head["lr"] == pytest.approx(0.1)
    ids = [id(p) for p in backbone["params"]] + [id(p) for p in head["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_resnet_backbone_weights_load_from_a_local_file(tmp_path: Path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    model = build_student("resnet50", out_dim=8, backbone_weights=path)
    torch.testing.assert_close(model.backbone.stem[0].weight, reference.conv1.weight)
    torch.testing.assert_close(model.backbone.layers[3][2].conv3.weight, reference.layer4[2].conv3.weight)


def test_bad_backbone_weights_are_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_student("resnet50", out_dim=8, backbone_weights=tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth"):
        build_student("resnet50", out_dim=8, backbone_weights=wrong)


def test_bad_student_requests_are_refused():
    with pytest.raises(ValueError, match="unknown student"):
        build_student("vgg", out_dim=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ResNet students only"):
        build_student("small_cnn", out_dim=8, backbone_weights=Path("x.pth"))
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        build_student("small_cnn", out_dim=8, width=8)(torch.zeros(1, 1, 16, 16))


def test_small_cnn_context_sets_the_receptive_field():
    """A pixel's embedding depends on a window of input pixels 15 + 8 x sum(context) px wide."""
    torch.manual_seed(0)
    for context, width in (([1, 1], 31), ([1, 2, 4], 71)):
        model = build_student("small_cnn", out_dim=4, width=8, context=context).eval()
        x = torch.rand(1, 3, 128, 128, requires_grad=True)
        model(x)[0, :, 32, 32].sum().backward()
        cols = torch.nonzero(x.grad.abs().sum((0, 1, 2)) > 0).flatten()
        assert int(cols.max() - cols.min()) + 1 == width
    with pytest.raises(ValueError, match="context dilations"):
        build_student("small_cnn", out_dim=4, width=8, context=[])
