"""The workdir: the names of every file a job writes there, the workdir as a path (local or gs://), atomic writes, and
results as strict JSON.

A leaf module (it imports nothing of igpt_jax): every job, the report tools and the tests name a workdir's files
through these constants, so a file is renamed in one place.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from etils import epath

# ------------------------------------------------------------------------------------------------ a training run
CHECKPOINTS = "checkpoints"  # Orbax steps: state, data position, config, palette (igpt_jax.training.checkpoint)
CHECKPOINTS_UNREADABLE = "checkpoints_unreadable"  # steps that did not read back, moved aside (never deleted)
CONFIG_JSON = "config.json"  # the settings in force
CONFIG_HISTORY = "config_history.jsonl"  # each setting changed on resume (step, field, old, new, time)
METRICS = "metrics.jsonl"  # one JSON record per logged step
TENSORBOARD = "tensorboard"  # TensorBoard event files
SEGMENTS = "segments.json"  # each invocation's steps and wall time
FINISHED = "FINISHED"  # written when the last step is saved (launch/relaunch.sh waits for it)
LEASE = "lease.json"  # the running run's lease on the workdir: one writer at a time (igpt_jax.training.lease)
TRACKING_HISTORY, TRACKING_PLOT = "tracking.json", "tracking.png"  # representation tracking while pretraining
TRACKING_TOKENS = "tracking_tokens"  # track.attentive: the subset's token features (overwritten each evaluation)

# ------------------------------------------------------------------------------------------------ downstream jobs
RESULTS = "results.json"  # probe and fine-tuning results
PROBE_PROGRESS = "progress"  # the probe's saved features and fits (a rerun reuses them)
PROBE_TOKENS = "tokens"  # the attentive probe's token features, bfloat16 on disk (igpt_jax/probing/token_store.py)
PROBE_LAYERS_PLOT, PROBE_LOSS_PLOT = "probe_layers.png", "probe_vs_val_loss.png"
FINETUNE_BEST = "best"  # the fine-tuning run's best parameters (an Orbax directory)
VAL_HISTORY = "val_history.json"  # fine-tuning's validation accuracy at every evaluation
VQVAE_RESULTS, VQVAE_GRID = "vqvae_results.json", "reconstructions.png"
SAMPLE_INFO = "sample_info.json"
COMPLETIONS_GRID, COMPLETIONS, ORIGINALS = "completions.png", "completions.npy", "originals.npy"  # sample: complete
SAMPLES_GRID, SAMPLES = "samples.png", "samples.npy"  # sample: unconditional
COMPILE_REPORT = "compile_report.json"
LR_SEARCH_RESULT, LR_SEARCH_TABLE, LR_SEARCH_PLOT = "lr_search.json", "lr_search.txt", "lr_search.png"
LR_SEARCH_TRIAL = "lr_search_trial.json"  # in each trial's workdir: its result (or, while interrupted, its time)

# ------------------------------------------------------------------------------------------------ a converted model
CONVERTED_CONFIG, CONVERTED_PALETTE, CONVERTED_PARAMS = "model_config.json", "palette.json", "params"


def eval_results(split: str) -> str:
    """The evaluate job's result file for a split."""
    return f"eval_{split}.json"


def workpath_of(workdir: str) -> epath.Path:
    """The workdir as an `epath.Path`: absolute when local, as given when remote (gs://...)."""
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


def write_atomic(path: epath.Path, data: bytes) -> None:
    """Writes `data` to a temporary name beside `path`, then renames it: a kill leaves the old file or the new one.
    On gs:// an upload is atomic itself (the object is replaced whole or not at all): written directly."""
    if "://" in str(path):
        path.write_bytes(data)
        return
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    tmp.replace(path)


def jsonable(x: Any) -> Any:
    """`x` with numpy scalars and arrays as Python values, tuples as lists, keys as strings, NaN/inf as None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    return x
