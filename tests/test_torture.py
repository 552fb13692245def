"""The random-SIGKILL torture and the multi-process stress scripts, run small."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [1, 2])
def test_torture_small(seed):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "torture.py"), "-n", "60",
                          "--seed", str(seed)], env=ENV, capture_output=True, text=True,
                         timeout=280)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 leaked blocks" in res.stdout and "committed transactions all present" in res.stdout
