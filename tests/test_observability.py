"""Runs you can watch: library log lines in the run's logs, progress artifacts, metric and loss tables."""

from __future__ import annotations

import io
import logging

import pandas as pd
import pytest

from clips4.config import resolve_config
from clips4.progress import Throttle, reporting, track
from clips4.tasks.observe import LIBRARY_LOGGER, in_run, observed
from clips4.tasks.report import benchmark_table, loss_table, metric_table, publish_losses, publish_metrics
from conftest import TINY_CONFIG


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_throttle_sends_at_most_every_interval_and_fraction_and_always_the_end() -> None:
    sent: list[int] = []
    clock = FakeClock()
    throttle = Throttle(sent.append, total=1000, interval=2.0, fraction=0.01, clock=clock)
    for done in range(1, 1001):
        clock.now += 0.125  # 2 s are 16 items, more than 1 %: time decides, and the end is always sent
        throttle(done)
    assert sent == [*range(16, 1000, 16), 1000]

    sent.clear()
    clock = FakeClock()
    throttle = Throttle(sent.append, total=10_000, interval=2.0, fraction=0.01, clock=clock)
    for done in range(1, 10_001):
        clock.now += 10.0  # slow loop: the time limit is always met, so 1 % of the total decides
        throttle(done)
    assert sent == list(range(100, 10_001, 100))

    sent.clear()
    throttle = Throttle(sent.append, total=5, clock=FakeClock())
    for done in [1, 2, 3, 4, 5, 5]:
        throttle(done)  # a fast short loop: only its end
    assert sent == [5]


def test_track_reports_to_the_installed_reporter_only() -> None:
    calls: list[tuple[str, int]] = []
    counts: list[int] = []

    def reporter(description: str, total: int):
        calls.append((description, total))
        return counts.append

    assert list(track(range(4), "outside")) == [0, 1, 2, 3]
    with reporting(reporter):
        assert list(track(range(7), "inside", unit="img")) == list(range(7))
        assert list(track(iter(range(3)), "no total")) == [0, 1, 2]  # no total: no percentage to report
        # zip stops at its first argument's end, so the loop is never resumed after its last item: still counted.
        assert len(list(zip(range(5), track(iter("abcde"), "zipped", total=5)))) == 5
    assert list(track(range(2), "after")) == [0, 1]
    assert calls == [("inside", 7), ("zipped", 5)]
    assert counts == [7, 5]


def test_metric_table_has_one_row_per_method_and_one_column_per_task_and_metric() -> None:
    metrics = pd.DataFrame(
        [
            ("maskclip", "language", "mIoU", 0.25),
            ("maskclip", "language", "hIoU", 0.125),
            ("maskclip", "unsupervised", "mIoU", 0.3),
            ("clips4", "language", "mIoU", 0.5),
            ("clips4", "language", "hIoU", 0.375),
            ("clips4", "unsupervised", "mIoU", 0.6),
            ("maskclip+kspd", "language", "mIoU", 0.123456),
        ],
        columns=["method", "task", "metric", "value"],
    )
    table = metric_table(metrics)
    assert list(table.columns) == ["method", "language mIoU", "language hIoU", "unsupervised mIoU"]
    assert list(table["method"]) == ["maskclip", "clips4", "maskclip+kspd"]
    assert table.set_index("method").loc["clips4", "unsupervised mIoU"] == 0.6
    assert pd.isna(table.set_index("method").loc["maskclip+kspd", "language hIoU"])


def test_benchmark_table_stacks_each_runs_methods_under_its_benchmark_and_protocol() -> None:
    voc = resolve_config("voc21")
    demo = resolve_config("demo")
    first = pd.DataFrame([("maskclip", "language", "mIoU", 0.4), ("clips4", "language", "mIoU", 0.5)],
                         columns=["method", "task", "metric", "value"])
    second = pd.DataFrame([("maskclip", "language", "mIoU", 0.2), ("maskclip", "probe", "mIoU", 0.7)],
                          columns=["method", "task", "metric", "value"])
    table = benchmark_table([(voc, "evaluate-a", first), (demo, "evaluate-b", second)])
    assert list(table.columns) == ["preset", "dataset", "split", "protocol", "method", "language mIoU", "probe mIoU",
                                   "evaluate"]
    assert table[["preset", "method", "evaluate"]].values.tolist() == [
        ["voc21", "maskclip", "evaluate-a"], ["voc21", "clips4", "evaluate-a"], ["demo", "maskclip", "evaluate-b"],
    ]
    assert table["protocol"].tolist()[::2] == ["slide 224/112, short side 336, background below 0.1", "stored maps"]
    assert table["language mIoU"].tolist() == [0.4, 0.5, 0.2] and pd.isna(table["probe mIoU"].iloc[0])


def test_loss_table_is_steps_by_losses_cut_to_at_most_the_asked_rows() -> None:
    steps = range(1000)
    losses = pd.DataFrame(
        [(s, c, float(s)) for s in steps for c in ("contrast", "emb", "total")], columns=["step", "component", "value"]
    )
    table = loss_table(losses, rows=100)
    assert list(table.columns) == ["step", "contrast", "emb", "total"]
    assert len(table) == 100 and table["step"].iloc[0] == 0 and table["step"].iloc[-1] == 999
    assert table["step"].is_monotonic_increasing
    short = loss_table(losses[losses["step"] < 3])
    assert list(short["step"]) == [0, 1, 2]


def test_outside_a_run_nothing_is_published_and_logging_is_untouched(tmp_path) -> None:
    assert not in_run()
    logger = logging.getLogger(LIBRARY_LOGGER)
    before = (logger.level, list(logger.handlers))
    with observed():
        assert (logger.level, logger.handlers) == before
        list(track(range(3), "plain"))
        # No Prefect run: skipped before the (here absent) artifact is even read, so the stage cannot fail.
        publish_metrics(None, None, "evaluate-missing", {})  # type: ignore[arg-type]
        publish_losses(None, None, "train-missing")  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_pipeline_run_shows_library_logs_progress_and_tables(tmp_path, prefect_harness, caplog) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from clips4.flows.pipeline import clips4_pipeline

    # The tests run Prefect at WARNING (conftest); a level set on the clips4 loggers is what the run logs use.
    caplog.set_level(logging.INFO, logger=LIBRARY_LOGGER)
    state = clips4_pipeline(preset=None, config_file=str(TINY_CONFIG), store=str(tmp_path), return_state=True)
    assert state.is_completed()
    flow_run_id = state.state_details.flow_run_id
    APILogWorker.drain_all()

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )

    # clips4.training's checkpoint line (train.steps=3): in the run's logs, filed under the train task's run.
    step_line = "step 3: loss"
    library = [log for log in logs if log.name == "clips4.training" and step_line in log.message]
    assert len(library) == 1 and library[0].task_run_id is not None
    # Every record the terminal shows reaches the root logger, where caplog listens: the line got there once.
    assert sum(step_line in r.getMessage() for r in caplog.records) == 1

    progress = [a for a in artifacts if a.type == "progress"]
    train = [a for a in progress if a.description == "train student"]
    assert len(train) == 1 and train[0].data == 100
    assert all(a.data == 100 for a in progress), [(a.description, a.data) for a in progress if a.data != 100]

    by_key = {a.key: a for a in artifacts if a.key}
    metrics = by_key["clips4-metrics-tiny"]
    assert metrics.type == "table"
    rows = pd.read_json(io.StringIO(metrics.data))
    assert {"maskclip", "maskclip+kspd", "maskclip+tta", "clips4", "clips4+tta"} <= set(rows["method"])
    assert "language mIoU" in rows.columns and rows["method"].is_unique
    assert "features-" in metrics.description and "train-" in metrics.description and "evaluate-" in metrics.description

    losses = pd.read_json(io.StringIO(by_key["clips4-losses-tiny"].data))
    assert list(losses["step"]) == [0, 1, 2] and {"contrast", "emb", "sem", "total"} <= set(losses.columns)

    pictures = by_key["clips4-pictures-tiny"]
    assert pictures.type == "markdown" and "file://" in pictures.data and "overlays.png" in pictures.data


@pytest.mark.slow
def test_observed_files_lines_from_library_threads_under_the_run_and_forwards_once(prefect_harness) -> None:
    import threading

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler, APILogWorker

    logger = logging.getLogger(f"{LIBRARY_LOGGER}.observability_test")
    library = logging.getLogger(LIBRARY_LOGGER)

    @flow
    def watched() -> list[int]:
        forwarders = []
        with observed():
            forwarders.append(sum(isinstance(h, APILogHandler) for h in library.handlers))
            worker = threading.Thread(target=logger.warning, args=("from a library thread",))
            worker.start()
            worker.join()
        already = APILogHandler()  # what PREFECT_LOGGING_EXTRA_LOGGERS=clips4 attaches
        library.addHandler(already)
        try:
            with observed():
                forwarders.append(sum(isinstance(h, APILogHandler) for h in library.handlers))
        finally:
            library.removeHandler(already)
        return forwarders

    state = watched(return_state=True)
    assert state.result() == [1, 1]
    assert not any(isinstance(h, APILogHandler) for h in library.handlers)
    APILogWorker.drain_all()
    with get_client(sync_client=True) as client:
        flow_run = LogFilterFlowRunId(any_=[state.state_details.flow_run_id])
        messages = [log.message for log in client.read_logs(LogFilter(flow_run_id=flow_run))]
    assert messages.count("from a library thread") == 1
