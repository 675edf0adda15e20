"""The CLI contract: config show, store ls/show/rm/gc, and run refusing what it cannot do."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from typer.testing import CliRunner

from clips4.config import STAGES
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


def test_console_script_installed() -> None:
    out = subprocess.run([sys.executable, "-m", "clips4.flows.cli", "store", "ls", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--json" in out.stdout
