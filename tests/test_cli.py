"""The CLI contract: config show, store ls/show/rm/gc, and run refusing what it cannot do."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from conftest import tiny_cli, tiny_config
from typer.testing import CliRunner

from clips4.tasks.stages import STAGES
from clips4.flows.cli import app
from clips4.storage import Store, make_key

runner = CliRunner()


def test_config_show_prints_all_sections() -> None:
    result = runner.invoke(app, ["config", "show", "--preset", "demo", "--set", "train.steps=5"])
    assert result.exit_code == 0, result.output
    tree = yaml.safe_load(result.stdout)
    assert set(STAGES) <= set(tree) and tree["train"]["steps"] == 5


def test_config_show_refuses_bad_value_naming_it() -> None:
    result = runner.invoke(app, ["config", "show", "--preset", "demo", "--set", "train.lr=abc"])
    assert result.exit_code != 0
    assert "train.lr" in result.output


def test_store_commands(tmp_path) -> None:
    store = str(tmp_path / "empty")
    result = runner.invoke(app, ["store", "ls", "--json", "--store", store])
    assert result.exit_code == 0 and json.loads(result.stdout) == []
    refused = runner.invoke(app, ["store", "show", "../../etc", "--store", store])
    assert refused.exit_code != 0 and "not an artifact key" in refused.output

    st = Store(store)
    a = make_key("data", "a", [], 1)
    b = make_key("teacher", "b", [a], 1)
    st.produce("data", a, lambda f: f.write_json("x.json", 1), config={}, upstream=[])
    st.produce("teacher", b, lambda f: None, config={}, upstream=[a])
    listed = json.loads(runner.invoke(app, ["store", "ls", "--json", "--store", store]).stdout)
    assert [(r["kind"], r["key"], r["status"]) for r in listed] == [("data", a, "complete"), ("teacher", b, "complete")]
    assert all(r["path"].endswith(r["key"]) for r in listed)
    shown = runner.invoke(app, ["store", "show", b, "--store", store])
    assert shown.exit_code == 0 and a in shown.output and "lineage" in shown.output
    assert runner.invoke(app, ["store", "rm", a, "--store", store]).exit_code != 0
    assert runner.invoke(app, ["store", "rm", a, "--cascade", "--store", store]).exit_code == 0
    assert runner.invoke(app, ["store", "gc", "--store", store]).exit_code == 0


def test_run_refuses_unknown_stage() -> None:
    result = runner.invoke(app, ["run", "--preset", "demo", "--stages", "data,bogus"])
    assert result.exit_code != 0 and "bogus" in result.output


def test_the_installed_clips4_script_runs() -> None:
    """The console script pip installs beside this interpreter ([project.scripts] in pyproject.toml)."""
    script = Path(sysconfig.get_path("scripts")) / "clips4"
    assert script.is_file(), f"{script} is missing: install the package (pip install -e .) into this environment"
    out = subprocess.run([str(script), "store", "ls", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "--json" in out.stdout, out.stderr[-2000:]


# ------------------------------------------------------------------------------------------- one line per error
def _main(monkeypatch, capsys, *args: str) -> tuple[int, list[str]]:
    """``clips4 ARGS`` in this process: its exit code and its non-empty stderr lines."""
    from clips4.flows.cli import main

    monkeypatch.setattr(sys, "argv", ["clips4", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _cli(env: dict[str, str], *args: str, script: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *(script or ["-m", "clips4.flows.cli"]), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def _one_error_line(done: subprocess.CompletedProcess, needle: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], done.stderr[-2000:]


@pytest.mark.slow
def test_refusals_before_any_run_are_one_error_line(tmp_path, child_env) -> None:
    (tmp_path / "bad.yaml").write_text("train: [steps: 3\n")
    _one_error_line(_cli(child_env, "config", "show", "--config", str(tmp_path / "bad.yaml")), "bad.yaml")
    (tmp_path / "bad.json").write_text('{"train": {"steps": ')
    _one_error_line(_cli(child_env, "config", "show", "--config", str(tmp_path / "bad.json")), "bad.json")

    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    env = {**child_env, "PREFECT_HOME": str(tmp_path / "prefect")}
    _one_error_line(_cli(env, "run", "--preset", "demo", "--stages", "data", "--store", str(a_file)), str(a_file))
    gone = tmp_path / "gone.safetensors"
    missing_teacher = ["--set", f"teacher.pretrained={gone}", "--set", "teacher.train=none"]
    refused = _cli(env, "run", "--preset", "demo", *missing_teacher, "--stages", "data,teacher",
                   "--store", str(tmp_path / "store"))
    _one_error_line(refused, str(gone))


def test_os_errors_from_any_command_are_one_line_saying_what_to_do(tmp_path, monkeypatch, capsys) -> None:
    def read_only(self, key: str, cascade: bool = False) -> list[str]:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / key))

    monkeypatch.setattr(Store, "remove", read_only)
    code, lines = _main(monkeypatch, capsys, "store", "rm", make_key("data", "a", [], 1), "--store", str(tmp_path))
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("error: read-only file system") and str(tmp_path) in lines[0] and "--store" in lines[0]


def test_the_error_line_names_the_place_and_the_remedy() -> None:
    from clips4.flows import cli

    full = cli.describe(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/store/.staging/x/a.npy"))
    assert full is not None and full[1] == 1
    assert "/data/store/.staging/x/a.npy" in full[0] and "free space" in full[0] and "rerun" in full[0]
    cli.written_roots.append(Path("/data/store"))  # a write to an open file has no file name: name the store
    try:
        assert "/data/store" in cli.describe(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))[0]
    finally:
        cli.written_roots.pop()
    assert "permission denied (/s)" in cli.describe(PermissionError(errno.EACCES, "Permission denied", "/s"))[0]
    try:
        json.loads('{"a": ')
    except json.JSONDecodeError as e:
        assert "JSON" in cli.describe(e)[0] and "--debug" in cli.describe(e)[0]
    assert cli.describe(KeyboardInterrupt()) == ("interrupted by SIGINT; rerun the same command to resume", 130)


def test_clips4_runtime_errors_are_user_errors_and_other_errors_are_bugs(monkeypatch, capsys) -> None:
    from clips4.flows import cli
    from clips4.prototypes import load_faiss

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(RuntimeError) as raised:
        load_faiss()
    assert cli.describe(raised.value) == (str(raised.value), 1) and "pip install" in str(raised.value)
    with pytest.raises(RuntimeError) as raised:
        raise RuntimeError("CUDA error: an illegal memory access")  # not raised by clips4: not the user's to fix
    assert cli.describe(raised.value) is None

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.report(raised.value) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: RuntimeError: CUDA error")
    assert "bug" in err.strip().splitlines()[-1]


INJECT = """
import sys

import clips4.tasks.data as data
from clips4.flows.cli import main
from clips4.teacher import TeacherLoadError


def build_data(cfg, files):
    files.write_json("partial.json", 1)
    raise TeacherLoadError("teacher weights x.safetensors are damaged; download them again")


data.build_data = build_data
main()
"""


@pytest.mark.slow
def test_an_error_inside_a_prefect_task_ends_with_its_own_line_and_no_traceback(tmp_path, child_env) -> None:
    script = tmp_path / "inject.py"
    script.write_text(INJECT)
    env = {**child_env, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("CLIPS4_DEBUG", None)
    args = ["run", *tiny_cli(), "--stages", "data", "--store", str(tmp_path / "store")]

    done = _cli(env, *args, script=[str(script)])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    assert lines[-1] == "error: teacher weights x.safetensors are damaged; download them again"
    assert not any(line.startswith("error: ") for line in lines[:-1])

    debug = _cli(env, "--debug", *args, script=[str(script)])
    assert debug.returncode == 1 and "Traceback" in debug.stderr, debug.stderr[-3000:]
    assert debug.stderr.strip().splitlines()[-1] == lines[-1]


@pytest.mark.slow
def test_benchmark_runs_each_config_into_one_store_and_writes_one_table(tmp_path, prefect_harness) -> None:
    """Two tiny synthetic configs that differ in the split they evaluate, set per run: the second reuses every
    stage but evaluate, the shared --set reaches both, and one table holds a row per run and method."""
    import pandas as pd

    from clips4.config import to_yaml

    tree = yaml.safe_load(to_yaml(tiny_config()))
    tree.pop("name")  # each run is named by its file
    for name in ("tiny-val", "tiny-test"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(tree))
    store, out = tmp_path / "store", tmp_path / "out"
    args = ["benchmark", "--config", str(tmp_path / "tiny-val.yaml"), "--config", str(tmp_path / "tiny-test.yaml"),
            "--set", "evaluate.tasks=[language]", "--set", "tiny-val:evaluate.split=val",
            "--set", "tiny-test:evaluate.split=test", "--store", str(store), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output

    table = pd.read_csv(out / "benchmark.csv")
    assert list(table.columns[:5]) == ["preset", "dataset", "split", "protocol", "method"]
    assert table["evaluate"].nunique() == 2 and len(Store(store).list("evaluate")) == 2
    assert len(Store(store).list("train")) == 1  # the second run reused the first one's student
    for name, split in (("tiny-val", "val"), ("tiny-test", "test")):
        rows = table[table["preset"] == name]
        assert set(rows["split"]) == {split} and set(rows["dataset"]) == {"synthetic"}
        assert {"maskclip", "clips4"} <= set(rows["method"])
        metrics = Store(store).open(rows["evaluate"].iloc[0]).read_table("metrics")
        clips4 = metrics[(metrics["method"] == "clips4") & (metrics["metric"] == "mIoU")]["value"].item()
        assert rows.loc[rows["method"] == "clips4", "language mIoU"].item() == pytest.approx(clips4, abs=1e-9)
    assert not any(c.startswith(("unsupervised", "probe")) for c in table.columns)  # the shared --set reached both
    markdown = (out / "benchmark.md").read_text()
    assert markdown.count("| tiny-") == len(table) and "language mIoU" in markdown
    refused = runner.invoke(app, ["benchmark", "--presets", "demo", "--set", "voc20:data.root=/x"])
    assert refused.exit_code == 2 and "names 'voc20', which is not one of the runs (demo)" in refused.output
