"""The topology figure: widths over training and each space's singular values over the epochs.

It is drawn straight into a Pillow image (Pillow comes with torchvision): a few milliseconds and no
plotting library to import, so the figure the callback writes at the end of every fit costs that
fit almost nothing. ``topology_image(...).save("topology.png")`` writes it; ``numpy.asarray`` of the
image is the ``(height, width, 3)`` array that image loggers take.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["topology_image"]

WIDTH = 1100
ROW_HEIGHT = 250
_MARGIN_TOP, _MARGIN_BOTTOM = 40, 50
#: Colours of the spaces, in order (matplotlib's "tab10").
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
_INK, _GRID, _THRESHOLD = (30, 30, 30), (225, 225, 225), (220, 20, 60)
# The dots of a scatter: a disk of radius 2 pixels.
_DOT = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if dx * dx + dy * dy <= 5]

Font = Any  # a Pillow font (FreeType when available, else the built-in bitmap font)


def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _rgb(colour: str) -> Tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def nice_ticks(lo: float, hi: float, count: int = 5) -> List[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering ``[lo, hi]``, about ``count`` of them.

    Example:
        >>> nice_ticks(0, 2500)
        [0.0, 500.0, 1000.0, 1500.0, 2000.0, 2500.0]
    """
    if not hi > lo:
        return [float(lo)]
    raw = (hi - lo) / max(1, count)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    slack = 1e-12 * max(abs(lo), abs(hi), step)  # round-off of k * step
    k = math.ceil((lo - slack) / step)
    ticks = []
    while k * step <= hi + slack:
        ticks.append(k * step + 0.0)  # + 0.0: no "-0"
        k += 1
    return ticks


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e5 or value == 0 else f"{value:.1e}"


class _Panel:
    """A plotting area: data ``xlim`` x ``ylim`` mapped onto the pixel box ``(left, top, right, bottom)``."""

    def __init__(self, draw: ImageDraw.ImageDraw, box: Tuple[int, int, int, int], xlim: Tuple[float, float],
                 ylim: Tuple[float, float]) -> None:
        self.draw, self.box = draw, box
        self.xlim = xlim if xlim[1] > xlim[0] else (xlim[0] - 1.0, xlim[0] + 1.0)
        self.ylim = ylim if ylim[1] > ylim[0] else (ylim[0] - 1.0, ylim[0] + 1.0)

    def px(self, x: Any) -> Any:
        left, _, right, _ = self.box
        return left + (np.asarray(x, dtype=float) - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * (right - left)

    def py(self, y: Any) -> Any:
        _, top, _, bottom = self.box
        return bottom - (np.asarray(y, dtype=float) - self.ylim[0]) / (self.ylim[1] - self.ylim[0]) * (bottom - top)

    def axes(self, font: Font, title: str, xlabel: Optional[str], ylabel: str, image: Image.Image,
             integer_x: bool = False) -> None:
        draw = self.draw
        left, top, right, bottom = self.box
        for y in nice_ticks(*self.ylim):
            if self.ylim[0] <= y <= self.ylim[1]:
                row = float(self.py(y))
                draw.line([(left, row), (right, row)], fill=_GRID)
                draw.text((left - 6, row), _label(y), fill=_INK, font=font, anchor="rm")
        xticks = nice_ticks(*self.xlim)
        if integer_x:
            xticks = sorted({float(round(x)) for x in xticks if abs(x - round(x)) < 1e-9})
        for x in xticks:
            if self.xlim[0] <= x <= self.xlim[1]:
                col = float(self.px(x))
                draw.line([(col, top), (col, bottom)], fill=_GRID)
                draw.text((col, bottom + 5), _label(x), fill=_INK, font=font, anchor="mt")
        draw.rectangle(self.box, outline=_INK)
        draw.text(((left + right) / 2, top - 6), title, fill=_INK, font=font, anchor="md")
        if xlabel:
            draw.text(((left + right) / 2, bottom + 22), xlabel, fill=_INK, font=font, anchor="mt")
        # The y label, turned a quarter: drawn on its own strip, rotated, then pasted.
        width = int(draw.textlength(ylabel, font=font)) + 4
        strip = Image.new("RGB", (width, 16), "white")
        ImageDraw.Draw(strip).text((2, 8), ylabel, fill=_INK, font=font, anchor="lm")
        strip = strip.rotate(90, expand=True)
        image.paste(strip, (left - 58, int((top + bottom) / 2 - width / 2)))

    def dots(self, pixels: np.ndarray, xs: Sequence[float], ys: Sequence[float], colour: Tuple[int, int, int]) -> None:
        """A scatter, painted into ``pixels`` (the image's array) in one vectorised step."""
        if not len(xs):
            return
        cols = np.rint(self.px(xs)).astype(np.int64)
        rows = np.rint(self.py(ys)).astype(np.int64)
        height, width = pixels.shape[:2]
        for dy, dx in _DOT:
            r, c = rows + dy, cols + dx
            keep = (r >= 0) & (r < height) & (c >= 0) & (c < width)
            pixels[r[keep], c[keep]] = colour


def _legend(draw: ImageDraw.ImageDraw, font: Font, box: Tuple[int, int, int, int],
            entries: Sequence[Tuple[str, Tuple[int, int, int]]],
            lines: Sequence[Sequence[Tuple[float, float]]]) -> None:
    """The legend, in the corner of ``box`` that the curves ``lines`` (pixel polylines) cross least."""
    width, height = 150, 16 * len(entries) + 6
    left, top, right, bottom = box
    corners = [(right - width - 6, top + 6), (left + 6, top + 6), (right - width - 6, bottom - height - 6),
               (left + 6, bottom - height - 6)]
    samples = [(a[0] + (b[0] - a[0]) * t / 16, a[1] + (b[1] - a[1]) * t / 16)
               for line in lines for a, b in zip(line, line[1:]) for t in range(17)]

    def crossings(corner: Tuple[int, int]) -> int:
        x0, y0 = corner
        return sum(x0 - 4 <= x <= x0 + width + 4 and y0 - 4 <= y <= y0 + height + 4 for x, y in samples)

    x0, y0 = min(corners, key=crossings)
    draw.rectangle((x0, y0, x0 + width, y0 + height), fill="white", outline=_GRID)
    for i, (name, colour) in enumerate(entries):
        y = y0 + 11 + 16 * i
        draw.line([(x0 + 6, y), (x0 + 26, y)], fill=colour, width=2)
        draw.text((x0 + 32, y), name if len(name) <= 20 else "..." + name[-17:], fill=_INK, font=font, anchor="lm")


def topology_image(history: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]] = (),
                   threshold: Optional[float] = None) -> Image.Image:
    """Widths of every space over the optimizer steps, and each space's singular values over the epochs.

    Args:
        history: records ``{"epoch", "step", "space", "width", "singular_values"}``, one per space
            per snapshot (the callback takes one at the end of every training epoch).
        events: topology changes (``{"step", "space", "op", "new_width", ...}``); grows and shrinks
            are steps of the width curves, marked ``+`` and ``-``.
        threshold: a dashed horizontal line on the spectra (a policy's threshold).

    Returns:
        An RGB :class:`PIL.Image.Image`, ``1100`` pixels wide and ``250`` high per space (plus margins).

    Example:
        >>> record = {"epoch": 0, "step": 10, "space": "hidden.0", "width": 3, "singular_values": [2.0, 1.0, 0.5]}
        >>> topology_image([record], threshold=0.9).size
        (1100, 340)
    """
    spaces: List[str] = []
    for record in history:
        if record["space"] not in spaces:
            spaces.append(record["space"])
    rows = max(1, len(spaces))
    height = _MARGIN_TOP + ROW_HEIGHT * rows + _MARGIN_BOTTOM
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(12), _font(11)
    colours = {space: _rgb(PALETTE[i % len(PALETTE)]) for i, space in enumerate(spaces)}
    by_space: Dict[str, List[Mapping[str, Any]]] = {s: [r for r in history if r["space"] == s] for s in spaces}

    # Width curves: snapshots give the width before a change, events the width after it.
    curves: Dict[str, List[Tuple[float, int, float]]] = {}
    marks: List[Tuple[str, float, float, str]] = []
    for space, records in by_space.items():
        changes = [e for e in events if e.get("space") == space and e.get("op") in ("grow", "shrink")]
        points = sorted([(float(r["step"]), 0, float(r["width"])) for r in records]
                        + [(float(e["step"]), 1, float(e["new_width"])) for e in changes])
        if points and points[0][0] > 0:  # the width at the start of training, before the first change
            first = min(changes, key=lambda e: e["step"], default=None)
            before = first is not None and (not records or first["step"] < records[0]["step"])
            start = float(first.get("old_width", first["new_width"])) if before and first is not None \
                else points[0][2]
            points.insert(0, (0.0, 0, start))
        curves[space] = points
        marks += [(space, float(e["step"]), float(e["new_width"]), "+" if e["op"] == "grow" else "-") for e in changes]
    all_points = [p for points in curves.values() for p in points]
    steps = [p[0] for p in all_points] or [0.0, 1.0]
    widths = [p[2] for p in all_points] or [0.0, 1.0]
    pad = max(1.0, 0.08 * (max(widths) - min(widths)))
    box = (70, _MARGIN_TOP, 450, height - _MARGIN_BOTTOM)
    panel = _Panel(draw, box, (0.0, max(steps)), (max(0.0, min(widths) - pad), max(widths) + pad))
    panel.axes(font, "Hidden widths (+ grow, - shrink)", "optimizer step", "width (neurons)", image)
    lines: Dict[str, List[Tuple[float, float]]] = {}
    for space, points in curves.items():
        line: List[Tuple[float, float]] = []
        for step, _, width in points:
            x, y = float(panel.px(step)), float(panel.py(width))
            if line:
                line.append((x, line[-1][1]))  # hold the previous width up to this step
            line.append((x, y))
        if len(line) == 1:
            line.append(line[0])
        lines[space] = line
        draw.line(line, fill=colours[space], width=2)
    for space, step, width, sign in marks:  # "+" above the width after a grow, "-" below it after a shrink
        x, y = float(panel.px(step)), float(panel.py(width))
        y = y - 8 if sign == "+" else y + 8
        draw.line([(x - 4, y), (x + 4, y)], fill=colours[space], width=2)
        if sign == "+":
            draw.line([(x, y - 4), (x, y + 4)], fill=colours[space], width=2)
    if spaces:
        _legend(draw, small, box, [(space, colours[space]) for space in spaces], list(lines.values()))
    if not spaces:
        draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), "no snapshots", fill=_INK, font=font, anchor="mm")

    spectra: List[Tuple[_Panel, List[float], List[float], Tuple[int, int, int]]] = []
    for row, space in enumerate(spaces):
        records = by_space[space]
        xs: List[float] = []
        ys: List[float] = []
        for record in records:
            for value in record["singular_values"]:
                if math.isfinite(float(value)):
                    xs.append(float(record["epoch"]))
                    ys.append(float(value))
        top_value = max(ys + ([threshold] if threshold is not None else []) + [1e-12])
        epochs = [float(r["epoch"]) for r in records]
        top = _MARGIN_TOP + ROW_HEIGHT * row
        spectrum = _Panel(draw, (540, top + 10, WIDTH - 25, top + ROW_HEIGHT - 45),
                          (min(epochs) - 0.5, max(epochs) + 0.5), (0.0, 1.06 * top_value))
        spectrum.axes(small, f"{space}: singular values per epoch", "epoch" if row == rows - 1 else None,
                      "singular value", image, integer_x=True)
        spectra.append((spectrum, xs, ys, colours[space]))
    # The dots go on top of the grids, painted into the pixels directly.
    pixels = np.asarray(image).copy()
    for spectrum, xs, ys, colour in spectra:
        spectrum.dots(pixels, xs, ys, colour)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    if threshold is not None:
        for spectrum, _, _, _ in spectra:
            y = float(spectrum.py(threshold))
            left, _, right, _ = spectrum.box
            for x in range(left, right, 12):  # dashed
                draw.line([(x, y), (min(x + 6, right), y)], fill=_THRESHOLD, width=1)
            label = f"threshold {threshold:g}"
            x0, y0, x1, y1 = draw.textbbox((right - 6, y - 3), label, font=small, anchor="rd")
            draw.rectangle((x0 - 2, y0 - 1, x1 + 2, y1 + 1), fill="white")  # over the dots
            draw.text((right - 6, y - 3), label, fill=_THRESHOLD, font=small, anchor="rd")
    return image
