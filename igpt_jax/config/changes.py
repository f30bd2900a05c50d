"""What a resumed run may change: its settings against those stored in the checkpoint it resumes from.

A field's role (declared once in `igpt_jax.config.settings`; ``--list`` shows it) decides:

* ``architecture``, ``tokens`` and ``data``: fixed. The parameters and the token stream would no longer be those of
  the checkpoint (``model.d_model``, ``data.resolution``, ``data.name``, ...).
* ``schedule``: optimizer and schedule settings (``train.lr``, ``train.num_steps``, ``model.dropout``, ``seed``, ...)
  change the run from the resumed step on: they need ``checkpoint.allow_changes=True``.
* ``runtime`` and ``job``: free (where or how fast things run, logging, evaluation, checkpointing, mesh, later jobs).

A section's roles are those of one training run: the transformer's (``model``, ``data``, ``train``), the fine-tuned
classifier's (``finetune``) or the VQ-VAE's (``vqvae``, ``vqvae.data``); resuming a run of another job, they are
free. So the VQ-VAE job's codebook and blocks and its images are fixed, its optimizer and codebook-update settings
need the flag, and the transformer's sections, which only later jobs read, are free.

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
from igpt_jax.config import settings
from igpt_jax.errors import ConfigError

# What a resumed run may do with a field of each role.
KIND_OF_ROLE = {settings.ARCHITECTURE: "fixed", settings.TOKENS: "fixed", settings.DATA: "fixed",
                settings.SCHEDULE: "schedule", settings.RUNTIME: "free", settings.JOB: "free"}


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
    """'fixed', 'schedule' (needs the flag) or 'free', for a run of `job`, from the field's declared role.

    A field of a section whose run `job` does not train is free; a field that is not declared is free, and one
    declared without a role fixed (tests/test_settings.py fails for it).
    """
    setting = settings.get(field)
    if setting is None or setting.run not in settings.runs_of(job):
        return "free"
    return KIND_OF_ROLE.get(setting.role, "fixed")


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
                f"change is recorded in {workdir_files.CONFIG_HISTORY})")
    return diff


def record(workpath: epath.Path, step: int, diff: list[tuple[str, Any, Any]]) -> None:
    """Appends each change to the workdir's history (read it with one JSON object per line)."""
    if not diff:
        return
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    lines = "".join(json.dumps({"step": step, "field": f, "old": old, "new": new, "time": now}) + "\n"
                    for f, old, new in diff)
    path = workpath / workdir_files.CONFIG_HISTORY
    path.write_text((path.read_text() if path.exists() else "") + lines)


def settle(workpath: epath.Path, step: int, diff: list[tuple[str, Any, Any]], config: ml_collections.ConfigDict
           ) -> None:
    """After a resume at `step` (or a fresh start, `diff` empty): logs and records each change, and writes the
    settings in force to ``config.json`` (process 0's job)."""
    for field, old, new in diff:
        logging.warning("resumed at step %d with %s changed from %r to %r (recorded in %s)", step, field, old, new,
                        workdir_files.CONFIG_HISTORY)
    record(workpath, step, diff)
    (workpath / workdir_files.CONFIG_JSON).write_text(config.to_json_best_effort(indent=2))
