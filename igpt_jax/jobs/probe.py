"""The linear-probe job (``config.job = 'probe'``): a pretraining checkpoint's features, one probe per layer.

For each checkpoint step (``config.checkpoint.step``, or every step of ``config.probe.checkpoint_steps``):
  1. restore only the parameters onto the mesh (`igpt_jax.pretrained.sources`: a run's checkpoint or a converted model);
  2. extract every requested layer's sequence-mean feature (``probe.pooling``: or its quadrants' means) for the
     train, validation and test splits, one pass per split (BERT models: masked inputs; validation and test under
     ``probe.bert_ensemble`` masks);
  3. per layer, fit a logistic regression on train (L-BFGS, or the JAX SGD probe), choose C on validation; the best
     layer (on validation) is refitted on train + validation and scored on test; optionally ``concat_layers``
     layers centred on it are probed together; optionally the low-data protocol (paper 4.7) on the best layer.
Baselines in the same job, with the same splits and solver: raw pixels (the palette colours of the tokens, as the
model sees them) and the same architecture with random weights (all layers, best chosen on validation).

Progress: every split's features and every fitted probe are saved in ``{workdir}/progress/`` as they finish
(`igpt_jax.probing.progress`; ``probe.resume``), so a stopped job (SIGTERM, SIGKILL) resumes from what it finished and
a rerun with other solver settings reuses the features.

Outputs in the workdir (process 0): ``results.json`` (everything, with the exact config and checkpoint steps),
``probe_layers.png`` (accuracy against layer, the baselines as lines: the paper's Figure 2), and with several
checkpoints ``probe_vs_val_loss.png`` (best-layer accuracy against validation loss: Figure 3); a table on stdout.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from igpt_jax import sharding
from igpt_jax import workdir as workdir_files
from igpt_jax.data import records
from igpt_jax.models.layout import param_layout, random_params
from igpt_jax.pretrained import sources as pretrained
from igpt_jax.probing import features as features_lib
from igpt_jax.probing import linear_probe
from igpt_jax.probing import progress as probe_progress
from igpt_jax.reports import plots
from igpt_jax.training import checkpoint as ckpt_lib
from igpt_jax.workdir import jsonable, workpath_of

RESULTS, LAYERS_PLOT, LOSS_PLOT = workdir_files.RESULTS, workdir_files.PROBE_LAYERS_PLOT, workdir_files.PROBE_LOSS_PLOT


def extract_splits(extractor: features_lib.FeatureExtractor, params: Any, *, masks: int, max_train: int = 0,
                   progress: probe_progress.ProbeProgress | None = None, name: str = "", fingerprint: str = ""
                   ) -> dict[str, features_lib.SplitFeatures]:
    """Features of train (one mask), validation and test (``masks`` masks for BERT), one pass per split.

    Args:
      params: the parameters, or a function returning them (called only when a split is not in ``progress``).
      progress: where finished splits are saved (as ``{name}-{split}``) and found again.
    """
    out = {}
    for split in records.SPLITS:
        t0 = time.time()
        found = progress.load_features(f"{name}-{split}", fingerprint) if progress else None
        if found is not None:
            out[split] = found
            logging.info("features of %s: %d examples, reused from %s", split, found.n, progress.directory)
            continue
        if callable(params):
            params = params()
        out[split] = extractor.extract(params, split, num_masks=1 if split == "train" else masks,
                                       max_examples=max_train if split == "train" else 0)
        logging.info("features of %s: %d examples x %d layers x %d in %.1fs", split, out[split].n,
                     out[split].features.shape[2], out[split].features.shape[3], time.time() - t0)
        if progress:
            progress.save_features(f"{name}-{split}", fingerprint, out[split], seconds=time.time() - t0)
    return out


def _cached(progress: probe_progress.ProbeProgress, name: str, fp: str, compute) -> dict[str, Any]:
    """The result saved under ``name`` with fingerprint ``fp``, else ``compute()`` (made JSON-ready) and saved."""
    found = progress.load_result(name, fp)
    if found is not None:
        logging.info("probe: %s reused from %s", name, progress.directory)
        return found
    t0 = time.time()
    result = jsonable(compute())
    progress.save_result(name, fp, result, seconds=time.time() - t0)
    return result


def probe_splits(splits: dict[str, features_lib.SplitFeatures], settings: linear_probe.ProbeSettings, *,
                 num_classes: int, layers: list[int], n_layer: int, concat_layers: int = 0) -> dict[str, Any]:
    """`linear_probe.probe` on extracted splits."""
    tr, va, te = (splits[s] for s in records.SPLITS)
    return linear_probe.probe((tr.features, tr.labels), (va.features, va.labels), (te.features, te.labels), settings,
                              num_classes=num_classes, layers=layers, concat_layers=concat_layers,
                              layer_names=lambda l: features_lib.layer_name(l, n_layer))


def pixel_baseline(splits: dict[str, features_lib.SplitFeatures], palette, settings: linear_probe.ProbeSettings, *,
                   num_classes: int) -> dict[str, Any]:
    """Logistic regression on the model's input pixels (palette colours in [-1, 1]), same splits and solver."""
    px = {s: features_lib.pixel_features(splits[s].tokens, palette)[None, :, None, :] for s in splits}
    res = linear_probe.probe((px["train"], splits["train"].labels), (px["validation"], splits["validation"].labels),
                             (px["test"], splits["test"].labels), settings, num_classes=num_classes, layers=[0],
                             layer_names=lambda _: "raw pixels")
    best = res["best"]
    return {"features": int(px["train"].shape[-1]), settings.hyper_name: best[settings.hyper_name],
            "val_accuracy": best["val_accuracy"], "test_accuracy": best["test_accuracy"]}


def _low_data(splits, pos: int, settings, *, num_classes: int, budgets, subsets: int) -> list[dict[str, Any]]:
    tr, va, te = (splits[s] for s in records.SPLITS)
    return linear_probe.low_data((tr.features[0][:, pos], tr.labels), (va.features[:, :, pos], va.labels),
                                 (te.features[:, :, pos], te.labels), settings, num_classes=num_classes,
                                 budgets=budgets, subsets=subsets)


def run(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict[str, Any]:
    """Runs the probe job; returns the results (also written to ``{workdir}/results.json``).

    Args:
      config: the full config (``config.probe``, ``config.checkpoint.source_workdir`` / ``step``, ``config.data``,
        ``config.model`` which must agree with the checkpoint's architecture).
      workdir: where the results go; also the checkpoint source when ``checkpoint.source_workdir`` is empty.
      devices: the mesh's devices (default: all).

    Raises:
      FileNotFoundError: no checkpoint where it should be, or a named step that does not exist.
      ValueError: a model config that disagrees with the checkpoint, data that does not fit the model, bad options.
    """
    t_start = time.time()
    pcfg = config.probe
    settings = linear_probe.ProbeSettings.from_config(pcfg)
    if config.data.fold_val:
        raise ValueError("data.fold_val=True puts the validation split into 'train': the probe chooses C and the "
                         "layer on validation and folds it back itself; set data.fold_val=False")
    rules = sharding.rules_from_config(config.mesh.rules)
    mesh = sharding.make_mesh(config.mesh.shape, devices)
    workpath = workpath_of(workdir)
    primary = jax.process_index() == 0

    source = pretrained.open_source(config, workdir)
    try:
        requested = list(pcfg.checkpoint_steps) or [int(config.checkpoint.step)]
        steps = sorted({source.resolve_step(int(s)) for s in requested}, key=lambda s: -1 if s is None else s)
        model_cfg, palette, data_cfg = source.settings(config, steps[-1])
        run_config = source.run_config(steps[-1])
        num_classes = records.num_classes(data_cfg)
        layers = features_lib.resolve_layers(pcfg.layers, model_cfg.n_layer)
        masks = max(1, int(pcfg.bert_ensemble)) if model_cfg.objective == "bert" else 1
        batch_size = int(pcfg.batch_size or config.train.eval_batch_size or config.train.batch_size)
        layout = param_layout(model_cfg, mesh, rules)
        pooling = str(pcfg.get("pooling", "mean"))
        extractor = features_lib.FeatureExtractor(model_cfg, layout, mesh, rules, data_cfg, palette, layers,
                                                  batch_size=batch_size, seed=int(pcfg.seed), pooling=pooling)
        width = model_cfg.d_model * extractor.feature_grid ** 2  # features per layer
        n = {s: records.num_examples(data_cfg, s) for s in records.SPLITS}
        if pcfg.max_train_examples:
            n["train"] = min(n["train"], int(pcfg.max_train_examples))
        size = sum(features_lib.approx_feature_bytes(n[s], len(layers), width, 1 if s == "train" else masks)
                   for s in n)
        logging.info("probe: %d checkpoint(s) %s of %s; %d layers %s (%s pooling, %d features each); %s examples "
                     "(train/val/test); %d classes; features take %s per checkpoint", len(steps), steps, source.path,
                     len(layers), layers, pooling, width, "/".join(str(n[s]) for s in records.SPLITS),
                     num_classes, features_lib.human_bytes(size))

        # Everything that determines the features, and (with the solver settings) the fitted results.
        feature_id = {"checkpoints": str(source.path), "model": model_cfg, "data": data_cfg.to_dict(),
                      "palette": palette.centres.tolist(), "layers": layers, "masks": masks, "seed": int(pcfg.seed),
                      "max_train_examples": int(pcfg.max_train_examples),
                      **({"pooling": pooling} if pooling != "mean" else {})}  # mean: earlier runs' saved features
        result_id = {**feature_id, "settings": settings, "concat_layers": int(pcfg.concat_layers),
                     "low_data": [list(pcfg.low_data_budgets), int(pcfg.low_data_subsets)]}
        progress = probe_progress.ProbeProgress(workpath, enabled=bool(pcfg.resume), writer=primary)

        per_checkpoint, splits = [], None
        baselines: dict[str, Any] = {}
        for i, step in enumerate(steps):
            if i:  # every step must be the same model (one run)
                other, other_palette, _ = source.settings(config, step)
                if other != model_cfg or not np.array_equal(other_palette.centres, palette.centres):
                    raise ValueError(f"{source.where(step)} is not the same model or palette as step "
                                     f"{steps[-1]}: probe.checkpoint_steps must come from one run")
            t0 = time.time()
            fp = probe_progress.fingerprint({**feature_id, "step": step})
            splits = extract_splits(extractor, lambda step=step: source.restore_params(step, layout),
                                    masks=masks, max_train=int(pcfg.max_train_examples), progress=progress,
                                    name=f"step{step}", fingerprint=fp)

            def fit_checkpoint(step=step, splits=splits):
                res = probe_splits(splits, settings, num_classes=num_classes, layers=layers,
                                   n_layer=model_cfg.n_layer, concat_layers=int(pcfg.concat_layers))
                res = {"step": step, "val_loss": splits["validation"].loss, "test_loss": splits["test"].loss, **res}
                if pcfg.low_data_budgets:
                    res["low_data"] = {"layer": res["best_layer"], "results": _low_data(
                        splits, layers.index(res["best_layer"]), settings, num_classes=num_classes,
                        budgets=[int(b) for b in pcfg.low_data_budgets], subsets=int(pcfg.low_data_subsets))}
                return res

            res = _cached(progress, f"step{step}", probe_progress.fingerprint({**result_id, "step": step}),
                          fit_checkpoint)
            per_checkpoint.append(res)
            logging.info("step %d: best layer %d, validation %.4f, test %.4f (%.1fs)", step, res["best_layer"],
                         res["best"]["val_accuracy"], res["best"]["test_accuracy"], time.time() - t0)
            if i == 0 and pcfg.baselines:
                baselines["raw_pixels"] = _cached(
                    progress, "raw_pixels", probe_progress.fingerprint({**result_id, "step": step}),
                    lambda splits=splits: pixel_baseline(splits, palette, settings, num_classes=num_classes))
                logging.info("raw-pixel baseline: test %.4f", baselines["raw_pixels"]["test_accuracy"])
    finally:
        source.close()

    if pcfg.baselines:
        t0 = time.time()
        rsplits = extract_splits(
            extractor, lambda: random_params(model_cfg, layout, mesh, rules, jax.random.key(int(pcfg.seed) + 12345)),
            masks=masks, max_train=int(pcfg.max_train_examples), progress=progress, name="random",
            fingerprint=probe_progress.fingerprint(feature_id))

        def fit_random():
            rres = probe_splits(rsplits, settings, num_classes=num_classes, layers=layers, n_layer=model_cfg.n_layer)
            return {"layers": rres["layers"], "best_layer": rres["best_layer"], "best": rres["best"],
                    "test_accuracy": rres["best"]["test_accuracy"]}

        baselines["random_init"] = _cached(progress, "random_init", probe_progress.fingerprint(result_id), fit_random)
        logging.info("random-weights baseline: best layer %d, test %.4f (%.1fs)",
                     baselines["random_init"]["best_layer"], baselines["random_init"]["test_accuracy"],
                     time.time() - t0)
    if progress.reused:
        logging.info("probe: resumed from %d saved pieces in %s: %s", len(progress.reused), progress.directory,
                     ", ".join(progress.reused))

    last = per_checkpoint[-1]
    _warn_grid_edges(last, settings)
    results: dict[str, Any] = {
        "job": "probe",
        "source": {"path": source.path, "kind": source.kind},
        "source_checkpoints": (str(ckpt_lib.checkpoint_dir(source.path)) if source.kind == pretrained.RUN
                               else source.path),
        "steps": steps,
        "step": last["step"],
        "dataset": config.data.name,
        "num_classes": num_classes,
        "examples": {s: splits[s].n for s in records.SPLITS},
        "model": {k: getattr(model_cfg, k) for k in pretrained.ARCHITECTURE_FIELDS},
        "bert_masks": masks,
        "pooling": pooling,
        "best_layer": last["best_layer"],
        "val_accuracy": last["best"]["val_accuracy"],
        "test_accuracy": last["best"]["test_accuracy"],
        "checkpoints": per_checkpoint,
        "baselines": baselines,
        "config": json.loads(config.to_json_best_effort()),
        "pretrain_config": run_config.to_dict() if run_config is not None else None,
        "seconds": time.time() - t_start + progress.reused_seconds,  # the reused pieces' time included
        "reused": progress.reused,
        "reused_seconds": progress.reused_seconds,
    }
    table = format_table(results)
    if primary:
        workpath.mkdir(parents=True, exist_ok=True)
        (workpath / RESULTS).write_text(json.dumps(jsonable(results), indent=2))
        if pcfg.plots:
            plot_layers(results, str(workpath / LAYERS_PLOT))
            if len(per_checkpoint) > 1:
                plot_vs_loss(results, str(workpath / LOSS_PLOT))
        print(table, flush=True)
        print(f"Probe results: {workpath / RESULTS}", flush=True)
    results["table"] = table
    return results


# --------------------------------------------------------------------------------------------- report and plots


def _warn_grid_edges(res: dict[str, Any], settings: linear_probe.ProbeSettings) -> None:
    """Says which layers chose a hyper-parameter at the edge of the values they tried.

    For C, each layer's grid has already widened itself (``probe.C_widen``) while its best was at an edge, so an
    edge left here is the bound ``probe.C_bounds`` or the end of the widening.
    """
    hyper = settings.hyper_name
    edge = []
    for r in res["layers"]:
        tried = [float(k) for k in r["val_accuracy_by_" + hyper]]
        if len(tried) > 1 and r[hyper] in (min(tried), max(tried)):
            edge.append(r["layer"])
    if res["best_layer"] in edge:
        logging.warning("probe: the best layer's %s=%g is at the edge of the values it tried; %s", hyper,
                        res["best"][hyper], "raise probe.C_widen or probe.C_bounds" if hyper == "C"
                        else "widen probe.sgd_lrs")
    elif edge:
        logging.info("probe: %s at the edge of the values tried for layers %s", hyper, edge)


def format_table(results: dict[str, Any]) -> str:
    """The human-readable summary printed at the end of the job."""
    pct = linear_probe.format_percent
    last = results["checkpoints"][-1]
    hyper = "C" if last["solver"] in linear_probe.LOGISTIC_SOLVERS else "lr"
    rand = results["baselines"].get("random_init")
    rand_by_layer = {r["layer"]: r for r in rand["layers"]} if rand else {}
    lines = [f"Linear probe: {results['dataset']} ({results['num_classes']} classes; "
             f"{'/'.join(str(results['examples'][s]) for s in records.SPLITS)} train/val/test; "
             f"{results.get('pooling', 'mean')} pooling), checkpoint step "
             f"{last['step']}, validation loss {last['val_loss']:.4f} nats/token"]
    header = f"{'layer':>5}  {'feature':<20} {hyper:>8}  {'val %':>6}  {'test %':>6} "
    if rand:
        header += f"  {'random-init test %':>18}"
    lines += [header, "-" * len(header)]
    for r in last["layers"]:
        mark = "*" if r["layer"] == last["best_layer"] else " "  # beside the pretrained model's test accuracy
        row = (f"{r['layer']:>5}  {r['name']:<20} {r[hyper]:>8.3g}  {pct(r['val_accuracy'])}  "
               f"{pct(r['test_accuracy'])}{mark}")
        if rand:
            rr = rand_by_layer.get(r["layer"])
            row += f"  {pct(rr['test_accuracy']) if rr else '':>18}"
        lines.append(row)
    lines.append("* the best layer on validation")
    best = last["best"]
    lines.append(f"best layer (on validation): {best['layer']} ({best['name']}), {hyper}={best[hyper]:.3g}: "
                 f"test accuracy {pct(best['test_accuracy']).strip()}% after refitting on train + validation"
                 + (f" ({pct(best['test_accuracy_single_mask']).strip()}% with one BERT mask, "
                    f"{results['bert_masks']}-mask ensemble above)" if "test_accuracy_single_mask" in best else ""))
    if "concat" in last:
        c = last["concat"]
        lines.append(f"concatenated layers {c['layers']} ({c['features']} features): validation "
                     f"{pct(c['val_accuracy']).strip()}%, test {pct(c['test_accuracy']).strip()}%")
    if "raw_pixels" in results["baselines"]:
        r = results["baselines"]["raw_pixels"]
        lines.append(f"baseline, raw pixels ({r['features']} features): test {pct(r['test_accuracy']).strip()}%")
    if rand:
        lines.append(f"baseline, random weights (best layer {rand['best_layer']}): test "
                     f"{pct(rand['test_accuracy']).strip()}%")
    if "raw_pixels" in results["baselines"] and rand:
        ours, raw, rnd = best["test_accuracy"], results["baselines"]["raw_pixels"]["test_accuracy"], rand["test_accuracy"]
        holds = ours is not None and ours > max(raw or 0.0, rnd or 0.0)
        lines.append(f"test accuracy, side by side: best layer {pct(ours).strip()}% | raw pixels {pct(raw).strip()}% | "
                     f"random weights {pct(rnd).strip()}%: the pretrained features "
                     + ("beat both baselines" if holds else "do NOT beat both baselines"))
    if "low_data" in last:
        lines.append(f"low-data (layer {last['low_data']['layer']}, test accuracy over "
                     f"{len(last['low_data']['results'][0]['test_accuracies'])} balanced subsets):")
        for r in last["low_data"]["results"]:
            lines.append(f"  {r['budget']:>6} labels: {100 * r['mean_accuracy']:.2f} +- {100 * r['std_accuracy']:.2f}% "
                         f"(error {r['mean_error_percent']:.1f} +- {r['std_error_percent']:.1f}%)")
    if len(results["checkpoints"]) > 1:
        lines.append("checkpoints (step: validation loss -> best-layer test accuracy):")
        for c in results["checkpoints"]:
            lines.append(f"  {c['step']:>8}: {c['val_loss']:.4f} -> {pct(c['best']['test_accuracy']).strip()}% "
                         f"(layer {c['best_layer']})")
    return "\n".join(lines)


def plot_layers(results: dict[str, Any], path: str) -> None:
    """Figure 2: test accuracy of each layer's probe, one line per checkpoint, the baselines as lines."""
    series = []
    for c in results["checkpoints"]:
        series.append({"x": [r["layer"] for r in c["layers"]], "y": [100 * r["test_accuracy"] for r in c["layers"]],
                       "label": f"pretrained, step {c['step']}"})
    hlines = []
    base = results["baselines"]
    if "random_init" in base:
        r = base["random_init"]
        series.append({"x": [l["layer"] for l in r["layers"]], "y": [100 * l["test_accuracy"] for l in r["layers"]],
                       "label": "random weights", "dashed": True, "color": "#7f7f7f"})
    if "raw_pixels" in base:
        hlines.append({"y": 100 * base["raw_pixels"]["test_accuracy"], "label": "raw pixels", "color": "#d62728"})
    n_layer = results["model"]["n_layer"]
    plots.line_chart(path, series=series, hlines=hlines, integer_x=True,
                     title=f"Linear probe accuracy by layer ({results['dataset']}; layer {n_layer} = final norm)",
                     xlabel="layer", ylabel="test accuracy (%)")


def plot_vs_loss(results: dict[str, Any], path: str) -> None:
    """Figure 3: best-layer probe accuracy against validation loss, one point per checkpoint."""
    cks = results["checkpoints"]
    plots.line_chart(
        path, series=[{"x": [c["val_loss"] for c in cks], "y": [100 * c["best"]["test_accuracy"] for c in cks],
                       "label": "best-layer probe", "labels": [f"step {c['step']}" for c in cks]}],
        point_labels=True, title=f"Probe accuracy vs validation loss ({results['dataset']})",
        xlabel="validation loss (nats per token)", ylabel="best-layer test accuracy (%)")
