"""The share floor for classes named only at test time, as the evaluate stage and `clips4 segment` measure it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clips4.calibration import argmax_shares, new_class_floor, new_class_ids, share_floor_bias
from clips4.evaluation import predict_language


def test_new_class_ids_match_any_synonym_case_aside() -> None:
    known = [["grass"], ["sand", "beach"], ["kite"]]
    names = [["Grass"], ["beach"], ["star"], ["lawn", "KITE"], ["box", "crate"]]
    assert new_class_ids(names, known) == [2, 4]
    assert new_class_ids(known, known) == []


def test_argmax_shares_count_each_pixels_winner():
    scores = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0]])
    torch.testing.assert_close(argmax_shares([scores[:2], scores[2:]], 3), torch.tensor([0.25, 0.5, 0.25]))
    maps = scores.T.reshape(1, 3, 2, 2)  # the same pixels as a [B,K,h,w] map
    torch.testing.assert_close(argmax_shares([maps], 3), torch.tensor([0.25, 0.5, 0.25]))
    with pytest.raises(ValueError, match="empty"):
        argmax_shares([], 3)


def test_share_floor_bias_raises_a_vanished_class_to_its_floor_and_only_it():
    g = torch.Generator().manual_seed(0)
    n = 10_000
    scores = torch.randn(n, 4, generator=g)
    scores[:, 3] = scores[:, :3].max(1).values - 0.1 - torch.rand(n, generator=g)  # class 3 never wins: runner-up
    reference = torch.tensor([0.3, 0.3, 0.3, 0.1])
    assert argmax_shares([scores], 4)[3] == 0
    bias = share_floor_bias(scores, reference, classes=[3], floor=0.5)
    assert (bias[:3] == 0).all() and bias[3] > 0.1
    share = argmax_shares([scores + bias], 4)[3]
    assert abs(share - 0.05) < 0.002  # 0.5 x the reference's 0.1, not more
    # The pixels it takes are those where it came closest: they score it highest after the bias.
    won = (scores + bias).argmax(1) == 3
    margin = scores[:, :3].max(1).values - scores[:, 3]
    assert margin[won].max() <= margin[~won].min()
    # A class that already has its floor, or is not listed, keeps a bias of 0.
    assert (share_floor_bias(scores, reference, classes=[0, 1], floor=0.5) == 0).all()
    assert (share_floor_bias(scores, reference, classes=[], floor=0.5) == 0).all()


def test_new_class_floor_raises_only_the_new_class_the_student_dropped() -> None:
    text = torch.eye(3)  # classes 0, 1 known; 2 named only now
    generator = torch.Generator().manual_seed(0)
    # The teacher names class 2 on a third of the pixels; the student leans every one of those to class 0.
    label = torch.arange(3).repeat_interleave(20)  # 60 pixels
    teacher = F.one_hot(label, 3).float() + 0.01 * torch.randn(60, 3, generator=generator)
    student = teacher.clone()
    student[label == 2, 0] += 1.5 + 0.1 * torch.rand(20, generator=generator)

    def as_maps(rows: torch.Tensor):
        maps = rows.T.reshape(3, 6, 10).permute(1, 0, 2)[:, :, None]  # 6 images of [D=3, 1, 10]
        return lambda idx: maps[idx]

    bias, table = new_class_floor(as_maps(teacher), as_maps(student), range(6), batch_size=4, text=text, centre=None,
                                  new=[2], names=["a", "b", "c"], floor=0.5, pixels=1000, seed=0,
                                  device=torch.device("cpu"))
    assert table["held_out"].tolist() == [False, False, True]
    np.testing.assert_allclose(table["maskclip_share"], [1 / 3] * 3, atol=1e-6)
    assert table.loc[2, "clips4_share"] == 0.0
    assert bias[0] == bias[1] == 0 and bias[2] > 0
    assert table.loc[2, "clips4_share_with_bias"] >= 0.5 / 3 - 1 / 60


def test_predict_language_adds_the_bias_before_the_argmax() -> None:
    text = torch.eye(2)
    emb = torch.tensor([1.0, 0.2]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    assert (predict_language(emb, text, (4, 4)) == 0).all()
    assert (predict_language(emb, text, (4, 4), bias=torch.tensor([0.0, 100.0])) == 1).all()
