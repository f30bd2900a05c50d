"""Charts with matplotlib (Agg backend, PNG): the probe's Figure 2 and Figure 3 analogues, and Figure 4's bars.

`line_chart` draws series of (x, y) points with markers, horizontal reference lines (baselines), labelled axes, a
title and a legend; `bar_chart` draws groups of labelled bars. Both write a PNG (local path, or any URL
`etils.epath` writes, e.g. ``gs://``).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Sequence
from typing import Any

import matplotlib
from etils import epath

matplotlib.use("Agg")  # files only, no display; set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
DPI = 100


def _finite(y: Any) -> bool:
    return y is not None and math.isfinite(float(y))


def line_chart(path: str, *, series: Sequence[dict[str, Any]], hlines: Sequence[dict[str, Any]] = (),
               title: str = "", xlabel: str = "", ylabel: str = "", size: tuple[int, int] = (900, 600),
               integer_x: bool = False, point_labels: bool = False, log_x: bool = False) -> None:
    """Writes a PNG line chart.

    Args:
      path: output file (local path; written through `etils.epath` for URLs).
      series: dicts with 'x', 'y' (sequences; None or non-finite y values are skipped), 'label', optional 'color',
        'dashed' (bool), 'labels' (a text per point, drawn next to it when point_labels).
      hlines: dicts with 'y', 'label', optional 'color': horizontal reference lines across the plot.
      title, xlabel, ylabel: texts.
      size: (width, height) in pixels.
      integer_x: integer x ticks (layer numbers).
      point_labels: annotate points with their 'labels'.
      log_x: a logarithmic x axis (learning rates).
    """
    with _figure(path, size) as ax:
        for i, s in enumerate(series):
            points = [(float(x), float(y), k) for k, (x, y) in enumerate(zip(s["x"], s["y"])) if _finite(y)]
            colour = s.get("color", COLOURS[i % len(COLOURS)])
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=5, linewidth=2,
                    linestyle="--" if s.get("dashed") else "-", color=colour, label=s["label"])
            if point_labels and s.get("labels"):
                for x, y, k in points:
                    ax.annotate(str(s["labels"][k]), (x, y), textcoords="offset points", xytext=(6, 6),
                                color=colour, fontsize=9)
        for i, h in enumerate(hlines):
            if _finite(h.get("y")):
                ax.axhline(float(h["y"]), linestyle="--", linewidth=1.5, label=h["label"],
                           color=h.get("color", COLOURS[(len(series) + i) % len(COLOURS)]))
        if log_x:
            ax.set_xscale("log")
        if integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, color="#eeeeee")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=9)


def bar_chart(path: str, *, groups: Sequence[str], bars: Sequence[dict[str, Any]], title: str = "",
              ylabel: str = "", size: tuple[int, int] = (900, 600)) -> None:
    """Writes a PNG of grouped bars, each bar labelled with its value.

    Args:
      path: output file (local path; written through `etils.epath` for URLs).
      groups: the x-axis categories (e.g. one per run).
      bars: dicts with 'label' and 'values' (one per group; None or non-finite: no bar), optional 'color'.
      title, ylabel: texts.
      size: (width, height) in pixels.
    """
    with _figure(path, size) as ax:
        width = 0.8 / max(len(bars), 1)
        for i, b in enumerate(bars):
            points = [(g + (i - (len(bars) - 1) / 2) * width, float(v)) for g, v in enumerate(b["values"])
                      if _finite(v)]
            drawn = ax.bar([p[0] for p in points], [p[1] for p in points], width=width * 0.95, label=b["label"],
                           color=b.get("color", COLOURS[i % len(COLOURS)]))
            ax.bar_label(drawn, fmt="%.1f", fontsize=8, padding=2)
        ax.set_xticks(range(len(groups)), list(groups))
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", color="#eeeeee")
        ax.set_axisbelow(True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=9)


@contextlib.contextmanager
def _figure(path: str, size: tuple[int, int]) -> Iterator[Any]:
    """Yields the axes of a new figure; after the block, writes the laid-out figure as a PNG to `path`."""
    fig, ax = plt.subplots(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)
    try:
        yield ax
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    _write(path, buf.getvalue())


def _write(path: str, data: bytes) -> None:
    """Writes `data` to a local path, or through `etils.epath` to a URL (gs://...)."""
    if "://" in str(path):
        epath.Path(path).write_bytes(data)
    else:
        with open(path, "wb") as f:
            f.write(data)
