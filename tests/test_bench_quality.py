"""The quality scripts' arithmetic on hand-made metric tables: which rows count as the strongest baseline, the
gains per world and the checks they must pass."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import demo_runs  # noqa: E402
import worlds  # noqa: E402


def _metrics(values: dict[str, tuple[float, float]]) -> pd.DataFrame:
    rows = [{"method": m, "task": "language", "metric": metric, "value": v}
            for m, (known, held) in values.items() for metric, v in (("mIoU_known", known), ("mIoU_unknown", held))]
    return pd.DataFrame(rows)


def test_gains_are_against_the_strongest_maskclip_row_and_the_best_clips4_row() -> None:
    table = demo_runs.wide(_metrics({"maskclip": (0.30, 0.20), "maskclip+tta": (0.40, 0.10),
                                     "clips4": (0.45, 0.18), "clips4+tta": (0.55, 0.12)}))
    g = worlds.gains({7: table})
    row = g.iloc[0]
    assert row["best clips4 - best maskclip, known"] == 15.0  # 55 - 40: the +tta rows are the best on known
    assert row["best clips4 - best maskclip, held out"] == -2.0  # 18 - 20: plain rows are the best on held out
    assert row["clips4 - maskclip, known"] == 15.0 and row["clips4 - maskclip, held out"] == -2.0


def test_checks_fail_when_one_world_falls_behind_on_held_out_classes() -> None:
    good = {"maskclip": (0.30, 0.20), "clips4": (0.45, 0.30)}
    bad = {"maskclip": (0.30, 0.20), "clips4": (0.45, 0.15)}
    passes = worlds.checks(worlds.gains({1: demo_runs.wide(_metrics(good))})).set_index("check")["passes"]
    assert passes.all()
    tables = {1: demo_runs.wide(_metrics(good)), 2: demo_runs.wide(_metrics(bad))}
    result = worlds.checks(worlds.gains(tables)).set_index("check")
    assert not result.loc["worst world, held-out classes", "passes"]
    assert result.loc["worst world, held-out classes", "value"] == -5.0


def test_each_world_has_its_own_held_out_pair_and_seed_zero_keeps_the_demo_pair() -> None:
    assert demo_runs.held_out_pair(0) == ["star", "box"]
    pairs = {tuple(demo_runs.held_out_pair(s)) for s in range(1, 6)}
    assert len(pairs) > 1 and all(len(p) == 2 and p[0] != p[1] for p in pairs)
