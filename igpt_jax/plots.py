"""Line charts drawn with Pillow (no plotting dependency): the probe's Figure 2 and Figure 3 analogues.

`line_chart` draws series of (x, y) points with markers, horizontal reference lines (baselines), axes with ticks,
axis labels, a title and a legend, and writes a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.3g}"


def _dashed(draw: ImageDraw.ImageDraw, p0, p1, fill, width: int, dash: int = 8) -> None:
    (x0, y0), (x1, y1) = p0, p1
    length = math.hypot(x1 - x0, y1 - y0)
    n = max(int(length // dash), 1)
    for i in range(0, n, 2):
        a, b = i / n, min((i + 1) / n, 1.0)
        draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                  fill=fill, width=width)


def line_chart(path: str, *, series: Sequence[dict[str, Any]], hlines: Sequence[dict[str, Any]] = (),
               title: str = "", xlabel: str = "", ylabel: str = "", size: tuple[int, int] = (900, 600),
               integer_x: bool = False, point_labels: bool = False) -> None:
    """Writes a PNG line chart.

    Args:
      path: output file (local path; written through `etils.epath` for URLs).
      series: dicts with 'x', 'y' (sequences), 'label', optional 'color', 'dashed' (bool), 'labels' (a text per
        point, drawn next to it when point_labels).
      hlines: dicts with 'y', 'label', optional 'color': horizontal reference lines across the plot.
      title, xlabel, ylabel: texts.
      size: (width, height) in pixels.
      integer_x: integer x ticks (layer numbers).
      point_labels: annotate points with their 'labels'.
    """
    width, height = size
    left, right, top, bottom = 80, 30, 50, 70
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(16), _font(13)

    xs = [float(x) for s in series for x in s["x"]]
    ys = [float(y) for s in series for y in s["y"] if y is not None and math.isfinite(y)]
    ys += [float(h["y"]) for h in hlines if h.get("y") is not None and math.isfinite(h["y"])]
    if not xs:
        xs = [0.0, 1.0]
    if not ys:
        ys = [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    pad_x = 0.04 * (x_hi - x_lo)
    x_lo, x_hi = x_lo - pad_x, x_hi + pad_x
    y_lo, y_hi = min(ys), max(ys)
    pad_y = 0.08 * (y_hi - y_lo) if y_hi > y_lo else 0.05
    y_lo, y_hi = y_lo - pad_y, y_hi + pad_y

    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * pw

    def py(y: float) -> float:
        return top + (1 - (y - y_lo) / (y_hi - y_lo)) * ph

    # Grid, ticks and axes.
    xticks = _nice_ticks(x_lo, x_hi, 8)
    if integer_x:
        step = max(1, int(math.ceil((x_hi - x_lo) / 12)))
        xticks = [t for t in range(int(math.ceil(x_lo)), int(math.floor(x_hi)) + 1) if t % step == 0]
    for t in xticks:
        x = px(t)
        draw.line([(x, top), (x, top + ph)], fill="#eeeeee")
        draw.line([(x, top + ph), (x, top + ph + 5)], fill="black")
        draw.text((x, top + ph + 8), _fmt(t), fill="black", font=small, anchor="ma")
    for t in _nice_ticks(y_lo, y_hi, 7):
        y = py(t)
        draw.line([(left, y), (left + pw, y)], fill="#eeeeee")
        draw.line([(left - 5, y), (left, y)], fill="black")
        draw.text((left - 8, y), _fmt(t), fill="black", font=small, anchor="rm")
    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    draw.text((width / 2, 15), title, fill="black", font=font, anchor="ma")
    draw.text((left + pw / 2, height - 22), xlabel, fill="black", font=font, anchor="ma")
    label = Image.new("RGB", (ph, 24), "white")
    ImageDraw.Draw(label).text((ph / 2, 2), ylabel, fill="black", font=font, anchor="ma")
    img.paste(label.rotate(90, expand=True), (8, top))

    legend: list[tuple[str, str, bool]] = []
    for i, h in enumerate(hlines):
        if h.get("y") is None or not math.isfinite(h["y"]):
            continue
        colour = h.get("color", COLOURS[(len(series) + i) % len(COLOURS)])
        _dashed(draw, (left, py(h["y"])), (left + pw, py(h["y"])), colour, 2)
        legend.append((h["label"], colour, True))
    for i, s in enumerate(series):
        colour = s.get("color", COLOURS[i % len(COLOURS)])
        pts = [(px(float(x)), py(float(y))) for x, y in zip(s["x"], s["y"]) if y is not None and math.isfinite(y)]
        for a, b in zip(pts, pts[1:]):
            (_dashed(draw, a, b, colour, 3) if s.get("dashed") else draw.line([a, b], fill=colour, width=3))
        for j, (x, y) in enumerate(pts):
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
            if point_labels and s.get("labels"):
                draw.text((x + 6, y - 6), str(s["labels"][j]), fill=colour, font=small, anchor="lb")
        legend.append((s["label"], colour, bool(s.get("dashed"))))

    # Legend box: the inside corner that covers the fewest drawn points (sampled along the lines).
    if legend:
        row = 20
        box_w = 40 + max(int(draw.textlength(t, font=small)) for t, _, _ in legend)
        box_h = row * len(legend) + 4
        samples = []
        for s in series:
            pts = [(px(float(x)), py(float(y))) for x, y in zip(s["x"], s["y"]) if y is not None and math.isfinite(y)]
            for a, b in zip(pts, pts[1:] or pts):
                samples += [(a[0] + t / 20 * (b[0] - a[0]), a[1] + t / 20 * (b[1] - a[1])) for t in range(21)]
        samples += [(left + t / 40 * pw, py(h["y"])) for h in hlines
                    if h.get("y") is not None and math.isfinite(h["y"]) for t in range(41)]
        corners = [(left + pw - box_w - 10, top + ph - box_h - 10), (left + pw - box_w - 10, top + 10),
                   (left + 10, top + 10), (left + 10, top + ph - box_h - 10)]

        def covered(corner):
            x0, y0 = corner
            return sum(x0 - 5 <= x <= x0 + box_w + 5 and y0 - 5 <= y <= y0 + box_h + 5 for x, y in samples)

        x0, y0 = min(corners, key=covered)
        draw.rectangle([x0, y0, x0 + box_w, y0 + box_h], fill="white", outline="#999999")
        for k, (text, colour, dashed) in enumerate(legend):
            y = y0 + 4 + row * k + row / 2
            (_dashed(draw, (x0 + 6, y), (x0 + 30, y), colour, 3, dash=5) if dashed
             else draw.line([(x0 + 6, y), (x0 + 30, y)], fill=colour, width=3))
            draw.text((x0 + 36, y), text, fill="black", font=small, anchor="lm")

    if "://" in str(path):
        import io  # noqa: PLC0415

        from etils import epath  # noqa: PLC0415

        buf = io.BytesIO()
        img.save(buf, format="PNG")
        epath.Path(path).write_bytes(buf.getvalue())
    else:
        img.save(path, format="PNG")
