"""Representation tracking: linear probes of every layer on a fixed labelled subset, inside the pretraining loop.

Every ``config.track.every`` steps (and at the last step) the `Tracker` takes the CURRENT parameters and

  1. extracts every layer's sequence-mean feature (0..n_layer, n_layer = the final norm) of a fixed labelled subset
     with the probe job's extractor (`igpt_jax.probing.features.FeatureExtractor`): the first
     ``track.train_examples`` images of the training split and the first ``track.val_examples`` of the validation
     split (the data layer's split; TFDS stores records in a fixed pseudo-random order, so these are the same
     reproducible random images at every evaluation, in every segment of a resumed run, on any mesh);
  2. fits one multinomial logistic regression per layer with the JAX L-BFGS solver (`igpt_jax.probing.logreg_jax`, all
     layers in one call), choosing C on the subset's validation part (grid ``track.C``, or ``probe.C`` when empty,
     widened at its edges as the probe's is);
  3. records each layer's validation accuracy, the best layer and its accuracy, the subset's validation loss (mean
     NLL of the validation images, from the same forward pass) and the evaluation's seconds: ``track/*`` scalars in
     TensorBoard and ``metrics.jsonl`` (`igpt_jax.training.run_log.RunLog`), every evaluation in ``tracking.json``, and
     ``tracking.png``, the best layer's accuracy against the validation loss (the paper's Figure 3, redrawn each
     time). The progress line shows the last evaluation's seconds and the share of this segment's wall time spent in
     tracking.

With ``track.attentive`` (off by default: it costs a head's training per evaluation) the same pass also writes
the subset's tokens averaged over every layer (bfloat16, ``WORKDIR/tracking_tokens``, overwritten each time) and
the attentive head (`igpt_jax.probing.attentive`, ``probe.attentive_*`` settings) is fitted on them: its validation
accuracy is ``track/attentive_accuracy``.

The figures are those of the probe job (`igpt_jax.jobs.probe`) on the same checkpoint with ``probe.solver=
'jax_lbfgs'``, ``probe.max_train_examples=track.train_examples``, the same C grid and a validation split of
``track.val_examples`` images (its per-layer ``val_accuracy`` and ``val_loss``); BERT models are probed under one
mask per image (the probe job's ``probe.bert_ensemble=1``). On resume the history is cut back to the restored step,
and an evaluation redone at a step gives the numbers it gave before (the parameters and the subset are the same).
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
from jax.sharding import Mesh

from igpt_jax import workdir as workdir_files
from igpt_jax.data import records
from igpt_jax.data.palette import Palette
from igpt_jax.errors import ConfigError
from igpt_jax.models.igpt import ModelConfig
from igpt_jax.models.layout import Layout
from igpt_jax.probing import attentive
from igpt_jax.probing import features as features_lib
from igpt_jax.probing import linear_probe
from igpt_jax.reports import plots
from igpt_jax.workdir import write_atomic

PREFIX = "track/"  # the tag prefix of every tracking scalar in TensorBoard and metrics.jsonl


def probe_settings(config: ml_collections.ConfigDict) -> linear_probe.ProbeSettings:
    """The tracking probe: the JAX L-BFGS solver, grid ``track.C`` (``probe.C`` when empty), the rest from probe.*."""
    base = linear_probe.ProbeSettings.from_config(config.probe)
    grid = tuple(float(c) for c in config.track.C) or base.C
    return dataclasses.replace(base, solver="jax_lbfgs", C=grid)


def batch_size(config: ml_collections.ConfigDict) -> int:
    """The global feature-extraction batch: the probe job's (probe.batch_size, else the evaluation batch)."""
    return int(config.probe.batch_size or config.train.eval_batch_size or config.train.batch_size)


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the config asks for tracking (configs without a ``track`` section do not)."""
    return bool(config.get("track") and config.track.every)


def check_subset(config: ml_collections.ConfigDict) -> None:
    """The subset fits in the data's training and validation splits (reads the dataset's sizes only).

    Raises:
      ConfigError: one line naming the field, its value and the split's size.
    """
    if not enabled(config):
        return
    for field, split in (("train_examples", "train"), ("val_examples", "validation")):
        have = records.num_examples(config.data, split)
        if config.track[field] > have:
            raise ConfigError(f"track.{field}={config.track[field]} is more than the {have} images of the {split} "
                              f"split of data.name={config.data.name!r}; choose at most {have}")


@dataclasses.dataclass
class Evaluation:
    """One tracking evaluation: what `Tracker.evaluate` records."""

    step: int
    val_loss: float  # mean NLL (nats/token) of the subset's validation images
    layers: list[int]
    accuracies: list[float]  # per layer: validation accuracy at its best C
    C: list[float]  # per layer: the chosen C
    best_layer: int
    best_accuracy: float
    seconds: float
    attentive_accuracy: float | None = None  # the attentive head's validation accuracy (track.attentive)

    def scalars(self) -> dict[str, float]:
        """The ``track/*`` scalars of TensorBoard and metrics.jsonl."""
        out = {f"{PREFIX}layer_{l}": a for l, a in zip(self.layers, self.accuracies)}
        out.update({f"{PREFIX}best_layer": float(self.best_layer), f"{PREFIX}best_accuracy": self.best_accuracy,
                    f"{PREFIX}val_loss": self.val_loss, f"{PREFIX}seconds": self.seconds})
        if self.attentive_accuracy is not None:
            out[f"{PREFIX}attentive_accuracy"] = self.attentive_accuracy
        return out


class Tracker:
    """Probes every layer of the current parameters on a fixed labelled subset; see the module docstring.

    Args:
      config: the run's config (``track``, ``probe``, ``data``).
      model_cfg: the model.
      params_layout: the parameters' layout on the mesh (the train state's).
      mesh, rules: the mesh and the logical-axis rules.
      palette: the run's palette.
      workpath: the run directory (tracking.json, tracking.png).
      start_step: the step the run (re)starts from; the saved history after it is dropped.
      clock: seconds, for the share of wall time (tests inject a fake).
    """

    def __init__(self, config: ml_collections.ConfigDict, model_cfg: ModelConfig, params_layout: Layout, mesh: Mesh,
                 rules, palette: Palette, workpath: epath.Path, *, start_step: int, clock=time.monotonic):
        self.every = int(config.track.every)
        self.train_examples, self.val_examples = int(config.track.train_examples), int(config.track.val_examples)
        self.settings = probe_settings(config)
        self.num_classes = records.num_classes(config.data)
        self.layers = features_lib.resolve_layers("all", model_cfg.n_layer)
        self.attentive = (attentive.AttentiveSettings.from_config(config.probe)
                          if config.track.get("attentive", False) else None)
        self.token_dir = str(workpath / workdir_files.TRACKING_TOKENS)
        self.extractor = features_lib.FeatureExtractor(model_cfg, params_layout, mesh, rules, config.data, palette,
                                                       self.layers, batch_size=batch_size(config),
                                                       seed=int(config.probe.seed),
                                                       token_sets="average" if self.attentive else None)
        self.primary = jax.process_index() == 0
        self.history_path = workpath / workdir_files.TRACKING_HISTORY
        self.plot_path = workpath / workdir_files.TRACKING_PLOT
        self.dataset = config.data.name
        self.history = [h for h in self._read_history() if h["step"] <= start_step]
        if self.primary and self.history_path.exists():
            self._write_history()  # what a stopped run recorded after its last checkpoint is redone
        self._clock = clock
        self._started = clock()
        self.total_seconds = 0.0
        self.last: Evaluation | None = None

    def due(self, step: int, final: bool) -> bool:
        return bool(self.every) and (step % self.every == 0 or final)

    def evaluate(self, step: int, params: Any) -> Evaluation:
        """Features of the subset under `params`, one probe per layer, the best layer (on validation)."""
        t0 = self._clock()
        train, val = (self.extractor.extract(params, split, max_examples=n, token_path=self._token_path(split))
                      for split, n in (("train", self.train_examples), ("validation", self.val_examples)))
        if self.last is None:  # the first evaluation of this segment
            self._check_labels(train.labels)
        fits = linear_probe.fit_layers(train.features, train.labels, val.features, val.labels, self.settings,
                                       num_classes=self.num_classes, layers=self.layers,
                                       rng=np.random.default_rng(self.settings.seed + 1))
        best = linear_probe.best_position(fits)
        attentive_accuracy = None
        if self.attentive:  # the head early-stopped on the subset's validation images: their accuracy
            head = attentive.fit(train.token_store, val.token_store, 0, self.attentive, num_classes=self.num_classes)
            attentive_accuracy = float(head.val_accuracy[head.best])
        seconds = self._clock() - t0
        self.total_seconds += seconds
        self.last = Evaluation(
            step=int(step), val_loss=float(val.loss), layers=list(self.layers),
            accuracies=[float(f.val_accuracy) for f in fits], C=[float(f.model.hyper) for f in fits],
            best_layer=int(self.layers[best]), best_accuracy=float(fits[best].val_accuracy), seconds=float(seconds),
            attentive_accuracy=attentive_accuracy)
        self.history.append(dataclasses.asdict(self.last))
        logging.info("step %d: tracking probe: best layer %d, validation accuracy %.4f (layers %s), subset validation "
                     "loss %.4f (%.1fs)", step, self.last.best_layer, self.last.best_accuracy,
                     " ".join(f"{a:.3f}" for a in self.last.accuracies), self.last.val_loss, seconds)
        if self.primary:
            self._write_history()
            self._plot()
        return self.last

    def progress_note(self) -> str:
        """'12.3s (4.1%)': the last evaluation's seconds and tracking's share of this segment's wall time."""
        if self.last is None:
            return ""
        share = 100.0 * self.total_seconds / max(self._clock() - self._started, 1e-9)
        return f"{self.last.seconds:.1f}s ({share:.1f}%)"

    # ------------------------------------------------------------------------------------------ files

    def _token_path(self, split: str) -> str | None:
        return f"{self.token_dir}/tokens-{split}.npy" if self.attentive else None

    def _check_labels(self, labels: np.ndarray) -> None:
        present = np.unique(labels)
        if len(present) < 2 or present.min() < 0:
            raise ConfigError(f"track.every={self.every}: the first {len(labels)} training images of "
                              f"data.name={self.dataset!r} have labels {present.tolist()[:5]}; tracking needs "
                              "labelled data of at least 2 classes (set track.every=0)")
        counts = np.bincount(labels, minlength=self.num_classes)
        logging.info("tracking subset: %d training images (%d-%d per class), %d validation images, %d layers, C grid "
                     "%s", len(labels), counts.min(), counts.max(), self.val_examples, len(self.layers),
                     list(self.settings.C))

    def _read_history(self) -> list[dict[str, Any]]:
        return json.loads(self.history_path.read_text()) if self.history_path.exists() else []

    def _write_history(self) -> None:
        write_atomic(self.history_path, json.dumps(self.history, indent=1).encode())

    def _plot(self) -> None:
        h = self.history
        plots.line_chart(
            str(self.plot_path),
            series=[{"x": [e["val_loss"] for e in h], "y": [100 * e["best_accuracy"] for e in h],
                     "label": "best layer", "labels": [f"step {e['step']} (layer {e['best_layer']})" for e in h]}],
            point_labels=True, title=f"Tracking probe accuracy vs validation loss ({self.dataset}, live)",
            xlabel=f"validation loss on the tracking subset ({self.val_examples} images, nats per token)",
            ylabel=f"best-layer validation accuracy (%), probe on {self.train_examples} images")


def make_tracker(config: ml_collections.ConfigDict, model_cfg: ModelConfig, state_layout: Layout, mesh: Mesh, rules,
                 palette: Palette, workpath: epath.Path, *, start_step: int) -> Tracker | None:
    """The run's tracker (None when ``track.every`` is 0); `state_layout` is the train state's layout."""
    if not enabled(config):
        return None
    params_layout = Layout(abstract=state_layout.abstract.params, shardings=state_layout.shardings.params)
    return Tracker(config, model_cfg, params_layout, mesh, rules, palette, workpath, start_step=start_step)
