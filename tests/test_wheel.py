"""The wheel as users install it: built from this checkout, installed into a fresh folder, run from outside the
repository. It holds one top-level package (clips4) with its presets, and its console script runs a stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_cli

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-w", str(work / "dist")],
                   check=True, cwd=work)
    (wheel,) = (work / "dist").glob("clips4-*.whl")
    target = work / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, cwd=work)
    return target


def _run(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target), "PREFECT_HOME": str(cwd / "prefect"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(target / "bin" / "clips4"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_wheel_installs_one_namespace_with_presets(installed, tmp_path) -> None:
    top = sorted(p.name for p in installed.iterdir() if p.name != "bin")
    assert [n for n in top if not n.startswith("clips4-")] == ["clips4"], top
    for sub in ("storage", "tasks", "flows", "configs"):
        assert (installed / "clips4" / sub).is_dir()
    out = _run(installed, tmp_path, "config", "show", "--preset", "demo")
    assert out.returncode == 0, out.stderr
    assert "name: demo" in out.stdout
    presets = _run(installed, tmp_path, "config", "presets")
    assert "demo" in presets.stdout.split()
    where = subprocess.run([sys.executable, "-c", "import clips4.storage as s; print(s.__file__)"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(installed)}, capture_output=True, text=True)
    assert where.stdout.strip().startswith(str(installed)), where.stdout + where.stderr


def test_wheel_runs_a_stage_from_outside_the_repository(installed, tmp_path) -> None:
    out = _run(installed, tmp_path, "run", *tiny_cli(), "--stages", "data", "--store", str(tmp_path / "s"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert list((tmp_path / "s" / "data").iterdir())
