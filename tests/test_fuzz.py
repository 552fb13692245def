"""Corruption fuzzing (tools/fuzz_corrupt.py): the small CI run ends with no silent wrong data, no
crash, no hang and no unexpected exception; and the checker's judgement itself is tested, so
that a zero there means something."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "fuzz_corrupt.py")
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _load():
    spec = importlib.util.spec_from_file_location("fuzz_corrupt", TOOL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_corrupt", mod)
    spec.loader.exec_module(mod)
    return mod


fuzz = _load()

#: kinds of damage that open must always refuse (the header or the journal cannot be trusted)
ALWAYS_REFUSED = ("magic", "immutable", "truncate", "journal_bad_check", "journal_bad_crc",
                  "journal_past_log", "journal_forbidden")
#: kinds that always break an invariant check() verifies
ALWAYS_REPORTED = ("above_zero_from", "alloc_bitmap", "block_footer", "page_map", "bins")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """The small CI run of the docstring, with its figures written as JSON."""
    out = tmp_path_factory.mktemp("fuzz") / "figures.json"
    res = subprocess.run([sys.executable, TOOL, "-n", "300", "--seed", "7", "-v", "--json",
                          str(out)], env=ENV, capture_output=True, text=True, timeout=280)
    with open(out) as fh:
        return res, json.load(fh)


@pytest.mark.timeout(300)
def test_small_run_has_no_failures(small_run):
    res, fig = small_run
    failures = "\n".join(f"case {c['case']} {c['kind']}: {c['outcome']}: {c['detail']} "
                         f"(damage: {c['note']}; diff: {c['diff']})" for c in fig["failures"])
    assert fig["failures"] == [], failures
    assert all(fig["outcomes"].get(o, 0) == 0 for o in fuzz.FAILURES), fig["outcomes"]
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.timeout(300)
def test_small_run_covers_every_kind_and_judges_them(small_run):
    _, fig = small_run
    assert fig["n"] == 300 and sum(fig["outcomes"].values()) == 300
    assert set(fig["by_kind"]) == set(fuzz.KINDS)  # every structure was damaged
    for kind in ALWAYS_REFUSED:
        assert fig["by_kind"][kind] == {"refused": fig["by_kind"][kind]["refused"]}, kind
    for kind in ALWAYS_REPORTED:
        assert fig["by_kind"][kind] == {"reported": fig["by_kind"][kind]["reported"]}, kind
    # Damage inside live payloads is the damage itself, read back; damage in free space is
    # harmless. Neither is ever a failure nor anything else.
    assert set(fig["by_kind"]["user_bytes"]) == {"user bytes"}
    assert set(fig["by_kind"]["free_space"]) == {"harmless"}


# -- the checker's judgement ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    d = tmp_path_factory.mktemp("pristine")
    data, facts = fuzz.prepare(str(d), 7)
    return str(d), data, facts


def _judge(pristine, buf, name="test"):
    d, data, facts = pristine
    case = fuzz.new_case(0, name, name, data, buf, facts, os.path.join(d, "case.heap"))
    return fuzz.classify(case, buf, 7, data, facts)


def _some_live(facts, slot):
    return next(o for o, (u, s) in sorted(facts.live.items()) if s == slot and u >= 16)


@pytest.mark.parametrize("slot", [True, False])
def test_payload_only_damage_is_user_bytes(pristine, slot):
    _, data, facts = pristine
    buf = bytearray(data)
    p = _some_live(facts, slot)
    buf[p + 3] ^= 0x40
    case = _judge(pristine, buf)
    assert case.payload_only and case.outcome == "user bytes", case.result


def test_payload_damage_with_other_damage_is_silent_wrong_data(pristine):
    """The diff is not entirely inside live payloads, so the changed payload byte is not excused:
    it counts as silent wrong data although check() has nothing to see."""
    _, data, facts = pristine
    buf = bytearray(data)
    p = _some_live(facts, False)
    buf[p + 3] ^= 0x40
    b, size = next(x for x in facts.free_blocks if x[1] >= 64)
    buf[b + 40] ^= 0x01  # inside a free block: harmless alone
    case = _judge(pristine, buf)
    assert not case.payload_only
    assert case.outcome == "silent wrong data", case.result
    assert str(p) in str(case.result["detail"])


def test_free_space_damage_alone_is_harmless(pristine):
    _, data, facts = pristine
    buf = bytearray(data)
    b, size = next(x for x in facts.free_blocks if x[1] >= 64)
    buf[b + 40] ^= 0x01
    case = _judge(pristine, buf)
    assert not case.payload_only and case.outcome == "harmless", case.result


def test_checker_sees_a_changed_root_entry(pristine):
    _, data, facts = pristine
    buf = bytearray(data)
    other = next(o for o in facts.live if o != facts.entries["root"])
    fuzz.put(buf, fuzz.F.H_ROOT, other)  # a live block: open and check() cannot tell
    case = _judge(pristine, buf)
    assert case.outcome == "silent wrong data" and "root" in str(case.result["detail"])


def _exit_of(action) -> str:
    """The outcome ``finish`` gives a checker that ends by ``action`` in the child."""
    case = fuzz.Case(0, "test", "", "", False, "")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        action(w)
        os._exit(0)
    os.close(w)
    case.rfd = r
    _, status = os.waitpid(pid, 0)
    fuzz.finish(case, status)
    return case.outcome


def test_exit_statuses_map_to_their_buckets():
    assert _exit_of(lambda w: os.kill(os.getpid(), signal.SIGKILL)) == "crash"
    def alarm(w):
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # as the checker has it
        os.kill(os.getpid(), signal.SIGALRM)

    assert _exit_of(alarm) == "hang"
    assert _exit_of(lambda w: os._exit(70)) == "unexpected exception"
    assert _exit_of(lambda w: os.write(w, fuzz.pickle.dumps({"outcome": "reported"}))) == \
        "reported"
