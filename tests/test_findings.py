"""The findings report (Figures 2-4 and the table) read from the real probe and fine-tuning jobs' results."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igpt_jax import workdir as workdir_files
from igpt_jax.probing.tracking import Evaluation
from igpt_jax.reports import findings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(pretrained_digits_run, probe_results, finetune_results, tmp_path_factory):
    """A run directory laid out as `config.then` leaves it: the pretraining run, probe/ and finetune/ beside it."""
    _, pretrain_dir = pretrained_digits_run
    _, probe_dir, _ = probe_results
    finetune_dir, _ = finetune_results
    root = tmp_path_factory.mktemp("findings_run")
    for name in ("config.json", "segments.json"):
        shutil.copy(Path(pretrain_dir) / name, root / name)
    for sub, src in (("probe", probe_dir), ("finetune", finetune_dir)):
        (root / sub).mkdir()
        shutil.copy(Path(src) / "results.json", root / sub / "results.json")
    history = [Evaluation(step=s, val_loss=loss, layers=[0, 1, 2], accuracies=[0.5, acc, 0.6], C=[1.0, 1.0, 1.0],
                          best_layer=1, best_accuracy=acc, seconds=1.0)
               for s, loss, acc in ((20, 1.9, 0.7), (40, 1.6, 0.8))]
    (root / workdir_files.TRACKING_HISTORY).write_text(json.dumps([dataclasses.asdict(e) for e in history]))
    return root


def test_figures_2_and_3_carry_the_probe_jobs_numbers(run_dir, probe_results):
    _, _, res = probe_results
    run = findings.load_run("tiny", str(run_dir))
    series, hlines = findings.layer_series([run])
    last = res["checkpoints"][-1]
    assert series[0]["x"] == [r["layer"] for r in last["layers"]]
    assert series[0]["y"] == [100 * r["test_accuracy"] for r in last["layers"]]
    assert series[1]["dashed"] and series[1]["y"] == [100 * r["test_accuracy"]
                                                      for r in res["baselines"]["random_init"]["layers"]]
    assert [h["y"] for h in hlines] == [100 * res["baselines"]["raw_pixels"]["test_accuracy"]]
    # Figure 3: the probe job's two checkpoints, then the tracking history.
    probe_points, tracking_points = findings.loss_series([run])
    assert len(res["checkpoints"]) == 2
    assert probe_points["x"] == [c["val_loss"] for c in res["checkpoints"]]
    assert probe_points["y"] == [100 * c["best"]["test_accuracy"] for c in res["checkpoints"]]
    assert tracking_points["x"] == [1.9, 1.6] and tracking_points["y"] == [70.0, 80.0]


def test_the_table_row_holds_the_probe_and_fine_tuning_results(run_dir, probe_results, finetune_results):
    _, _, probe_res = probe_results
    _, ft_res = finetune_results
    run = findings.load_run("tiny", str(run_dir))
    s = findings.summary(run)
    last = probe_res["checkpoints"][-1]
    assert s["best_layer"] == last["best"]["layer"] and s["best_layer_test"] == last["best"]["test_accuracy"]
    assert s["concat_test"] == last["concat"]["test_accuracy"] and s["finetuned_test"] == ft_res["test_accuracy"]
    assert s["low_data"] == {20: (last["low_data"]["results"][0]["mean_accuracy"],
                                  last["low_data"]["results"][0]["std_accuracy"])}
    row = findings.markdown_table([run]).splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["tiny", "2 x 32, 8x8", "ar"]
    assert cells[6] == f"{100 * last['best']['test_accuracy']:.2f}"
    assert cells[-4] == f"{100 * ft_res['test_accuracy']:.2f}"
    # Job minutes: pretraining's from its segments.json, fine-tuning's from its results.
    pretraining = json.loads((run_dir / "segments.json").read_text())
    assert [(r["from_step"], r["to_step"]) for r in pretraining] == [(0, 40)]
    assert cells[-3] == f"{sum(r['seconds'] for r in pretraining) / 60:.1f}"
    assert cells[-1] == f"{ft_res['seconds'] / 60:.1f}"
    # A run resumed from a workdir written before the time was kept says which steps its minutes cover.
    resumed = dataclasses.replace(run, pretrain_segments=[{"from_step": 500, "to_step": 2000, "seconds": 4800.0}])
    assert findings.summary(resumed)["pretrain_minutes"] == "80.0 (steps 500-2000)"


def test_the_layer_table_holds_every_layers_fit(run_dir, probe_results):
    _, _, res = probe_results
    run = findings.load_run("tiny", str(run_dir))
    rows = findings.layer_table(run).splitlines()[4:]
    last, random = res["checkpoints"][-1], res["baselines"]["random_init"]["layers"]
    assert len(rows) == len(last["layers"]) == len(random)
    for row, r, rand in zip(rows, last["layers"], random, strict=True):
        cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
        assert cells[0] == str(r["layer"]) and cells[1].startswith(r["name"])
        assert float(cells[2]) == pytest.approx(r["C"], rel=5e-3)
        assert cells[3:] == [f"{100 * r['val_accuracy']:.2f}", f"{100 * r['test_accuracy']:.2f}",
                             f"{100 * rand['test_accuracy']:.2f}"]
        assert ("(best on validation)" in cells[1]) == (r["layer"] == last["best"]["layer"]) == ("**" in row)


def test_the_command_writes_every_figure_and_the_table(run_dir, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "igpt_jax.reports.findings", f"--run=AR tiny={run_dir}",
                           f"--run=again={run_dir}", f"--out={out}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["figure2_layers.png", "figure3_ar.png", "figure4_probe_vs_finetune.png", "findings.md"]
    for name in names[:3]:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and np.asarray(img.convert("L")).std() > 5  # something is drawn
    table = (out / "findings.md").read_text()
    assert "| AR tiny | 2 x 32, 8x8 | ar |" in table and "| again | 2 x 32, 8x8 | ar |" in table
    assert findings.markdown_table([findings.load_run("AR tiny", str(run_dir))]).splitlines()[2] in proc.stdout
    assert table.count(": per layer") == 2


def test_a_probe_jobs_own_workdir_is_a_row_of_probes_only(probe_results):
    _, probe_dir, res = probe_results  # a probe job run on its own: results.json in its workdir
    run = findings.load_run("re-probe", str(probe_dir))
    assert run.finetune is None and run.tracking == []
    s = findings.summary(run)
    assert s["best_layer_test"] == res["checkpoints"][-1]["best"]["test_accuracy"] and s["finetuned_test"] is None
    (points,) = findings.loss_series([run])  # Figure 3 from its checkpoints alone
    assert points["x"] == [c["val_loss"] for c in res["checkpoints"]]
    quadrants = dataclasses.replace(run, probe={**run.probe, "pooling": "quadrants"})
    rows = findings.markdown_table([run, quadrants]).splitlines()[2:]
    assert [r.split("|")[2].strip() for r in rows] == ["2 x 32, 8x8", "2 x 32, 8x8, quadrants-pooled features"]


@pytest.mark.parametrize("spec, message", [
    ("no-equals-sign", "expected LABEL=WORKDIR"),
    ("=somewhere", "expected LABEL=WORKDIR"),
])
def test_a_malformed_run_is_a_one_line_error(spec, message):
    with pytest.raises(ValueError, match=message):
        findings.parse_run(spec)


def test_a_run_without_probe_results_is_one_line_naming_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "igpt_jax.reports.findings", f"--run=X={tmp_path}",
                           f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"error: --run=X={tmp_path}: no probe results at {tmp_path}/probe/results.json; run the probe job "
        "(config.then=('probe', ...), or --config.job=probe with its workdir there) first"]
    assert not (tmp_path / "out").exists()  # nothing written before the check
