"""What a run saves and how it resumes: one Orbax CheckpointManager per run.

A checkpoint step holds four items, so that probe, fine-tune and sampling jobs need only the workdir:
  * ``state``: the `TrainState` (parameters, optimizer state, step), sharded; written once per array shard.
  * ``data``: the Grain iterator position of every process (optional), for exact resumption of the input.
  * ``config``: the run's resolved config as JSON.
  * ``palette``: the colour palette the tokens were made with.

Saves are asynchronous by default and atomic: a crash or kill at any moment leaves the previous complete step
restorable (Orbax writes into a temporary directory and renames it when complete).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from igpt_jax.data import pipeline as data_pipeline

STATE, DATA, CONFIG, PALETTE = "state", "data", "config", "palette"


def checkpoint_dir(workdir: str) -> epath.Path:
    """The run's checkpoint directory, absolute (Orbax's background thread needs an absolute path)."""
    path = str(workdir)
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
    return epath.Path(path) / "checkpoints"


class Checkpointer:
    """A run's checkpoints: save every `every_steps` steps (or when forced), keep the last `max_to_keep`."""

    def __init__(self, workdir: str, *, every_steps: int = 1000, max_to_keep: int = 3, async_save: bool = True,
                 create: bool = True):
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, int(every_steps)),
            max_to_keep=max_to_keep if max_to_keep and max_to_keep > 0 else None,
            enable_async_checkpointing=async_save,
            create=create,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(self, step: int, state: Any, *, data_iterator: Any = None, config: ml_collections.ConfigDict | None = None,
             palette: np.ndarray | None = None, force: bool = False) -> bool:
        """Starts saving `step` (asynchronously); returns whether a save was started."""
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = data_pipeline.iterator_save_args(data_iterator)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
        if palette is not None:
            items[PALETTE] = ocp.args.JsonSave({"centres": np.asarray(palette, np.float64).tolist()})
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, *, data_iterator: Any = None) -> Any:
        """Restores the train state at `step` onto the shardings of `abstract_state` (and the iterator in place)."""
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items[DATA] = data_pipeline.iterator_restore_args(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE]

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        restored = self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
        return ml_collections.ConfigDict(restored[CONFIG])

    def restore_palette(self, step: int) -> np.ndarray:
        restored = self.manager.restore(step, args=ocp.args.Composite(**{PALETTE: ocp.args.JsonRestore()}))
        return np.asarray(restored[PALETTE]["centres"], np.float32)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def resolve_step(ckpt: Checkpointer, step: int) -> int:
    """A named step (>= 0) or the latest (-1) of a run, with an error that says where when there is none.

    Raises:
      FileNotFoundError: naming the directory and the steps that exist.
    """
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: run the pretraining job with this workdir first")
    if step < 0:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"checkpoint step {step} is not in {ckpt.directory}; available steps: {steps}")
    return step


def is_primary() -> bool:
    return jax.process_index() == 0
