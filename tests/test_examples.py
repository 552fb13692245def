"""Every example runs and prints what it promises."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run(*args: str) -> str:
    res = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.mark.timeout(150)
def test_fork_workers():
    assert "4 workers wrote 200000 numbers" in run("examples/fork_workers.py")


@pytest.mark.timeout(150)
def test_persistent_store_remembers_across_runs(tmp_path):
    path = str(tmp_path / "store.heap")
    assert "run 1;" in run("examples/persistent_store.py", path)
    assert "run 2;" in run("examples/persistent_store.py", path)


@pytest.mark.timeout(150)
def test_pool_memfd():
    assert "sum 328350" in run("examples/pool_memfd.py")


@pytest.mark.timeout(150)
def test_demo_command():
    out = run("-m", "pheap.cli", "demo", "--workers", "2", "--records", "2000")
    assert "verified 4000 records" in out and "ok" in out
