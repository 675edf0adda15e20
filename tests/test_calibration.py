"""The share floor for classes named only at test time, as the evaluate stage and `clips4 segment` measure it."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clips4.evaluation import predict_language
from clips4.tasks.calibration import array_embedder, new_class_floor, new_class_ids


def test_new_class_ids_match_any_synonym_case_aside() -> None:
    known = [["grass"], ["sand", "beach"], ["kite"]]
    names = [["Grass"], ["beach"], ["star"], ["lawn", "KITE"], ["box", "crate"]]
    assert new_class_ids(names, known) == [2, 4]
    assert new_class_ids(known, known) == []


def test_array_embedder_reads_runs_and_scattered_indices_alike() -> None:
    stored = np.arange(5 * 2 * 3 * 4, dtype=np.float32).reshape(5, 2, 3, 4)  # [N,h,w,D]
    embed = array_embedder(stored)
    assert embed([1, 2, 3]).shape == (3, 4, 2, 3)
    torch.testing.assert_close(embed([0, 2, 4]), torch.from_numpy(stored[[0, 2, 4]]).permute(0, 3, 1, 2))
    torch.testing.assert_close(embed([3]), torch.from_numpy(stored[3:4]).permute(0, 3, 1, 2))


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

    bias, table = new_class_floor(as_maps(teacher), as_maps(student), range(6), 4, text, None, [2],
                                  ["a", "b", "c"], 0.5, 1000, 0, torch.device("cpu"))
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
