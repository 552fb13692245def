"""The random-SIGKILL torture (tools/torture.py), run small; and its verifier, shown to fail on a
heap that breaks each promise it checks."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

import pheap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "torture.py")
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _load():
    spec = importlib.util.spec_from_file_location("torture", TOOL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("torture", mod)
    spec.loader.exec_module(mod)
    return mod


torture = _load()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [1, 2])
def test_torture_small(seed):
    res = subprocess.run([sys.executable, TOOL, "-n", "60", "--seed", str(seed), "-q"], env=ENV,
                         capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    m = re.search(r"(\d+) completed steps all present \((\d+) transactions, (\d+) atomic "
                  r"brackets, (\d+) plain operations\)", out)
    assert m, out
    assert all(int(g) > 0 for g in m.groups()), out  # every kind of step ran
    m = re.search(r"(\d+) steps in doubt at the kill", out)
    assert m and int(m.group(1)) > 0, out  # kills landed inside steps
    assert "0 leaked allocations" in out


# -- the verifier -------------------------------------------------------------------------------


@pytest.fixture
def table_heap(tmp_path):
    path = str(tmp_path / "t.heap")
    with pheap.open(path, "n") as h:
        h.root_offset = h.calloc(torture.SLOTS, 8)
    return path


def _put(path, slot, step, n):
    """Allocate the record of ``slot`` at ``step`` and name it in the table; return its offset."""
    with pheap.open(path, "w") as h:
        p = h.malloc(n)
        h.write(p, torture.record(slot, step, n))
        with h.lock() as s:
            s.set_u64(s.entry("root"), slot, p)
    return p


def test_verifier_accepts_the_model(table_heap):
    _put(table_heap, 3, 1, 100)
    _put(table_heap, 4, 1, 3000)
    model = {3: (1, 100, 100), 4: (1, 3000, 3000)}
    assert torture.resolve(table_heap, model, None, torture.Stats()) == model


def test_verifier_rejects_a_missing_record(table_heap):
    with pytest.raises(torture.Failure, match="slots"):
        torture.resolve(table_heap, {3: (1, 100, 100)}, None, torture.Stats())


def test_verifier_rejects_wrong_record_bytes(table_heap):
    p = _put(table_heap, 3, 1, 100)
    with pheap.open(table_heap, "w") as h:
        h.write(p + 50, b"!")
    with pytest.raises(torture.Failure, match="slot 3: record"):
        torture.resolve(table_heap, {3: (1, 100, 100)}, None, torture.Stats())


def test_verifier_rejects_a_leak(table_heap):
    _put(table_heap, 3, 1, 100)
    with pheap.open(table_heap, "w") as h:
        h.malloc(40)  # named by nothing
    with pytest.raises(torture.Failure, match="leaked"):
        torture.resolve(table_heap, {3: (1, 100, 100)}, None, torture.Stats())


def test_verifier_rejects_half_a_step(table_heap):
    """A transaction in doubt that changed two slots must be found with both or neither."""
    _put(table_heap, 3, 5, 100)  # slot 3 done, slot 4 not
    doubt = (5, "tx", {3: 100, 4: 200}, 0)
    with pytest.raises(torture.Failure, match="neither absent"):
        torture.resolve(table_heap, {}, doubt, torture.Stats())
    _put(table_heap, 4, 5, 200)
    stats = torture.Stats()
    assert torture.resolve(table_heap, {}, doubt, stats) == {3: (5, 100, 100),
                                                             4: (5, 200, 200)}
    assert stats.doubt == {"tx: present": 1}


def test_verifier_finishes_an_unpublished_plain_malloc(table_heap):
    with pheap.open(table_heap, "w") as h:
        p = h.malloc(500)  # allocated, killed before the table word was stored
    stats = torture.Stats()
    assert torture.resolve(table_heap, {}, (7, "plain-malloc", 9, 500), stats) == {}
    assert stats.fixups["free"] == 1
    with pheap.open(table_heap, "r") as h:
        assert not any(b.offset == p and not b.free for b in h.walk(slots=True))
