"""The stage table is the graph: every consumer (keys, flows, deployments) agrees with it."""

from __future__ import annotations

from clips4.config import resolve_config
from clips4.tasks.common import plan_keys
from clips4.tasks.stages import STAGE_TABLE, STAGES, forced_stages


def test_every_upstream_comes_earlier_and_every_task_imports() -> None:
    for i, stage in enumerate(STAGE_TABLE):
        assert set(stage.upstream) <= set(STAGES[:i]), stage.name
        assert callable(stage.run())
    assert forced_stages("cluster") == {"cluster", "train", "evaluate"} and forced_stages(None) == set()


def test_config_decides_conditional_edges_and_keys_follow_them() -> None:
    synthetic, released = resolve_config("demo"), resolve_config("voc20")
    teacher = STAGE_TABLE[STAGES.index("teacher")]
    assert teacher.reads(synthetic) == ["data"] and teacher.reads(released) == []
    keys = plan_keys(synthetic, ["evaluate"])
    assert set(keys) == set(STAGES)  # evaluate depends, through the table, on every stage
    assert set(plan_keys(synthetic, ["cluster"])) == {"data", "teacher", "features", "cluster"}


def test_one_flow_per_stage_named_after_it() -> None:
    from clips4.flows.pipeline import STAGE_FLOWS

    assert list(STAGE_FLOWS) == list(STAGES)
    assert [f.name for f in STAGE_FLOWS.values()] == [f"clips4-{s}" for s in STAGES]
