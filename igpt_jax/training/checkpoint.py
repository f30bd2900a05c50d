"""What a run saves and how it resumes: one Orbax CheckpointManager per run.

A checkpoint step holds four items, so that probe, fine-tune and sampling jobs need only the workdir:
  * ``state``: the `TrainState` (parameters, optimizer state, step), sharded; written once per array shard.
  * ``data``: the Grain iterator position of every process (optional), for exact resumption of the input.
  * ``config``: the run's resolved config as JSON.
  * ``palette``: the colour palette the tokens were made with.

Saves are asynchronous by default and atomic: a crash or kill at any moment leaves the previous complete step
restorable (Orbax writes into a temporary directory and renames it when complete). A step that is complete but
cannot be read back (a truncated or deleted file) is found by `Checkpointer.restore_newest_readable`: it names the
step, item and file in one line, moves the step to ``{workdir}/checkpoints_unreadable/`` (never deletes it) and
falls back to the newest step that restores.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from igpt_jax import workdir as workdir_files
from igpt_jax.data import iterators
from igpt_jax.errors import MissingSource, StorageError

STATE, DATA, CONFIG, PALETTE = "state", "data", "config", "palette"


class UnreadableCheckpoint(Exception):
    """A checkpoint step whose item could not be read back."""

    def __init__(self, step: int, item: str, detail: str):
        super().__init__(f"checkpoint step {step} is unreadable ({item}: {detail})")
        self.step, self.item, self.detail = step, item, detail


def _innermost(err: BaseException) -> BaseException:
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return err


def _short_error(err: BaseException) -> str:
    """The innermost cause of a restore or save error, on one line, without TensorStore's JSON spec."""
    err = _innermost(err)
    text = re.sub(r"\s*\[tensorstore_spec.*", "", str(err).splitlines()[0] if str(err) else type(err).__name__)
    return text[:300]


def _short_cause(text: str) -> str:
    """TensorStore's chain of a failed write in short: its status and first clause, then the final reason
    ('RESOURCE_EXHAUSTED: Error writing local file "F": No space left on device'), without its JSON spec."""
    text = re.sub(r"\s*\[(tensorstore_spec|os_error_code).*", "", text)
    parts = text.split(": ")
    return (": ".join(parts[:2] + parts[-1:]) if len(parts) > 3 else text)[:400]


def _from_abandoned_restore(unraisable) -> bool:
    """Whether an unraisable error comes from the reads a failed restore left behind: "Event loop is closed" from
    TensorStore callbacks, or the failed read coroutines of Orbax that nobody awaits any more."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return True
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in tb.tb_frame.f_code.co_filename


class _DropAbandonedRestoreErrors:
    """A `sys.unraisablehook` that drops the errors of a failed restore's leftover reads (each would print a
    traceback of dozens of lines) and passes every other one on."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        if not _from_abandoned_restore(unraisable):
            self.previous(unraisable)


class _DropUnretrievedFutures(std_logging.Filter):
    """Drops asyncio's "Future exception was never retrieved" records of the same failed restore."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("Future exception was never retrieved")


def checkpoint_dir(workdir: str) -> epath.Path:
    """The run's checkpoint directory, absolute (Orbax's background thread needs an absolute path)."""
    path = str(workdir)
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
    return epath.Path(path) / workdir_files.CHECKPOINTS


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
        self._saving: int | None = None  # the step of the save started last, until it is known to be complete
        self._failure: StorageError | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def missing_files(self, step: int, items: tuple[str, ...]) -> tuple[str, str] | None:
        """(item, path) of the first file that a step's `items` cannot be restored without, or None."""
        step_dir = self.directory / str(step)
        for item in items:
            if not (step_dir / item).exists():
                return item, str(step_dir / item)
            required = {
                STATE: ["_METADATA"] + (["manifest.ocdbt"] if any(
                    p.name.startswith("ocdbt.process_") for p in (step_dir / STATE).iterdir()) else []),
                DATA: [f"process_{jax.process_index()}-of-{jax.process_count()}.json"],
            }.get(item, ["metadata"])
            for name in required:
                if not (step_dir / item / name).exists():
                    return item, str(step_dir / item / name)
        return None

    def restore_newest_readable(self, abstract_state: Any, *, data_iterator: Any = None,
                                check_config: Callable[[int, ml_collections.ConfigDict], None] | None = None
                                ) -> tuple[int | None, Any]:
        """Restores the newest step that reads back: (step, state), or (None, None) when none does.

        A step that fails is named in one warning line (item and file or error), moved to
        ``{workdir}/checkpoints_unreadable/{step}-{time}`` and the previous step is tried. `check_config(step,
        config)` sees each step's stored config before its state is restored; what it raises (a refused config
        change) is not a fault of the checkpoint and propagates.
        """
        items = (CONFIG, STATE) + ((DATA,) if data_iterator is not None else ())
        while (steps := self.all_steps()):
            step = steps[-1]
            try:
                state = self._restore_checked(step, items, abstract_state, data_iterator, check_config)
                failure = None
            except UnreadableCheckpoint as err:
                failure = err
            if jax.process_count() > 1:  # every process falls back if any failed (e.g. its own data file)
                failed = multihost_utils.process_allgather(np.int32(failure is not None))
                if failure is None and failed.any():
                    failure = UnreadableCheckpoint(step, "another process", "it could not restore this step")
            if failure is None:
                return step, state
            self._quiet_restore_noise()
            moved = self._move_aside(step)
            older = [s for s in steps if s < step]
            logging.warning("%s; moved it to %s; %s", failure, moved,
                            f"resuming from step {older[-1]}" if older else "no older step: starting from scratch")
        return None, None

    def _restore_checked(self, step, items, abstract_state, data_iterator, check_config) -> Any:
        missing = self.missing_files(step, items)
        if missing is not None:
            raise UnreadableCheckpoint(step, missing[0], f"{missing[1]} is missing")
        try:
            stored = self.restore_config(step)
        except Exception as err:  # noqa: BLE001 -- any failure to read the step is a fault of the step
            raise UnreadableCheckpoint(step, CONFIG, _short_error(err)) from None
        if check_config is not None:
            check_config(step, stored)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(
                abstract_state)}))
        except Exception as err:  # noqa: BLE001
            raise UnreadableCheckpoint(step, STATE, _short_error(err)) from None
        if data_iterator is not None:
            try:
                self.manager.restore(step, args=ocp.args.Composite(
                    **{DATA: iterators.iterator_restore_args(data_iterator)}))
            except Exception as err:  # noqa: BLE001
                raise UnreadableCheckpoint(step, DATA, _short_error(err)) from None
        return restored[STATE]

    def _move_aside(self, step: int) -> epath.Path:
        moved_at = time.strftime('%Y%m%dT%H%M%S', time.gmtime())
        target = self.directory.parent / workdir_files.CHECKPOINTS_UNREADABLE / f"{step}-{moved_at}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"moved aside unreadable checkpoint {step}")
        self.manager.reload()
        return target

    def _quiet_restore_noise(self) -> None:
        """From the first failed restore on, hides the tracebacks its abandoned TensorStore reads print."""
        if not isinstance(sys.unraisablehook, _DropAbandonedRestoreErrors):
            sys.unraisablehook = _DropAbandonedRestoreErrors(sys.unraisablehook)
        asyncio_logger = std_logging.getLogger("asyncio")
        if not any(isinstance(f, _DropUnretrievedFutures) for f in asyncio_logger.filters):
            asyncio_logger.addFilter(_DropUnretrievedFutures())

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(self, step: int, state: Any, *, data_iterator: Any = None, config: ml_collections.ConfigDict | None = None,
             palette: np.ndarray | None = None, force: bool = False) -> bool:
        """Starts saving `step` (asynchronously); returns whether a save was started.

        Raises:
          StorageError: this save, or the one before it still being written, failed (`storage_failure`).
        """
        self.wait()  # the previous save's failure is named with its own step
        self._saving = step
        try:
            return self.manager.save(step, args=self._save_args(state, data_iterator, config, palette), force=force)
        except Exception as err:  # noqa: BLE001 -- any failure to write is named in one line
            raise self.storage_failure(err) from err

    def storage_failure(self, err: BaseException, step: int | None = None, path: str | None = None) -> StorageError:
        """The one-line error of a failed write: the path, the step being saved (default: the save under way) and
        the newest intact checkpoint. A checkpoint save's own failure is remembered, so that closing is quiet."""
        step = self._saving if step is None else step
        self._quiet_restore_noise()  # the failed save's abandoned TensorStore and asyncio work
        try:
            self.manager.reload()
            intact = [s for s in self.all_steps() if s != step]
        except Exception:  # noqa: BLE001 -- the storage is gone: nothing can be said about what is on it
            intact = None
        innermost = _innermost(err)
        if isinstance(innermost, OSError) and innermost.strerror:
            detail = innermost.strerror + (f" (writing {innermost.filename})" if innermost.filename and
                                           str(innermost.filename) != path else "")
        else:
            detail = _short_cause(str(innermost).splitlines()[0] if str(innermost) else type(innermost).__name__)
        newest = ("unknown (the storage could not be listed)" if intact is None else
                  f"step {intact[-1]} (the run resumes from it once the cause is fixed)" if intact else
                  "none (the run starts from scratch once the cause is fixed)")
        failure = StorageError(f"could not save step {step} to {path or self.directory}: {detail}; newest intact "
                               f"checkpoint: {newest}")
        if path is None:
            self._failure = failure
        return failure

    def _save_args(self, state, data_iterator, config, palette) -> ocp.args.Composite:
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA] = iterators.iterator_save_args(data_iterator)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
        if palette is not None:
            items[PALETTE] = ocp.args.JsonSave({"centres": np.asarray(palette, np.float64).tolist()})
        return ocp.args.Composite(**items)

    def restore(self, step: int, abstract_state: Any, *, data_iterator: Any = None) -> Any:
        """Restores the train state at `step` onto the shardings of `abstract_state` (and the iterator in place)."""
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items[DATA] = iterators.iterator_restore_args(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE]

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        restored = self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
        return ml_collections.ConfigDict(restored[CONFIG])

    def restore_palette(self, step: int) -> np.ndarray:
        restored = self.manager.restore(step, args=ocp.args.Composite(**{PALETTE: ocp.args.JsonRestore()}))
        return np.asarray(restored[PALETTE]["centres"], np.float32)

    def wait(self) -> None:
        """Waits for the save under way.

        Raises:
          StorageError: it failed (named once: after that, waiting and closing are quiet).
        """
        if self._failure is not None:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            raise self.storage_failure(err) from err
        self._saving = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 -- after a failed save, closing re-raises it: named already
                if self._failure is None:
                    raise


def resolve_step(ckpt: Checkpointer, step: int) -> int:
    """A named step (>= 0) or the latest (-1) of a run, with an error that says where when there is none.

    Raises:
      MissingSource (a FileNotFoundError): naming the directory and the steps that exist.
    """
    steps = ckpt.all_steps()
    if not steps:
        raise MissingSource(f"no checkpoint in {ckpt.directory}: run the pretraining job with this workdir first")
    if step < 0:
        return steps[-1]
    if step not in steps:
        raise MissingSource(f"checkpoint step {step} is not in {ckpt.directory}; available steps: {steps}")
    return step


def is_primary() -> bool:
    return jax.process_index() == 0
