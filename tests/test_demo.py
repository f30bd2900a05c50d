"""The README's first command, end to end: the demo's best layer beats raw pixels and random weights on test.

Slow (about 10 minutes on 2 CPU cores: the demo's whole pretraining and probe), so marked ``slow``.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_shows_the_claim(tmp_path):
    """configs/demo.py as shipped (its completion grid left out): best layer > raw pixels and > random weights."""
    done = subprocess.run(
        [sys.executable, "-m", "igpt_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path / 'demo'}",
         f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.then=('probe',)"],
        capture_output=True, text=True, timeout=3600, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "demo" / "probe" / "results.json").read_text())
    ours = results["test_accuracy"]
    raw = results["baselines"]["raw_pixels"]["test_accuracy"]
    rand = results["baselines"]["random_init"]["test_accuracy"]
    assert results["examples"]["test"] == 297 and results["pooling"] == "quadrants"
    assert ours > raw and ours > rand, (ours, raw, rand)
    assert "the pretrained features beat both baselines" in done.stdout
