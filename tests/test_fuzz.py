"""Corruption fuzzing, run small: damaged files are refused or reported, never hang or crash."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.mark.timeout(300)
def test_corruption_fuzz_small():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "fuzz_corrupt.py"), "-n",
                          "400", "--seed", "7", "-v"], env=ENV, capture_output=True, text=True,
                         timeout=280)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "BUG" not in res.stdout + res.stderr
    # every kind of damage that must never pass was caught
    for kind in ("immutable", "version", "magic", "feature"):
        assert f"{kind}" in res.stdout and "refused" in res.stdout
