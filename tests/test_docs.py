"""The docs stay true: generated files up to date, every public name documented, links and
figures backed. (The README's examples run as doctests: pyproject's testpaths include it.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys


import pheap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + [
    os.path.join(ROOT, "docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
    if f.endswith(".md")]


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_generated_docs_are_up_to_date():
    """docs/api.md and docs/format.md are made from the docstrings; rerun the generator after
    changing one (python3 tools/gen_docs.py)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gen_docs.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_every_public_name_is_in_the_api_reference():
    api = _read(os.path.join(ROOT, "docs", "api.md"))
    missing = [n for n in pheap.__all__ if n != "__version__" and f"pheap.{n}" not in api
               and f"`{n}`" not in api]
    assert not missing, f"not in docs/api.md: {missing}"
    for cls in (pheap.Heap, pheap.SharedDict, pheap.SharedList, pheap.SharedQueue,
                pheap.SharedCounter, pheap.Session):
        for name, val in vars(cls).items():
            if name.startswith("_") or not (callable(val) or isinstance(val, property)):
                continue
            assert f"`{cls.__name__}.{name}" in api, f"{cls.__name__}.{name} not in docs/api.md"


def test_public_methods_have_docstrings():
    bare = []
    for cls in (pheap.Heap, pheap.SharedDict, pheap.SharedList, pheap.SharedQueue,
                pheap.SharedCounter, pheap.Session):
        for name, val in vars(cls).items():
            if name.startswith("_"):
                continue
            if isinstance(val, property):
                val = val.fget
            if callable(val) and not (val.__doc__ or "").strip():
                bare.append(f"{cls.__name__}.{name}")
    assert not bare, f"public methods without a docstring: {bare}"


def test_docs_stand_alone():
    """No doc sends a user to files they do not have."""
    for path in DOCS:
        text = _read(path)
        for bad in ("../shared", "DESIGN.md", "STYLE.md", "design notes"):
            assert bad not in text, f"{os.path.relpath(path, ROOT)} mentions {bad!r}"


def test_links_between_docs_resolve():
    for path in DOCS:
        text = _read(path)
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            full = os.path.normpath(os.path.join(os.path.dirname(path), target))
            assert os.path.exists(full), f"{os.path.relpath(path, ROOT)} links to {target}"


def test_readme_opens_with_the_two_commands():
    text = _read(os.path.join(ROOT, "README.md"))
    first = re.search(r"```sh\n(.*?)```", text, re.S)
    assert first and text.index(first.group(0)) < 1500
    cmds = [ln for ln in first.group(1).splitlines() if ln.strip()]
    assert len(cmds) == 2
    assert "pheap demo" in cmds[0] and "pytest" in cmds[1]
    ci = _read(os.path.join(ROOT, ".ci", "run"))
    assert cmds[1].strip() in ci, ".ci/run must run exactly the README's test command"


def test_every_figure_in_the_readme_comes_from_the_benchmark_file():
    """Figures with a unit of time in the README appear in docs/benchmarks.md."""
    readme = _read(os.path.join(ROOT, "README.md"))
    bench = _read(os.path.join(ROOT, "docs", "benchmarks.md"))
    for num, unit in re.findall(r"(\d+(?:\.\d+)?) ?(µs|ms)\b", readme):
        assert num in bench, f"README figure {num} {unit} is not in docs/benchmarks.md"
