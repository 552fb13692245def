"""The environment line every benchmark prints first, and probes of how busy the machine is.

Figures from a shared, noisy machine mean little without the machine: the line names Python,
the platform, the CPU and the cores this process may use, the date, the pheap version and the
``git describe`` of the checkout, and the file system of the temporary directory (where the
benchmarks put their files). ``cpu_idle()`` samples how idle the CPUs are before a run, and
``cpu_busy_seconds()``/``own_cpu_seconds()`` let a run report how much other work ran meanwhile.
All of it reads /proc where it can and says nothing (or '?') elsewhere.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import tempfile
import time
from importlib import metadata

#: the repository root (tools/benchkit/ is two levels below it)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fs_type(path: str) -> str:
    """File-system type of ``path`` from /proc/self/mounts ('?' when unknown)."""
    best, kind = "", "?"
    try:
        real = os.path.realpath(path)
        with open("/proc/self/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) > 2 and (real == parts[1] or real.startswith(
                        parts[1].rstrip("/") + "/")) and len(parts[1]) >= len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def cpu_idle(seconds: float = 1.0) -> float | None:
    """Fraction of CPU time idle over the next ``seconds`` (from /proc/stat; None elsewhere)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total
    try:
        i0, t0 = sample()
        time.sleep(seconds)
        i1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (i1 - i0) / max(1, t1 - t0)


def idle_line(seconds: float = 1.0) -> str | None:
    """'CPU idle in the second before the start: N %' (+ a warning below 90 %), or None."""
    idle = cpu_idle(seconds)
    if idle is None:
        return None
    return (f"CPU idle in the second before the start: {100 * idle:.0f} %"
            + ("" if idle >= 0.9 else " -- other work is running: timings will be noisy"))


def cpu_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (from /proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def own_cpu_seconds() -> float:
    """CPU seconds this process and its reaped children have used."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class BusyMeter:
    """Started at the beginning of a run; ``line()`` at its end says how long it took and how
    much CPU other processes used meanwhile."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0, self.own0 = cpu_busy_seconds(), own_cpu_seconds()

    def line(self, note: str = "") -> str:
        """'total time N s; other processes kept the CPUs busy for ...' (+ ``note`` after the
        CPU figure)."""
        wall = time.perf_counter() - self.t0
        busy = cpu_busy_seconds()
        other = ""
        if busy is not None and self.busy0 is not None:
            others = max(0.0, busy - self.busy0 - (own_cpu_seconds() - self.own0))
            other = (f"; other processes kept the CPUs busy for {others:.0f} CPU-seconds meanwhile "
                     f"(of {wall * (os.cpu_count() or 1):.0f} available){note}")
        return f"total time {wall:.0f} s{other}"


def git_describe(root: str = ROOT) -> str:
    """``git describe --always --dirty`` of the checkout ('' when git or the repository is
    missing)."""
    try:
        return subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"],
                              check=False, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('' elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


def pheap_version() -> str:
    """'pheap 0.1.0', or 'pheap not importable (...)'."""
    try:
        import pheap
    except Exception as e:  # noqa: BLE001 - any failure to import is reported, not raised
        return f"pheap not importable ({type(e).__name__}: {e})"
    return f"pheap {getattr(pheap, '__version__', '?')}"


def environment(files_in: str | None = None) -> str:
    """One line: Python, platform, CPUs, date, pheap version and commit, the file system that
    benchmark files go to (``files_in``: the temporary directory unless given)."""
    cpu = cpu_model()
    commit = git_describe()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Python {platform.python_version()} ({platform.python_implementation()}) on "
            f"{platform.platform()}, {cpu + ', ' if cpu else ''}{os.cpu_count()} CPUs "
            f"({usable_cpus()} usable), {now}; {pheap_version()}"
            + (f" at {commit}" if commit else "")
            + f"; heap files on {fs_type(files_in or tempfile.gettempdir())}")


def package_versions(dists: tuple[str, ...]) -> str:
    """'name version, ...' for the installed distributions among ``dists``; the others are
    named as 'not installed'."""
    parts = []
    for d in dists:
        try:
            parts.append(f"{d} {metadata.version(d)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{d} not installed")
    return ", ".join(parts)
