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
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith("  ")]
    outcomes = {(r[0], r[1]) for r in rows}
    # Damage to what open() must trust is always refused, never passed as harmless...
    for kind in ("immutable", "version", "magic", "feature"):
        assert (kind, "refused") in outcomes
        assert (kind, "harmless") not in outcomes and (kind, "detected") not in outcomes
    # ...and damage to the allocator's structures is always reported by check().
    for kind in ("footer", "bitmap", "journal", "txlog"):
        assert (kind, "detected") in outcomes and (kind, "harmless") not in outcomes
