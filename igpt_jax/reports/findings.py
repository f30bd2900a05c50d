"""The paper's findings drawn from runs made with this framework: Figures 2, 3 and 4 and one table.

Command:

    python -m igpt_jax.reports.findings --run=AR=workdirs/ar16 --run=BERT=workdirs/bert16 \\
        --out=bench/figures/findings

Each ``--run=LABEL=WORKDIR`` names a pretraining run whose follow-up jobs ran in it (``config.then``: the probe job
writes ``WORKDIR/probe/results.json``, fine-tuning ``WORKDIR/finetune/results.json``; the tracking evaluator writes
``WORKDIR/tracking.json``; pretraining its wall time, ``WORKDIR/segments.json``), or the workdir of a probe job
run on its own (``--config.job=probe``: its ``results.json``; e.g. a re-probe with other pooling, or of several
checkpoints), which is then a row of probes only. Nothing is recomputed: the figures and the table are read from
those files, so they are the numbers the jobs printed. Written into ``--out``:

* ``figure2_layers.png`` (paper Figure 2): test accuracy of each layer's linear probe, one solid line per run, its
  random-weights baseline dashed in the same colour, raw pixels as horizontal lines;
* ``figure3_<objective>.png`` (paper Figure 3), one per objective, since AR and BERT losses are different quantities:
  best-layer probe accuracy against validation loss, from the probe job's checkpoints when it probed several
  (test accuracy, whole validation split) and from the tracking evaluator (validation accuracy of its subset);
* ``figure4_probe_vs_finetune.png`` (paper Figure 4): per run, the best-layer probe, the concatenated-layers probe
  and the fine-tuned model's test accuracy (BERT runs: the ``bert_masks``-mask ensemble, as the jobs report it);
* ``findings.md``: the table of those figures per run (also printed), then per run a table of its layers at the
  last probed checkpoint: C chosen on validation, validation and test accuracy, and the random-weights baseline's
  test accuracy of the same layer.

A run without probe results is one line of error naming its workdir, before anything is drawn.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags
from etils import epath

from igpt_jax import workdir as workdir_files
from igpt_jax.reports import plots

_RUNS = flags.DEFINE_multi_string("run", [], "LABEL=WORKDIR of a pretraining run whose probe (and fine-tuning) ran "
                                  "in it; repeat for each run.")
_OUT = flags.DEFINE_string("out", "findings", "Directory for the figures and findings.md.")


@dataclasses.dataclass(frozen=True)
class Run:
    """One pretraining run's results as its jobs wrote them (`probe` is required; the others may be None)."""

    label: str
    workdir: str
    probe: dict[str, Any]
    finetune: dict[str, Any] | None
    tracking: list[dict[str, Any]]
    pretrain_segments: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def objective(self) -> str:
        return self.probe["model"]["objective"]

    @property
    def shape(self) -> str:
        m = self.probe["model"]
        return f"{m['n_layer']} x {m['d_model']}"

    @property
    def pooling(self) -> str:
        return self.probe.get("pooling", "mean")

    @property
    def last(self) -> dict[str, Any]:
        """The probe job's last (usually only) checkpoint."""
        return self.probe["checkpoints"][-1]


def _read_json(path: epath.Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e.msg}, line {e.lineno})") from None


def parse_run(spec: str) -> tuple[str, str]:
    """'LABEL=WORKDIR' -> (label, workdir); one-line ValueError otherwise."""
    label, sep, workdir = spec.partition("=")
    if not sep or not label.strip() or not workdir.strip():
        raise ValueError(f"--run={spec!r}: expected LABEL=WORKDIR, e.g. --run=AR=workdirs/ar16")
    return label.strip(), workdir.strip()


def load_run(label: str, workdir: str) -> Run:
    """Reads a run's results; ValueError (one line) when it has no probe results.

    `workdir` is a pretraining run's (its probe job in ``probe/``, fine-tuning in ``finetune/``) or a probe job's own
    (its ``results.json`` there; no fine-tuning or tracking then).
    """
    root = epath.Path(workdir)  # config.then writes each follow-up job into WORKDIR/<job>
    probe_path = root / "probe" / workdir_files.RESULTS
    if not probe_path.exists():
        own = root / workdir_files.RESULTS
        results = _read_json(own, "probe results") if own.exists() else {}
        if results.get("job") == "probe":
            return Run(label, workdir, results, None, [])
        raise ValueError(f"--run={label}={workdir}: no probe results at {probe_path}; run the probe job "
                         "(config.then=('probe', ...), or --config.job=probe with its workdir there) first")
    probe = _read_json(probe_path, "probe results")
    finetune_path = root / "finetune" / workdir_files.RESULTS
    finetune = _read_json(finetune_path, "fine-tuning results") if finetune_path.exists() else None
    tracking_path = root / workdir_files.TRACKING_HISTORY
    tracking = _read_json(tracking_path, "tracking history") if tracking_path.exists() else []
    segments_path = root / workdir_files.SEGMENTS
    segments = _read_json(segments_path, "pretraining wall time") if segments_path.exists() else []
    return Run(label, workdir, probe, finetune, tracking, segments)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def _minutes(segments: list[dict[str, Any]]) -> str:
    """A job's minutes over its invocations; the steps they cover when the first did not start at 0 (a run resumed
    from a workdir written before the job kept its time)."""
    if not segments:
        return ""
    first, last = segments[0]["from_step"], segments[-1]["to_step"]
    return f"{sum(s['seconds'] for s in segments) / 60:.1f}" + (f" (steps {first}-{last})" if first > 0 else "")


def summary(run: Run) -> dict[str, Any]:
    """The figures of one run that the table shows (accuracies as fractions, None where a job did not run)."""
    last, base = run.last, run.probe["baselines"]
    best = last["best"]
    low = {r["budget"]: (r["mean_accuracy"], r["std_accuracy"]) for r in last.get("low_data", {}).get("results", [])}
    return {
        "run": run.label,
        "model": run.shape,
        "objective": run.objective,
        # the pretraining run's config; a converted model has none, and the probe job's own config names the data
        "resolution": (run.probe.get("pretrain_config") or run.probe["config"])["data"]["resolution"],
        "pooling": run.pooling,
        "step": last["step"],
        "val_loss": last["val_loss"],
        "best_layer": best["layer"],
        "best_layer_test": best["test_accuracy"],
        "concat_layers": last["concat"]["layers"] if "concat" in last else None,
        "concat_test": last["concat"]["test_accuracy"] if "concat" in last else None,
        "raw_pixels_test": base["raw_pixels"]["test_accuracy"] if "raw_pixels" in base else None,
        "random_weights_test": base["random_init"]["test_accuracy"] if "random_init" in base else None,
        "low_data": low,
        "bert_masks": run.probe.get("bert_masks", 1),
        "finetuned_test": run.finetune["test_accuracy"] if run.finetune else None,
        "finetune_best_step": run.finetune["best_step"] if run.finetune else None,
        "pretrain_minutes": _minutes(run.pretrain_segments),
        "probe_minutes": f"{run.probe['seconds'] / 60:.1f}" if "seconds" in run.probe else "",
        # fine-tuning results from before it kept its segments: this invocation's seconds only
        "finetune_minutes": (_minutes(run.finetune.get("segments") or [])
                             or (f"{run.finetune['seconds'] / 60:.1f}" if "seconds" in run.finetune else ""))
        if run.finetune else "",
    }


def markdown_table(runs: Sequence[Run]) -> str:
    """One row per run: model, loss, probes (best layer, concatenated, baselines, low data) and fine-tuning."""
    rows = [summary(r) for r in runs]
    budgets = sorted({b for s in rows for b in s["low_data"]})
    head = (["run", "model", "objective", "step", "val loss", "best layer", "probe test %", "concat. test %",
             "raw pixels %", "random weights %"] + [f"{b} labels %" for b in budgets]
            + ["fine-tuned test %", "pretraining min", "probe job min", "fine-tune min"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in rows:
        concat = f"{_pct(s['concat_test'])} (layers {','.join(map(str, s['concat_layers']))})" \
            if s["concat_test"] is not None else ""
        low = [f"{100 * s['low_data'][b][0]:.2f} +- {100 * s['low_data'][b][1]:.2f}" if b in s["low_data"] else ""
               for b in budgets]
        model = (s["model"] + (f", {s['resolution']}x{s['resolution']}" if s["resolution"] else "")
                 + (f", {s['pooling']}-pooled features" if s["pooling"] != "mean" else ""))
        cells = ([s["run"], model, s["objective"] + (f" ({s['bert_masks']} masks)" if s["bert_masks"] > 1 else ""),
                  str(s["step"]), f"{s['val_loss']:.4f}", str(s["best_layer"]), _pct(s["best_layer_test"]), concat,
                  _pct(s["raw_pixels_test"]), _pct(s["random_weights_test"])] + low
                 + [_pct(s["finetuned_test"]), s["pretrain_minutes"], s["probe_minutes"], s["finetune_minutes"]])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _C(value: float) -> str:
    return f"{value:.3g}"


def layer_table(run: Run) -> str:
    """Per layer of the run's last probed checkpoint: C, validation and test accuracy of the fit on the training split
    (best layer in bold; its refit on training + validation is the row's "probe test %"), and the random-weights
    model's test accuracy at the same layer (blank without that baseline)."""
    last, base = run.last, run.probe["baselines"]
    random = {r["layer"]: r for r in base.get("random_init", {}).get("layers", [])}
    best = last["best"]["layer"]
    title = (f"{run.label}, step {last['step']} ({run.shape}, {run.objective}, {run.pooling} pooling): per layer "
             "(fit on the training split; the best layer's refit on training + validation is in the table above)")
    lines = [title, "", "| layer | feature | C | validation % | test % | random weights, test % |", "|" + "---|" * 6]
    for r in last["layers"]:
        is_best = r["layer"] == best
        cells = [str(r["layer"]), _pct(r["val_accuracy"]), _pct(r["test_accuracy"])]
        layer, val, test = (f"**{c}**" for c in cells) if is_best else cells
        name = r["name"] + (" (best on validation)" if is_best else "")
        rand = _pct(random[r["layer"]]["test_accuracy"]) if r["layer"] in random else ""
        lines.append(f"| {layer} | {name} | {_C(r['C'])} | {val} | {test} | {rand} |")
    return "\n".join(lines)


def layer_series(runs: Sequence[Run]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Figure 2's data: (series, hlines) for `plots.line_chart`, accuracies in percent.

    Per run, its layers' test accuracies (solid) and its random-weights baseline's (dashed, same colour); one
    horizontal line per distinct raw-pixel accuracy (runs on the same data share it).
    """
    series, hlines, raw_seen = [], [], set()
    for i, run in enumerate(runs):
        colour = plots.COLOURS[i % len(plots.COLOURS)]
        layers = run.last["layers"]
        series.append({"x": [r["layer"] for r in layers], "y": [100 * r["test_accuracy"] for r in layers],
                       "label": f"{run.label} ({run.objective}, {run.shape})", "color": colour})
        base = run.probe["baselines"]
        if "random_init" in base:
            rl = base["random_init"]["layers"]
            series.append({"x": [r["layer"] for r in rl], "y": [100 * r["test_accuracy"] for r in rl],
                           "label": f"{run.label}: random weights", "color": colour, "dashed": True})
        if "raw_pixels" in base:
            raw = 100 * base["raw_pixels"]["test_accuracy"]
            if round(raw, 6) not in raw_seen:
                raw_seen.add(round(raw, 6))
                hlines.append({"y": raw, "label": f"raw pixels ({base['raw_pixels']['features']} features)",
                               "color": "#7f7f7f"})
    return series, hlines


def loss_series(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Figure 3's data for runs of one objective: best-layer accuracy (percent) against validation loss.

    Per run: the probe job's checkpoints when it probed several (test accuracy; solid) and the tracking evaluator's
    history (its subset's validation accuracy and loss; dashed).
    """
    series = []
    for i, run in enumerate(runs):
        colour = plots.COLOURS[i % len(plots.COLOURS)]
        cks = run.probe["checkpoints"]
        if len(cks) > 1:
            series.append({"x": [c["val_loss"] for c in cks], "y": [100 * c["best"]["test_accuracy"] for c in cks],
                           "labels": [f"step {c['step']}" for c in cks], "color": colour,
                           "label": f"{run.label} ({run.shape}): probe job, test"})
        if run.tracking:
            t = run.tracking
            series.append({"x": [e["val_loss"] for e in t], "y": [100 * e["best_accuracy"] for e in t],
                           "labels": [f"step {e['step']}" for e in t], "color": colour, "dashed": True,
                           "label": f"{run.label} ({run.shape}): tracking subset, validation"})
    return series


def plot_layers(runs: Sequence[Run], path: str) -> None:
    """Figure 2: per-layer test accuracy of each run (solid), its random weights (dashed), raw pixels (lines)."""
    series, hlines = layer_series(runs)
    plots.line_chart(path, series=series, hlines=hlines, integer_x=True, xlabel="layer (last = final norm)",
                     ylabel="linear probe test accuracy (%)", title="Linear probe accuracy by layer (Figure 2)")


def plot_vs_loss(runs: Sequence[Run], path: str) -> bool:
    """Figure 3 for runs of one objective; False (nothing written) when none has several points."""
    series = loss_series(runs)
    if not series:
        return False
    plots.line_chart(path, series=series, point_labels=True, xlabel="validation loss (nats per token)",
                     ylabel="best-layer probe accuracy (%)",
                     title=f"Probe accuracy against validation loss, {runs[0].objective.upper()} (Figure 3)")
    return True


def plot_probe_vs_finetune(runs: Sequence[Run], path: str) -> None:
    """Figure 4: per run, the linear probes' and the fine-tuned model's test accuracy as grouped bars."""
    rows = [summary(r) for r in runs]
    bars = [{"label": "linear probe, best layer", "values": [100 * s["best_layer_test"] for s in rows]}]
    if any(s["concat_test"] is not None for s in rows):
        bars.append({"label": "linear probe, layers concatenated",
                     "values": [None if s["concat_test"] is None else 100 * s["concat_test"] for s in rows]})
    if any(s["finetuned_test"] is not None for s in rows):
        bars.append({"label": "fine-tuned",
                     "values": [None if s["finetuned_test"] is None else 100 * s["finetuned_test"] for s in rows]})
    plots.bar_chart(path, groups=[f"{s['run']} ({s['objective']}, {s['model']})" for s in rows], bars=bars,
                    ylabel="test accuracy (%)", title="Linear probe and fine-tuning (Figure 4)")


def write_report(runs: Sequence[Run], out: str) -> tuple[dict[str, str], str]:
    """Writes the figures and findings.md into `out`; returns ({name: path} of what it wrote, the table)."""
    outdir = epath.Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    written = {"figure2": str(outdir / "figure2_layers.png"), "figure4": str(outdir / "figure4_probe_vs_finetune.png")}
    plot_layers(runs, written["figure2"])
    for objective in dict.fromkeys(r.objective for r in runs):
        path = str(outdir / f"figure3_{objective}.png")
        if plot_vs_loss([r for r in runs if r.objective == objective], path):
            written[f"figure3_{objective}"] = path
    plot_probe_vs_finetune(runs, written["figure4"])
    table = markdown_table(runs)
    written["table"] = str(outdir / "findings.md")
    (outdir / "findings.md").write_text(
        "Runs: " + "; ".join(f"{r.label} = {r.workdir}" for r in runs) + "\n\n" + table + "\n"
        + "".join("\n" + layer_table(r) + "\n" for r in runs))
    return written, table


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; runs are given as --run=LABEL=WORKDIR")
    if not _RUNS.value:
        raise app.UsageError("give at least one --run=LABEL=WORKDIR")
    try:
        runs = [load_run(*parse_run(s)) for s in _RUNS.value]
    except ValueError as e:
        sys.exit(f"error: {e}")
    written, table = write_report(runs, _OUT.value)
    print(table)
    for name, path in written.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    app.run(main)
