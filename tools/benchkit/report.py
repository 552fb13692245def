"""Printing results: plain-text tables, medians, spreads, ratio columns and footnotes.

``Out`` prints to stdout and, with ``-o FILE``, to a file as well. ``Out.table`` aligns a table
(first column left, the others right). The number formats (``us``, ``ratio``, ``pct``,
``spread``) are the ones every table of the benchmarks uses.

``Row`` and ``results_table`` are the measured-against-peers table of the object benchmark: per
row the samples of each column, how many ops a budget let it do, what its verification found,
or why it could not run; printed as medians, a spread, ratios against a reference row, a check
column, then footnotes (the reference, the rows cut by the budget, the fastest row per column).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TextIO


class Out:
    """print() to stdout and, when given, to a file as well."""

    def __init__(self, fh: TextIO | None = None, echo: bool = True) -> None:
        self.fh = fh
        self.echo = echo  #: print to stdout too

    def __call__(self, *parts: object) -> None:
        line = " ".join(str(p) for p in parts)
        if self.echo:
            print(line, flush=True)
        if self.fh is not None:
            self.fh.write(line + "\n")
            self.fh.flush()

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]],
              left: Sequence[int] = ()) -> None:
        """First column (and those in ``left``) left-aligned, the others right-aligned; an
        empty first cell prints an empty line; a row of two cells whose second is a
        :class:`Span` prints the first cell and then the span's text across the other
        columns."""
        for line in table_lines(headers, rows, left):
            self(line)


class Span(str):
    """A cell that stands for the rest of its row (``name  not available (why)``)."""


def table_lines(headers: Sequence[str], rows: Sequence[Sequence[object]],
                left: Sequence[int] = ()) -> list[str]:
    """The lines of :meth:`Out.table`.

    >>> for line in table_lines(["store", "set", "get"], [["a", 1, 22], ["bb", 333, 4],
    ...                                                    ["c", Span("not available")]]):
    ...     print(line)
    store  set  get
    -----  ---  ---
    a        1   22
    bb     333    4
    c      not available
    """
    spans = {k for k, r in enumerate(rows) if len(r) == 2 and isinstance(r[1], Span)}
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    grid = [c for k, c in enumerate(cells) if k - 1 not in spans]
    widths = [max(len(r[k]) for r in grid) for k in range(len(headers))]
    widths[0] = max([widths[0]] + [len(cells[k + 1][0]) for k in spans])

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(widths[k]) if k == 0 or k in left else c.rjust(widths[k])
                         for k, c in enumerate(r)).rstrip()
    lines = [fmt(cells[0]), "  ".join("-" * wd for wd in widths)]
    for k, r in enumerate(cells[1:]):
        if not r[0]:
            lines.append("")
        elif k in spans:
            lines.append(f"{r[0].ljust(widths[0])}  {r[1]}")
        else:
            lines.append(fmt(r))
    return lines


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def ratio(x: float) -> str:
    return f"{x:.2f}x"


def us(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def spread(xs: Sequence[float]) -> str:
    """(max - min) / median of the repeats, as a percentage.

    >>> spread([1.0, 1.1, 0.9])
    '20 %'
    """
    return f"{100 * (max(xs) - min(xs)) / statistics.median(xs):.0f} %"


def fig(x: float) -> str:
    """A figure in 3-4 significant digits, whatever its size (µs from 0.05 to 10**5).

    >>> fig(0.0456), fig(3.14159), fig(42.42), fig(1234.5)
    ('0.046', '3.14', '42.4', '1234')
    """
    if x < 0.1:
        return f"{x:.2g}"
    if x < 1:
        return f"{x:.3f}"
    if x < 10:
        return f"{x:.2f}"
    if x < 1000:
        return f"{x:.1f}"
    return f"{x:.0f}"


def xratio(x: float) -> str:
    """A ratio column's cell: '1.00x', '0.041x', '250x'.

    >>> xratio(1), xratio(0.0412), xratio(3.14159), xratio(250.4)
    ('1.00x', '0.041x', '3.14x', '250x')
    """
    if x >= 100:
        return f"{x:.0f}x"
    if x >= 0.1:
        return f"{x:.2f}x"
    return f"{x:.2g}x"


# ---------------------------------------------------------------------------------------------
# The measured-against-peers table
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One system's results in one table.

    ``samples[col]`` holds one figure per repeat (µs per op, or seconds); ``done[col]`` the
    fewest ops any repeat finished before the budget ran out, when that is fewer than the full
    count; ``lost``/``wrong`` what verification found (an update missing afterwards; a value read
    back that differs from the one written), summed over the repeats; ``failed`` one message per
    repeat that raised; ``unavailable`` why the system could not run here at all.
    """

    name: str
    floor: bool = False  #: a reference point (plain dict, one sum in the parent): never 'fastest'
    unavailable: str | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)
    done: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    wrong: int = 0
    checked: int = 0  #: values verified, over all repeats
    failed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  #: shown in the check column

    def add(self, col: str, value: float, done: int | None = None, full: int | None = None
            ) -> None:
        """One repeat's figure for ``col``; ``done < full``: the budget cut the repeat short."""
        self.samples.setdefault(col, []).append(value)
        if done is not None and full is not None and done < full:
            self.done[col] = min(self.done.get(col, full), done)

    def median(self, col: str) -> float | None:
        xs = self.samples.get(col)
        return statistics.median(xs) if xs else None

    @property
    def flagged(self) -> bool:
        """Lost an update, read a wrong value or failed: never 'fastest', never a reference."""
        return bool(self.lost or self.wrong or self.failed)

    def check_cell(self) -> str:
        """'ok', or what went wrong, for the check column."""
        probs = []
        if self.lost:
            probs.append(f"LOST {self.lost:,}")
        if self.wrong:
            probs.append(f"WRONG {self.wrong:,}")
        if self.failed:
            probs.append(f"FAILED {len(self.failed)}x: {self.failed[0]}")
        if probs:
            return "!!! " + "; ".join(probs) + (f" of {self.checked:,} checked"
                                               if self.checked and (self.lost or self.wrong)
                                               else "")
        return "; ".join(self.notes) if self.notes else "ok"


def reference(rows: Iterable[Row], cols: Sequence[str], fallbacks: Sequence[str]) -> Row | None:
    """The row ratios are taken against: the first pheap row with figures in every column and
    no flag, else the first of ``fallbacks`` (by name) that qualifies."""
    ok = [r for r in rows if not r.flagged and all(r.median(c) for c in cols)]
    for r in ok:
        if r.name.startswith("pheap"):
            return r
    for name in fallbacks:
        for r in ok:
            if r.name == name:
                return r
    return None


def results_table(out: Out, rows: Sequence[Row], cols: Sequence[str], unit: str = "µs",
                  fallbacks: Sequence[str] = (), budget: float | None = None,
                  units: dict[str, str] | None = None, best: str = "fastest",
                  fmt: Callable[[float], str] = fig) -> Row | None:
    """Print rows as: name | median per column ('*': cut by the budget) | spread | ratio to the
    reference per column | check; then the footnotes. ``units`` overrides ``unit`` per column;
    ``best`` names the lowest figure ('fastest', 'smallest'). Returns the reference row."""
    units = units or {}
    ref = reference(rows, cols, fallbacks)
    headers = ["system"] + [f"{c} {units.get(c, unit)}" for c in cols] + ["spread"]
    headers += [f"{c} /ref" for c in cols] if ref else []
    headers += ["check"]
    table: list[list[object]] = []
    cuts = []
    lowest: dict[str, tuple[str, float] | None] = dict.fromkeys(cols)
    for r in rows:
        if r.unavailable is not None:
            table.append([r.name, Span(r.unavailable)])
            continue
        if not any(r.samples.get(c) for c in cols):
            table.append([r.name, Span(r.check_cell() if r.flagged else "no figures")])
            continue
        meds = {c: r.median(c) for c in cols}
        cells: list[object] = [r.name]
        for c in cols:
            m = meds[c]
            cells.append("-" if m is None else fmt(m) + ("*" if c in r.done else ""))
        spreads = [(max(xs) - min(xs)) / statistics.median(xs)
                   for c in cols if (xs := r.samples.get(c)) and len(xs) > 1
                   and statistics.median(xs) > 0]
        cells.append(f"{100 * max(spreads):.0f} %" if spreads else "-")
        if ref:
            for c in cols:
                m, rm = meds[c], ref.median(c)
                cells.append("-" if m is None or not rm else xratio(m / rm))
        cells.append(r.check_cell())
        table.append(cells)
        if r.done:
            cuts.append(f"{r.name} " + ", ".join(f"{c} {n:,}" for c, n in r.done.items()))
        if not r.floor and not r.flagged:
            for c in cols:
                m = meds[c]
                low = lowest[c]
                if m is not None and (low is None or m < low[1]):
                    lowest[c] = (r.name, m)
    out.table(headers, table, left=(len(headers) - 1,))
    if ref:
        worse = "slower" if best == "fastest" else "more"
        out(f"/ref = this / {ref.name}, per column (> 1: {worse} than it); spread = (max - min) "
            f"/ median of the repeats, the largest over the columns")
    else:
        out("no reference row has figures: no ratio columns")
    if cuts:
        out(f"* cut short by the {budget} s budget; the figure is over the ops done (fewest "
            f"over the repeats): " + "; ".join(cuts))
    named = [f"{c}: {v[0]} ({fmt(v[1])} {units.get(c, unit)})" for c, v in lowest.items() if v]
    if named:
        out(f"{best} (floors and flagged rows left out): " + "; ".join(named))
    return ref
