"""The map of a heap for ``pheap map``: the mapping as a strip of bytes, on the terminal or as a
picture (SVG always, PNG when Pillow is importable). No dependency of its own.

Input is a list of :class:`Segment` covering ``[0, capacity)`` in address order (the CLI builds
it from a walk); output is text rows or a picture.

Why a strip and not a treemap: a heap's story is in its addresses. Fragmentation is free blocks
*between* used ones, runs sit where small requests came in, the wilderness is the tail, the
metadata is at both ends. A strip of bytes in address order, wrapped into rows, keeps every
neighbour beside its neighbour; a treemap sorts by size and loses exactly that.

The picture draws one rectangle per block (two for a run: the share of its slots in use, then the
share free) while the heap has at most :data:`MAX_EXACT` segments; past that, every pixel shows
the kind that has most bytes under it, and neighbouring pixels of one kind are one rectangle, so
the file stays small however many blocks the heap holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final, NamedTuple
from xml.sax.saxutils import escape, quoteattr

MAX_EXACT: Final = 20000  #: segments drawn one rectangle each; beyond, drawn at pixel resolution
ROW_HEIGHT: Final = 16  #: pixels of a row of the strip
ROW_GAP: Final = 5  #: pixels between rows
MARGIN: Final = 16  #: pixels around the picture
LABEL_WIDTH: Final = 64  #: pixels left of the rows for their start offsets
FONT: Final = 12  #: font size of the picture, pixels
EDGE_MIN: Final = 4  #: a block this many pixels wide or wider gets a white edge (neighbours of
#: one kind stay apart); narrower ones would be all edge
CHAR_WIDTH: Final = 6.5  #: estimated pixels per character at FONT (layout of the legend)


class Segment(NamedTuple):
    """A stretch ``[start, end)`` of the mapping and what it is."""

    start: int  #: first byte
    end: int  #: byte past the last
    kind: str  #: a key of :data:`KINDS`
    offset: int  #: what the tooltip and the picture's data-offset call it (a block's payload)
    label: str  #: tooltip text
    fill: float = 0.0  #: a run's share of slots in use (0..1)


#: kind: (terminal character, colour, legend text). The colours are the seaborn "deep" palette,
#: told apart by most colour-blind readers; runs are two greens (slots used / free).
KINDS: Final = {
    "meta": ("M", "#8c8c8c", "metadata (header, control block, page map, allocation bitmap)"),
    "used": ("#", "#4c72b0", "used block"),
    "free": (".", "#dd8452", "free block"),
    "run": ("R", "#55a868", "run: slots used"),
    "run-free": ("r", "#b5dcbf", "run: slots free"),
    "journal": ("J", "#8172b3", "journal (transaction log block)"),
    "wild": (" ", "#eeeeee", "wilderness"),
    "damaged": ("!", "#c44e52", "damaged: not walkable"),
}


def human(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Cells: the mapping cut into equal spans, each shown as the kind with most bytes in it
# ---------------------------------------------------------------------------------------------


def cells(segments: Sequence[Segment], span: int, count: int) -> list[str]:
    """The kind of each of ``count`` cells of ``span`` bytes: the kind with most bytes in the
    cell; a cell mostly of runs is ``"run"`` when at least half its run bytes are used slots,
    else ``"run-free"``. O(segments + cells)."""
    tally: list[dict[str, float]] = [{} for _ in range(count)]
    for s in segments:
        a = s.start
        i = a // span
        while a < s.end and i < count:
            b = min(s.end, (i + 1) * span)
            t = tally[i]
            t[s.kind] = t.get(s.kind, 0) + (b - a)
            if s.kind == "run":
                t["run-used"] = t.get("run-used", 0) + (b - a) * s.fill
            a = b
            i += 1
    out = []
    for t in tally:
        if not t:
            out.append("wild")
            continue
        used = t.pop("run-used", 0.0)
        kind = max(t, key=lambda k: t[k])
        if kind == "run" and used * 2 < t["run"]:
            kind = "run-free"
        out.append(kind)
    return out


def text_map(segments: Sequence[Segment], capacity: int, width: int, rows: int
             ) -> tuple[int, list[str]]:
    """(bytes per cell, the rows of the map framed by ``|``), at most ``rows`` rows of ``width``
    characters (the last row may be shorter)."""
    span = max(8, -(-capacity // (width * rows)))
    count = -(-capacity // span)
    chars = "".join(KINDS[k][0] for k in cells(segments, span, count))
    return span, ["|" + chars[i:i + width] + "|" for i in range(0, count, width)]


def text_legend(width: int = 80) -> list[str]:
    """Lines naming every character of the text map, wrapped to ``width``."""
    names = {"meta": "metadata", "run": "run, slots mostly used", "run-free": "run, slots "
             "mostly free", "journal": "transaction log", "damaged": "damaged (not walkable)"}
    return wrap_items([f"'{c}' {names.get(k, text)}" for k, (c, _, text) in KINDS.items()],
                      "   ", width)


def wrap_items(items: Sequence[str], sep: str, width: int) -> list[str]:
    """``items`` joined by ``sep`` into lines of at most ``width`` characters where they fit
    (an item is never cut)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + len(sep) + len(item) <= width:
            lines[-1] += sep + item
        else:
            lines.append(item)
    return lines


# ---------------------------------------------------------------------------------------------
# The picture: a scene of rectangles and texts, written as SVG or PNG
# ---------------------------------------------------------------------------------------------


class Rect(NamedTuple):
    x: float
    y: float
    w: float
    h: float
    fill: str
    group: str  #: "blocks" (the heap itself), "legend" (swatches) or "frame"
    kind: str = ""
    offset: int = -1
    title: str = ""


class Text(NamedTuple):
    x: float
    y: float
    text: str
    size: int = FONT
    anchor: str = "start"  #: "start" or "end"
    bold: bool = False


class Scene(NamedTuple):
    width: int
    height: int
    title: str
    rects: list[Rect]
    texts: list[Text]
    exact: bool  #: one rectangle per block (else pixel resolution)


def picture(segments: Sequence[Segment], capacity: int, title: str, lines: Sequence[str],
            width: int = 1024, rows: int = 32) -> Scene:
    """Lay out the strip: ``rows`` rows of ``width`` pixels, under a title, the ``lines`` of
    figures and a legend. O(segments), or O(segments + pixels) past MAX_EXACT segments."""
    texts: list[Text] = []
    rects: list[Rect] = []
    y = MARGIN + FONT + 2
    texts.append(Text(MARGIN, y, title, FONT + 3, bold=True))
    for line in lines:
        y += FONT + 6
        texts.append(Text(MARGIN, y, line))
    # Legend: swatches wrapped to the picture's width.
    y += 10
    x = MARGIN
    total = LABEL_WIDTH + width
    for kind, (_, colour, text) in KINDS.items():
        need = 16 + CHAR_WIDTH * len(text) + 18
        if x > MARGIN and x + need > MARGIN + total:
            x = MARGIN
            y += FONT + 8
        rects.append(Rect(x, y, 12, 12, colour, "legend", kind))
        texts.append(Text(x + 16, y + 11, text))
        x += need
    top = y + FONT + 16

    row_bytes = max(8, -(-capacity // rows))
    nrows = -(-capacity // row_bytes)
    scale = width / row_bytes  # pixels per byte
    x0 = MARGIN + LABEL_WIDTH
    for r in range(nrows):
        ry = top + r * (ROW_HEIGHT + ROW_GAP)
        texts.append(Text(x0 - 6, ry + ROW_HEIGHT - 4, human(r * row_bytes), FONT - 2, "end"))
        rects.append(Rect(x0, ry, min(width, (capacity - r * row_bytes) * scale), ROW_HEIGHT,
                          "none", "frame"))

    def place(a: int, b: int, kind: str, offset: int, tip: str) -> None:
        """Rectangles for bytes [a, b) of one kind, cut where rows wrap."""
        while a < b:
            r = a // row_bytes
            e = min(b, (r + 1) * row_bytes)
            rects.append(Rect(x0 + (a - r * row_bytes) * scale,
                              top + r * (ROW_HEIGHT + ROW_GAP), (e - a) * scale, ROW_HEIGHT,
                              KINDS[kind][1], "blocks", kind, offset, tip))
            a = e

    exact = len(segments) <= MAX_EXACT
    if exact:
        for s in segments:
            if s.kind == "run":
                cut = s.start + round((s.end - s.start) * s.fill / 8) * 8
                place(s.start, cut, "run", s.offset, s.label)
                place(cut, s.end, "run-free", s.offset, s.label)
            else:
                place(s.start, s.end, s.kind, s.offset, s.label)
    else:
        # Pixel resolution: one cell per pixel of a row, runs of equal cells merged.
        px_bytes = row_bytes / width
        span = max(1, math.floor(px_bytes))
        count = -(-capacity // span)
        kinds = cells(segments, span, count)
        i = 0
        while i < count:
            j = i
            while j + 1 < count and kinds[j + 1] == kinds[i]:
                j += 1
            a, b = i * span, min(capacity, (j + 1) * span)
            place(a, b, kinds[i], a, f"{KINDS[kinds[i]][2]}: {human(b - a)} at {a}")
            i = j + 1
    height = top + nrows * (ROW_HEIGHT + ROW_GAP) + MARGIN
    return Scene(MARGIN * 2 + total, height, title, rects, texts, exact)


def svg(scene: Scene) -> str:
    """The scene as an SVG document (parses with xml.etree.ElementTree). The heap's rectangles
    are in ``<g id="blocks">``, each with ``class`` = its kind and ``data-offset``."""
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{scene.width}" '
           f'height="{scene.height}" viewBox="0 0 {scene.width} {scene.height}" '
           f'font-family="sans-serif" font-size="{FONT}">',
           f"<title>{escape(scene.title)}</title>",
           f'<rect id="background" width="{scene.width}" height="{scene.height}" '
           'fill="white"/>']
    for group in ("legend", "frame", "blocks"):
        out.append(f'<g id="{group}"'
                   + (' fill="none" stroke="#bbbbbb" stroke-width="1">' if group == "frame"
                      else ">"))
        for r in scene.rects:
            if r.group != group:
                continue
            box = f'x="{r.x:.2f}" y="{r.y}" width="{r.w:.2f}" height="{r.h}"'
            if group == "frame":
                out.append(f"<rect {box}/>")
            elif group == "legend":
                out.append(f'<rect class={quoteattr(r.kind)} {box} fill="{r.fill}"/>')
            else:
                edge = ' stroke="white" stroke-width="1"' if r.w >= EDGE_MIN else ""
                out.append(f'<rect class={quoteattr(r.kind)} data-offset="{r.offset}" {box} '
                           f'fill="{r.fill}"{edge}><title>{escape(r.title)}</title></rect>')
        out.append("</g>")
    out.append('<g id="text">')
    for t in scene.texts:
        extra = (' text-anchor="end"' if t.anchor == "end" else "") + \
            (' font-weight="bold"' if t.bold else "")
        out.append(f'<text x="{t.x}" y="{t.y}" font-size="{t.size}"{extra}>'
                   f"{escape(t.text)}</text>")
    out.append("</g></svg>")
    return "\n".join(out) + "\n"


def have_png() -> bool:
    """Whether Pillow is importable (PNG output)."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return False
    return True


def png(scene: Scene, path: str) -> None:
    """Draw the scene into a PNG file with Pillow (ImportError when it is missing)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (scene.width, scene.height), "white")
    draw = ImageDraw.Draw(img)
    for r in scene.rects:
        x1 = max(r.x + r.w, r.x + 1) - 1  # Pillow's boxes include their last pixel
        if r.group == "frame":
            draw.rectangle((r.x - 1, r.y - 1, x1 + 1, r.y + r.h), outline="#bbbbbb")
        else:
            draw.rectangle((r.x, r.y, x1, r.y + r.h - 1), fill=r.fill,
                           outline="white" if r.group == "blocks" and r.w >= EDGE_MIN else None)
    fonts: dict[int, tuple[object, int]] = {}  # size -> (font, baseline below the top)
    for t in scene.texts:
        if t.size not in fonts:
            try:
                font = ImageFont.load_default(t.size)
            except TypeError:  # Pillow < 10.1: one bitmap size
                font = ImageFont.load_default()
            fonts[t.size] = (font, draw.textbbox((0, 0), "x", font=font)[3])  # type: ignore
        font, base = fonts[t.size]
        # Placed by box and baseline, not by anchors (the bitmap fonts of older Pillow ignore
        # those): the baseline on y, the right edge on x for "end".
        left, _, right, _ = draw.textbbox((0, 0), t.text, font=font)  # type: ignore[arg-type]
        draw.text((t.x - (right - left) if t.anchor == "end" else t.x, t.y - base), t.text,
                  fill="black", font=font)  # type: ignore[arg-type]
    img.save(path, "PNG")
