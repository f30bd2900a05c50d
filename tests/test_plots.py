"""Line charts (matplotlib, PNG): what the probe job draws."""

import numpy as np
from PIL import Image

from igpt_jax.reports import plots


def _pixels_of(img: np.ndarray, colour: str) -> int:
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img[..., :3].astype(int) - rgb).sum(-1) < 30).sum())


def test_line_chart_draws_series_reference_lines_and_skips_missing_points(tmp_path):
    path = tmp_path / "chart.png"
    plots.line_chart(str(path), series=[
        {"x": [0, 1, 2, 3], "y": [10.0, None, 30.0, float("nan")], "label": "probe", "color": "#1f77b4",
         "labels": ["a", "b", "c", "d"]},
        {"x": [0, 1, 2, 3], "y": [5.0, 6.0, 7.0, 8.0], "label": "random", "dashed": True, "color": "#2ca02c"},
    ], hlines=[{"y": 20.0, "label": "raw pixels", "color": "#d62728"}, {"y": None, "label": "absent"}],
        title="t", xlabel="layer", ylabel="accuracy (%)", integer_x=True, point_labels=True, size=(640, 480))
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (640, 480)
        pixels = np.asarray(img.convert("RGB"))
    for colour in ("#1f77b4", "#2ca02c", "#d62728"):  # both series and the reference line are drawn
        assert _pixels_of(pixels, colour) > 100, colour
    assert _pixels_of(pixels, "#9467bd") == 0  # no colour that nothing asked for


def test_line_chart_without_points_still_writes_a_png(tmp_path):
    path = tmp_path / "empty.png"
    plots.line_chart(str(path), series=[{"x": [], "y": [], "label": "none"}])
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (900, 600)


def test_bar_chart_draws_each_bar_series_and_skips_missing_values(tmp_path):
    path = tmp_path / "bars.png"
    plots.bar_chart(str(path), groups=["AR", "BERT"], bars=[
        {"label": "probe", "values": [50.0, 40.0], "color": "#1f77b4"},
        {"label": "fine-tuned", "values": [None, 60.0], "color": "#2ca02c"},
    ], title="t", ylabel="accuracy (%)", size=(640, 480))
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (640, 480)
        pixels = np.asarray(img.convert("RGB"))
    blue, green = _pixels_of(pixels, "#1f77b4"), _pixels_of(pixels, "#2ca02c")
    assert blue > 1000 and green > 1000
    # Bar areas follow the values: blue 50 + 40, green 60 alone (its missing AR bar is not drawn).
    assert 1.3 < blue / green < 1.7
