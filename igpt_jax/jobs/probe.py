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

With ``probe.head='attentive'`` the same extraction pass also writes the probed layers' token features (each layer's,
or their average with ``probe.average_layers``) to bfloat16 stores in ``{workdir}/tokens/`` and every linear result
above gets its attentive counterpart (`igpt_jax.probing.attentive`: AIM's attention-pooling head, AdamW, learning
rate, weight decay and epoch chosen on validation): ``attentive`` in each checkpoint's and baseline's results, on
the raw-pixel baseline's tokens (colour and one-hot row and column) and the random-weights model's tokens.

Progress: every split's features and every fitted probe are saved in ``{workdir}/progress/`` as they finish
(`igpt_jax.probing.progress`; ``probe.resume``), so a stopped job (SIGTERM, SIGKILL) resumes from what it finished and
a rerun with other solver settings reuses the features.

Outputs in the workdir (process 0): ``results.json`` (everything, with the exact config and checkpoint steps),
``probe_layers.png`` (accuracy against layer, the baselines as lines: the paper's Figure 2), and with several
checkpoints ``probe_vs_val_loss.png`` (best-layer accuracy against validation loss: Figure 3); a table on stdout.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from igpt_jax import sharding
from igpt_jax import workdir as workdir_files
from igpt_jax.data import records
from igpt_jax.data.palette import Palette
from igpt_jax.models.igpt import ModelConfig
from igpt_jax.models.layout import Layout, param_layout, random_params
from igpt_jax.pretrained import sources as pretrained
from igpt_jax.probing import attentive
from igpt_jax.probing import features as features_lib
from igpt_jax.probing import fitting, linear_probe
from igpt_jax.probing import progress as probe_progress
from igpt_jax.probing import token_store
from igpt_jax.reports import plots
from igpt_jax.training import checkpoint as ckpt_lib
from igpt_jax.workdir import jsonable, workpath_of


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
    settings = linear_probe.ProbeSettings.from_config(config.probe)
    if config.data.fold_val:
        raise ValueError("data.fold_val=True puts the validation split into 'train': the probe chooses C and the "
                         "layer on validation and folds it back itself; set data.fold_val=False")
    mesh = sharding.make_mesh(config.mesh.shape, devices)
    workpath = workpath_of(workdir)
    source = pretrained.open_source(config, workdir)
    try:
        setup = _set_up(config, settings, source, mesh, workpath)
        per_checkpoint, baselines = [], {}
        for i, step in enumerate(setup.steps):
            if i:  # every step must be the same model (one run)
                _check_same_model(config, source, setup, step)
            t0 = time.time()
            splits = _checkpoint_features(setup, source, step)
            per_checkpoint.append(_probe_checkpoint(setup, step, splits, started=t0))
            if i == 0 and setup.pcfg.baselines:
                baselines["raw_pixels"] = _raw_pixel_baseline(setup, step, splits)
    finally:
        source.close()
    if setup.pcfg.baselines:
        baselines["random_init"] = _random_init_baseline(setup)
    if setup.progress.reused:
        logging.info("probe: resumed from %d saved pieces in %s: %s", len(setup.progress.reused),
                     setup.progress.directory, ", ".join(setup.progress.reused))

    _warn_grid_edges(per_checkpoint[-1], setup.settings)
    if setup.attentive:
        _warn_attentive_lr_edge(per_checkpoint[-1]["attentive"]["best"], setup.attentive)
    results = _results(config, setup, source, per_checkpoint, splits, baselines, seconds=time.time() - t_start)
    return _write_results(results, workpath, plot=bool(setup.pcfg.plots))


# --------------------------------------------------------------------------------------------- the job's steps


@dataclasses.dataclass
class _Setup:
    """What the probe job settles before it extracts any feature: the checkpoints, the model as they hold it, the
    extractor, and the identities under which extracted features and fitted probes are saved."""

    pcfg: ml_collections.ConfigDict
    settings: linear_probe.ProbeSettings
    steps: list[int]
    model_cfg: ModelConfig
    palette: Palette
    data_cfg: ml_collections.ConfigDict
    run_config: ml_collections.ConfigDict | None
    num_classes: int
    layers: list[int]
    masks: int  # BERT masks per validation and test example (1: autoregressive)
    pooling: str
    layout: Layout
    extractor: features_lib.FeatureExtractor
    feature_id: dict[str, Any]  # everything that determines the features
    result_id: dict[str, Any]  # ... and, with the solver settings, the fitted results
    progress: probe_progress.ProbeProgress
    attentive: attentive.AttentiveSettings | None  # the attentive head's settings (None: the linear probe only)
    token_dir: str  # where the attentive head's token features are written

    @property
    def max_train(self) -> int:
        return int(self.pcfg.max_train_examples)


def _set_up(config: ml_collections.ConfigDict, settings: linear_probe.ProbeSettings, source: pretrained.Source,
            mesh: jax.sharding.Mesh, workpath: epath.Path) -> _Setup:
    """The checkpoints to probe (every one of ``probe.checkpoint_steps``, else ``checkpoint.step``), their model,
    data and palette (those of the last), the layers and the feature extractor on `mesh`."""
    pcfg = config.probe
    rules = sharding.rules_from_config(config.mesh.rules)
    requested = list(pcfg.checkpoint_steps) or [int(config.checkpoint.step)]
    steps = sorted({source.resolve_step(int(s)) for s in requested}, key=lambda s: -1 if s is None else s)
    model_cfg, palette, data_cfg = source.settings(config, steps[-1])
    layers = features_lib.resolve_layers(pcfg.layers, model_cfg.n_layer)
    masks = max(1, int(pcfg.bert_ensemble)) if model_cfg.objective == "bert" else 1
    pooling = str(pcfg.get("pooling", "mean"))
    layout = param_layout(model_cfg, mesh, rules)
    head = attentive.AttentiveSettings.from_config(pcfg) if pcfg.head == "attentive" else None
    token_sets = None if head is None else "average" if pcfg.average_layers else "each"
    if head is not None and (jax.process_count() > 1 or "://" in str(workpath)):
        raise ValueError("probe.head='attentive' writes token features to a local workdir read by one process: "
                         f"run it in one process with a local workdir (got {jax.process_count()} processes, "
                         f"workdir {workpath})")
    extractor = features_lib.FeatureExtractor(
        model_cfg, layout, mesh, rules, data_cfg, palette, layers, seed=int(pcfg.seed), pooling=pooling,
        batch_size=int(pcfg.batch_size or config.train.eval_batch_size or config.train.batch_size),
        token_sets=token_sets)
    feature_id = {"checkpoints": str(source.path), "model": model_cfg, "data": data_cfg.to_dict(),
                  "palette": palette.centres.tolist(), "layers": layers, "masks": masks, "seed": int(pcfg.seed),
                  "max_train_examples": int(pcfg.max_train_examples),
                  **({"pooling": pooling} if pooling != "mean" else {}),  # mean: earlier runs' saved features
                  **({"token_sets": token_sets} if token_sets else {})}
    result_id = {**feature_id, "settings": settings, "concat_layers": int(pcfg.concat_layers),
                 "low_data": [list(pcfg.low_data_budgets), int(pcfg.low_data_subsets)],
                 **({"attentive": head} if head else {})}
    setup = _Setup(
        pcfg=pcfg, settings=settings, steps=steps, model_cfg=model_cfg, palette=palette, data_cfg=data_cfg,
        run_config=source.run_config(steps[-1]), num_classes=records.num_classes(data_cfg), layers=layers,
        masks=masks, pooling=pooling, layout=layout, extractor=extractor, feature_id=feature_id, result_id=result_id,
        progress=probe_progress.ProbeProgress(workpath, enabled=bool(pcfg.resume), writer=jax.process_index() == 0),
        attentive=head, token_dir=str(workpath / workdir_files.PROBE_TOKENS))
    _log_setup(setup, source)
    return setup


def _log_setup(setup: _Setup, source: pretrained.Source) -> None:
    """One line: the checkpoints, layers, examples per split, classes and the memory the features take."""
    width = setup.model_cfg.d_model * setup.extractor.feature_grid ** 2  # features per layer
    n = {s: records.num_examples(setup.data_cfg, s) for s in records.SPLITS}
    if setup.max_train:
        n["train"] = min(n["train"], setup.max_train)
    size = sum(features_lib.approx_feature_bytes(n[s], len(setup.layers), width, 1 if s == "train" else setup.masks)
               for s in n)
    logging.info("probe: %d checkpoint(s) %s of %s; %d layers %s (%s pooling, %d features each); %s examples "
                 "(train/val/test); %d classes; features take %s per checkpoint", len(setup.steps), setup.steps,
                 source.path, len(setup.layers), setup.layers, setup.pooling, width,
                 "/".join(str(n[s]) for s in records.SPLITS), setup.num_classes, features_lib.human_bytes(size))
    if setup.attentive:
        sets = 1 if setup.extractor.token_sets == "average" else len(setup.layers)
        disk = sum(token_store.TokenStore.nbytes(n[s], sets, setup.model_cfg.n_ctx, setup.model_cfg.d_model)
                   for s in n)
        logging.info("attentive probe: %d token feature set(s) (%s), bfloat16 on disk in %s: %s per model",
                     sets, setup.extractor.token_sets, setup.token_dir, features_lib.human_bytes(disk))


def _check_same_model(config: ml_collections.ConfigDict, source: pretrained.Source, setup: _Setup, step: int) -> None:
    """Every probed step must be the same model and palette (one run).

    Raises:
      ValueError: naming the step that differs.
    """
    other, other_palette, _ = source.settings(config, step)
    if other != setup.model_cfg or not np.array_equal(other_palette.centres, setup.palette.centres):
        raise ValueError(f"{source.where(step)} is not the same model or palette as step "
                         f"{setup.steps[-1]}: probe.checkpoint_steps must come from one run")


def _checkpoint_features(setup: _Setup, source: pretrained.Source, step: int) -> fitting.Splits:
    """The three splits' features of checkpoint `step` (its parameters are restored only for a split not saved)."""
    return fitting.extract_splits(
        setup.extractor, lambda: source.restore_params(step, setup.layout), masks=setup.masks,
        max_train=setup.max_train, progress=setup.progress, name=f"step{step}",
        fingerprint=probe_progress.fingerprint({**setup.feature_id, "step": step}), token_dir=setup.token_dir)


def _probe_checkpoint(setup: _Setup, step: int, splits: fitting.Splits, *, started: float) -> dict[str, Any]:
    """Every layer's probe of one checkpoint (and the low-data protocol on its best layer), or the saved result.

    Args:
      started: when the checkpoint's work began (its time is logged).
    """
    pcfg = setup.pcfg

    def fit() -> dict[str, Any]:
        res = fitting.probe_splits(splits, setup.settings, num_classes=setup.num_classes, layers=setup.layers,
                                   n_layer=setup.model_cfg.n_layer, concat_layers=int(pcfg.concat_layers))
        res = {"step": step, "val_loss": splits["validation"].loss, "test_loss": splits["test"].loss, **res}
        if pcfg.low_data_budgets:
            res["low_data"] = {"layer": res["best_layer"], "results": fitting.low_data(
                splits, setup.layers.index(res["best_layer"]), setup.settings, num_classes=setup.num_classes,
                budgets=[int(b) for b in pcfg.low_data_budgets], subsets=int(pcfg.low_data_subsets))}
        if setup.attentive:
            res["attentive"] = _attentive_result(setup, splits, low_data=True)
        return res

    result = setup.progress.result_or_compute(
        f"step{step}", probe_progress.fingerprint({**setup.result_id, "step": step}), fit)
    logging.info("step %d: best layer %d, validation %.4f, test %.4f (%.1fs)", step, result["best_layer"],
                 result["best"]["val_accuracy"], result["best"]["test_accuracy"], time.time() - started)
    return result


def _raw_pixel_baseline(setup: _Setup, step: int, splits: fitting.Splits) -> dict[str, Any]:
    """The probe on the input pixels of the first checkpoint's splits, or the saved result."""
    result = setup.progress.result_or_compute(
        "raw_pixels", probe_progress.fingerprint({**setup.result_id, "step": step}),
        lambda: _with_attentive_pixels(setup, splits, fitting.pixel_baseline(
            splits, setup.palette, setup.settings, num_classes=setup.num_classes)))
    logging.info("raw-pixel baseline: test %.4f", result["test_accuracy"])
    return result


def _random_init_baseline(setup: _Setup) -> dict[str, Any]:
    """Every layer's probe of the same architecture with random weights (best on validation), or the saved one."""
    t0 = time.time()
    seed = int(setup.pcfg.seed) + 12345
    mesh, rules = setup.extractor.mesh, setup.extractor.rules
    splits = fitting.extract_splits(
        setup.extractor, lambda: random_params(setup.model_cfg, setup.layout, mesh, rules, jax.random.key(seed)),
        masks=setup.masks, max_train=setup.max_train, progress=setup.progress, name="random",
        fingerprint=probe_progress.fingerprint(setup.feature_id), token_dir=setup.token_dir)

    def fit() -> dict[str, Any]:
        res = fitting.probe_splits(splits, setup.settings, num_classes=setup.num_classes, layers=setup.layers,
                                   n_layer=setup.model_cfg.n_layer)
        return {"layers": res["layers"], "best_layer": res["best_layer"], "best": res["best"],
                "test_accuracy": res["best"]["test_accuracy"],
                **({"attentive": _attentive_result(setup, splits)} if setup.attentive else {})}

    result = setup.progress.result_or_compute("random_init", probe_progress.fingerprint(setup.result_id), fit)
    logging.info("random-weights baseline: best layer %d, test %.4f (%.1fs)", result["best_layer"],
                 result["test_accuracy"], time.time() - t0)
    return result


def _feature_sets(setup: _Setup) -> tuple[list[int], list[str]]:
    """The attentive head's feature sets: (layer ids, names); with ``probe.average_layers`` one set (named by its
    layers, id the last of them)."""
    n_layer = setup.model_cfg.n_layer
    if setup.extractor.token_sets == "average":
        return [setup.layers[-1]], [f"mean of layers {','.join(str(l) for l in setup.layers)}"]
    return list(setup.layers), [features_lib.layer_name(l, n_layer) for l in setup.layers]


def _attentive_result(setup: _Setup, splits: fitting.Splits, *, low_data: bool = False) -> dict[str, Any]:
    """The attentive head on every feature set of `splits`, the best on validation; with `low_data` and
    ``probe.low_data_budgets``, the low-data protocol on the best set."""
    t0 = time.time()
    layers, names = _feature_sets(setup)
    res = fitting.attentive_probe(splits, setup.attentive, num_classes=setup.num_classes, layers=layers, names=names)
    res["test_accuracy"] = res["best"]["test_accuracy"]
    if setup.extractor.token_sets == "average":
        res["average_layers"] = list(setup.layers)
    budgets = [int(b) for b in setup.pcfg.low_data_budgets]
    if low_data and budgets:
        res["low_data"] = {"layer": res["best_layer"], "results": fitting.attentive_low_data(
            splits, res["best"], layers.index(res["best_layer"]), setup.attentive, num_classes=setup.num_classes,
            budgets=budgets, subsets=int(setup.pcfg.low_data_subsets))}
    logging.info("attentive probe: best %s, validation %.4f, test %.4f (%.1fs)", res["best"]["name"],
                 res["best"]["val_accuracy"], res["best"]["test_accuracy"], time.time() - t0)
    return res


def _with_attentive_pixels(setup: _Setup, splits: fitting.Splits, result: dict[str, Any]) -> dict[str, Any]:
    """The raw-pixel baseline's result with the attentive head's on the pixels, when the job runs that head."""
    if setup.attentive:
        result["attentive"] = fitting.attentive_pixel_baseline(splits, setup.palette, setup.attentive,
                                                               num_classes=setup.num_classes,
                                                               token_dir=setup.token_dir)
    return result


def _results(config: ml_collections.ConfigDict, setup: _Setup, source: pretrained.Source,
             per_checkpoint: list[dict[str, Any]], splits: fitting.Splits, baselines: dict[str, Any], *,
             seconds: float) -> dict[str, Any]:
    """Everything the job found, with the exact config and checkpoints (``results.json``).

    Args:
      splits: the last checkpoint's splits (their sizes are reported).
      seconds: this job's time; the reused pieces' time is added.
    """
    last = per_checkpoint[-1]
    progress = setup.progress
    return {
        "job": "probe",
        "source": {"path": source.path, "kind": source.kind},
        "source_checkpoints": (str(ckpt_lib.checkpoint_dir(source.path)) if source.kind == pretrained.RUN
                               else source.path),
        "steps": setup.steps,
        "step": last["step"],
        "dataset": config.data.name,
        "num_classes": setup.num_classes,
        "examples": {s: splits[s].n for s in records.SPLITS},
        "model": {k: getattr(setup.model_cfg, k) for k in pretrained.ARCHITECTURE_FIELDS},
        "bert_masks": setup.masks,
        "pooling": setup.pooling,
        "head": "attentive" if setup.attentive else "linear",
        "best_layer": last["best_layer"],
        "val_accuracy": last["best"]["val_accuracy"],
        "test_accuracy": last["best"]["test_accuracy"],
        **({"attentive_test_accuracy": last["attentive"]["best"]["test_accuracy"]} if "attentive" in last else {}),
        "checkpoints": per_checkpoint,
        "baselines": baselines,
        "config": json.loads(config.to_json_best_effort()),
        "pretrain_config": setup.run_config.to_dict() if setup.run_config is not None else None,
        "seconds": seconds + progress.reused_seconds,  # the reused pieces' time included
        "reused": progress.reused,
        "reused_seconds": progress.reused_seconds,
    }


def _write_results(results: dict[str, Any], workpath: epath.Path, *, plot: bool) -> dict[str, Any]:
    """results.json and the figures (process 0), the table on stdout; returns the results with their table."""
    table = format_table(results)
    if jax.process_index() == 0:
        workpath.mkdir(parents=True, exist_ok=True)
        (workpath / workdir_files.RESULTS).write_text(json.dumps(jsonable(results), indent=2))
        if plot:
            plot_layers(results, str(workpath / workdir_files.PROBE_LAYERS_PLOT))
            if len(results["checkpoints"]) > 1:
                plot_vs_loss(results, str(workpath / workdir_files.PROBE_LOSS_PLOT))
        print(table, flush=True)
        print(f"Probe results: {workpath / workdir_files.RESULTS}", flush=True)
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


def _warn_attentive_lr_edge(best: dict[str, Any], head: attentive.AttentiveSettings) -> None:
    """Says when the attentive head's chosen learning rate is the largest or smallest of ``probe.attentive_lrs``:
    the best rate may lie outside the values tried."""
    if len(head.lrs) > 1 and best["lr"] in (min(head.lrs), max(head.lrs)):
        logging.warning("probe: the attentive head's best learning rate %g is at the edge of probe.attentive_lrs=%s; "
                        "widen probe.attentive_lrs past it", best["lr"], ",".join(f"{lr:g}" for lr in head.lrs))


def _loss_text(loss: float | None, unit: str = " nats/token") -> str:
    """A validation loss for the table; a prefix-causal model's features pass scores none (NaN, None in JSON)."""
    if loss is None or not np.isfinite(loss):
        return "none (a prefix model is read bidirectionally)" if unit else "-"
    return f"{loss:.4f}{unit}"


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
             f"{last['step']}, validation loss {_loss_text(last['val_loss'])}"]
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
        ours, rnd = best["test_accuracy"], rand["test_accuracy"]
        raw = results["baselines"]["raw_pixels"]["test_accuracy"]
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
    if "attentive" in last:
        lines += _attentive_lines(results, last["attentive"])
    if len(results["checkpoints"]) > 1:
        lines.append("checkpoints (step: validation loss -> best-layer test accuracy):")
        for c in results["checkpoints"]:
            lines.append(f"  {c['step']:>8}: {_loss_text(c['val_loss'], '')} -> {pct(c['best']['test_accuracy']).strip()}% "
                         f"(layer {c['best_layer']})")
    return "\n".join(lines)


def _attentive_lines(results: dict[str, Any], res: dict[str, Any]) -> list[str]:
    """The attentive head's part of the table: every feature set, the best, its baselines and low data."""
    pct = lambda x: linear_probe.format_percent(x).strip()  # noqa: E731
    lines = ["Attentive probe (AIM's attention-pooling head on the token features; learning rate, weight decay and "
             "epoch chosen on validation, no refit):",
             f"  {'feature':<28} {'lr':>8} {'wd':>6} {'epoch':>5}  {'val %':>6}  {'test %':>6}"]
    for r in res["layers"]:
        mark = "*" if r["layer"] == res["best_layer"] else " "
        lines.append(f"  {r['name']:<28} {r['lr']:>8.3g} {r['weight_decay']:>6.3g} {r['epoch']:>5}  "
                     f"{pct(r['val_accuracy']):>6}  {pct(r['test_accuracy']):>6}{mark}")
    lines.append(f"attentive probe, best on validation ({res['best']['name']}): test accuracy "
                 f"{pct(res['best']['test_accuracy'])}%")
    base = results["baselines"]
    for key, label in (("raw_pixels", "raw pixels (colour, row, column per token)"), ("random_init", "random weights")):
        if "attentive" in base.get(key, {}):
            lines.append(f"attentive baseline, {label}: test {pct(base[key]['attentive']['test_accuracy'])}%")
    for r in res.get("low_data", {}).get("results", []):
        lines.append(f"  attentive, {r['budget']:>6} labels: {100 * r['mean_accuracy']:.2f} +- "
                     f"{100 * r['std_accuracy']:.2f}%")
    return lines


def plot_layers(results: dict[str, Any], path: str) -> None:
    """Figure 2: test accuracy of each layer's probe, one line per checkpoint, the baselines as lines."""
    series = []
    for c in results["checkpoints"]:
        series.append({"x": [r["layer"] for r in c["layers"]], "y": [100 * r["test_accuracy"] for r in c["layers"]],
                       "label": f"pretrained, step {c['step']}"})
    hlines = []
    for c in results["checkpoints"]:
        att = c.get("attentive")
        if att and len(att["layers"]) > 1:
            series.append({"x": [r["layer"] for r in att["layers"]],
                           "y": [100 * r["test_accuracy"] for r in att["layers"]],
                           "label": f"attentive head, step {c['step']}"})
        elif att:
            hlines.append({"y": 100 * att["best"]["test_accuracy"], "color": "#2ca02c",
                           "label": f"attentive head, {att['best']['name']}, step {c['step']}"})
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
