"""What a resumed run may change: its settings against those stored in the checkpoint it resumes from.

* Architecture (``model.*``) and data (``data.*``) settings cannot change within a run: the parameters and the
  token stream would no longer be those of the checkpoint. Settings that only say where or how fast things run are
  free: ``model.{attention, attention_block, remat, scan_unroll}`` and ``data.{data_dir, palette_path,
  import_source, auto_import, num_workers, read_threads, prefetch_buffer_size}``.
* Optimizer and schedule settings (``train.{batch_size, num_steps, lr, warmup_steps, schedule, b1, b2, eps,
  weight_decay, grad_clip_norm}``, ``model.{dropout, dtype}`` and ``seed``) change the run from the resumed step on:
  they need ``checkpoint.allow_changes=True``.
* Everything else (logging, evaluation, checkpointing, mesh, later jobs) is free.

The VQ-VAE job (``job='vqvae'``) has its own architecture, data and schedule under ``vqvae``: its codebook and
blocks (``vqvae.{vocab_size, downsample, residual_layers}``) and its images (``vqvae.data.*``, with the same free
fields as ``data``) are fixed, its optimizer and codebook-update settings (``vqvae.{batch_size, num_steps, lr, decay,
epsilon, commitment, dead_fraction, revive_noise, data_variance}`` and ``seed``) need the flag, and the
transformer's sections (``model``, ``data``, ``train``), which only later jobs read, are free.

Every change that is made is appended to ``{workdir}/config_history.jsonl`` (step, field, old, new, time), and
``config.json`` holds the settings in force.
"""

from __future__ import annotations

import json
import time
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from igpt_jax import workdir as workdir_files
from igpt_jax.errors import ConfigError

HISTORY_FILE = workdir_files.CONFIG_HISTORY
FREE_MODEL = frozenset({"attention", "attention_block", "remat", "scan_unroll"})
FREE_DATA = frozenset({"data_dir", "palette_path", "import_source", "auto_import", "num_workers", "read_threads",
                       "prefetch_buffer_size"})
SCHEDULE = frozenset({"train." + k for k in ("batch_size", "num_steps", "lr", "warmup_steps", "schedule", "b1", "b2",
                                             "eps", "weight_decay", "grad_clip_norm")}
                     | {"model.dropout", "model.dtype", "seed"})

VQVAE_FIXED = frozenset("vqvae." + k for k in ("vocab_size", "downsample", "residual_layers"))
VQVAE_SCHEDULE = frozenset({"vqvae." + k for k in ("batch_size", "num_steps", "lr", "decay", "epsilon", "commitment",
                                                   "dead_fraction", "revive_noise", "data_variance")} | {"seed"})


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _plain(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """The config as JSON would store it (tuples as lists), so that stored and current values compare equal."""
    text = config.to_json_best_effort() if isinstance(config, ml_collections.ConfigDict) else json.dumps(config)
    return _flatten(json.loads(text))


def kind_of(field: str, job: str = "pretrain") -> str:
    """'fixed' (architecture, data), 'schedule' (needs the flag) or 'free', for a run of `job`."""
    if job == "vqvae":
        if field in VQVAE_SCHEDULE:
            return "schedule"
        if field in VQVAE_FIXED:
            return "fixed"
        if field.startswith("vqvae.data."):
            return "free" if field.removeprefix("vqvae.data.") in FREE_DATA else "fixed"
        return "free"
    group, _, name = field.partition(".")
    if field in SCHEDULE:
        return "schedule"
    if group == "model":
        return "free" if name in FREE_MODEL else "fixed"
    if group == "data":
        return "free" if name in FREE_DATA else "fixed"
    return "free"


def changes(stored: ml_collections.ConfigDict | dict, current: ml_collections.ConfigDict | dict
            ) -> list[tuple[str, Any, Any]]:
    """(field, stored value, current value) of every field both configs have and that differs, in field order."""
    old, new = _plain(stored), _plain(current)
    return [(k, old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]]


def check_resume(stored: ml_collections.ConfigDict | dict, current: ml_collections.ConfigDict, *, step: int,
                 workdir: str, allow_changes: bool) -> list[tuple[str, Any, Any]]:
    """The changes a resumed run makes; raises before any of them is applied when one is not allowed.

    Raises:
      ConfigError: one line naming the field, its value in the checkpoint and its value now.
    """
    diff = changes(stored, current)
    job = str(current.get("job", "pretrain"))
    for field, old, new in diff:
        if kind_of(field, job) == "fixed":
            raise ConfigError(
                f"cannot resume {workdir} (checkpoint step {step}) with {field}={new!r}: the checkpoint was trained "
                f"with {field}={old!r}, and architecture and data settings cannot change within a run (use a new "
                "workdir)")
    for field, old, new in diff:
        if kind_of(field, job) == "schedule" and not allow_changes:
            raise ConfigError(
                f"resuming {workdir} (checkpoint step {step}) would change {field} from {old!r} to {new!r}: set "
                f"--config.checkpoint.allow_changes=True to change optimizer or schedule settings mid-run (each "
                f"change is recorded in {HISTORY_FILE})")
    return diff


def record(workpath: epath.Path, step: int, diff: list[tuple[str, Any, Any]]) -> None:
    """Appends each change to the workdir's history (read it with one JSON object per line)."""
    if not diff:
        return
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    lines = "".join(json.dumps({"step": step, "field": f, "old": old, "new": new, "time": now}) + "\n"
                    for f, old, new in diff)
    path = workpath / HISTORY_FILE
    path.write_text((path.read_text() if path.exists() else "") + lines)


def settle(workpath: epath.Path, step: int, diff: list[tuple[str, Any, Any]], config: ml_collections.ConfigDict
           ) -> None:
    """After a resume at `step` (or a fresh start, `diff` empty): logs and records each change, and writes the
    settings in force to ``config.json`` (process 0's job)."""
    for field, old, new in diff:
        logging.warning("resumed at step %d with %s changed from %r to %r (recorded in %s)", step, field, old, new,
                        HISTORY_FILE)
    record(workpath, step, diff)
    (workpath / workdir_files.CONFIG_JSON).write_text(config.to_json_best_effort(indent=2))
