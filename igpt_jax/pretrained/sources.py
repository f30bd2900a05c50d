"""The one way in for a pretrained model: a pretraining run's checkpoint or a converted model, onto the job's mesh.

The probe, fine-tune, sample and evaluate jobs all start with `load` (or `open_source` + `Source.load` to read
several steps of one run). ``config.checkpoint.source_workdir`` (empty: the job's own workdir) names the source:

  * a pretraining run: ``DIR/checkpoints/<step>`` written by the pretraining job (``config.checkpoint.step``
    picks the step, -1 the latest). Only the parameters are read (an Orbax partial restore), never the optimizer
    state.
  * a converted model: ``DIR/model_config.json`` (our `ModelConfig`), ``DIR/palette.json`` (the colours) and
    ``DIR/params/`` (the parameter tree), written by ``python -m igpt_jax.pretrained.convert`` (e.g. from OpenAI's
    released iGPT-S/M/L); it has no steps.

The rule for settings (one rule, every job):
  * From the SOURCE: the architecture (`ARCHITECTURE_FIELDS`: the ``config.model`` fields whose declared role is
    'architecture': vocabulary, context, width, heads, layers, MLP ratio, objective, BERT mask rate, norm epsilon,
    parameter dtype), the palette, and the data settings that define the tokens it was trained on (`DATA_FIELDS`:
    role 'tokens', ``data.resolution``, ``data.channels``, ``data.n_colors``; a converted model's resolution is
    sqrt(n_ctx), its channels and colours its palette's). Roles are declared in igpt_jax/config/settings.py.
  * From the JOB: how the model is run (`RUNTIME_FIELDS`: every other model field: attention implementation and
    blocks, dtype, remat, scan unroll, dropout), the dataset (name, data_dir, splits, augmentation, ...), batch sizes
    and the mesh.
  * A job value of a source field must equal the source's or be unset (None, or AUTO = 0 for the vocabulary,
    context and the data fields, as the shipped configs leave them): a job needs no overrides of what the source
    says, and a disagreement is a one-line ValueError naming the field, both values and the source.

Parameters are restored directly into the shardings the rules table gives them on the job's mesh
(`igpt_jax.models.layout.param_layout`), so no full copy of a large model ever sits on one device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh

from igpt_jax import sharding
from igpt_jax import workdir as workdir_files
from igpt_jax.config import settings
from igpt_jax.data.palette import Palette
from igpt_jax.errors import ConfigError, MissingSource
from igpt_jax.models.igpt import ModelConfig
from igpt_jax.models.layout import Layout, param_layout
from igpt_jax.training import checkpoint as ckpt_lib

# The rule, read from the declaration of every field (igpt_jax/config/settings.py): model fields whose role is
# 'architecture' define the trained function and come from the source; the others ('runtime': how it is computed;
# 'schedule': dropout, compute dtype) are the job's. Data fields whose role is 'tokens' come from the source.


def source_fields(section: str) -> tuple[str, ...]:
    """The fields of `section` ('model', 'data') that a pretrained model's source decides."""
    return settings.names(section, settings.ARCHITECTURE, settings.TOKENS)


def job_model_fields() -> tuple[str, ...]:
    """The model fields that the job decides (how the source's function is computed)."""
    return settings.names("model", settings.RUNTIME, settings.SCHEDULE)


ARCHITECTURE_FIELDS = source_fields("model")
RUNTIME_FIELDS = job_model_fields()
DATA_FIELDS = source_fields("data")

RUN, CONVERTED = "run", "converted"
# A converted model's files.
CONFIG_FILE, PALETTE_FILE = workdir_files.CONVERTED_CONFIG, workdir_files.CONVERTED_PALETTE
PARAMS_DIR = workdir_files.CONVERTED_PARAMS


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """Where a pretrained model came from."""

    path: str  # the source directory (a run's workdir or a converted model's folder)
    kind: str  # RUN | CONVERTED
    step: int | None  # the run's step; None for a converted model

    def describe(self) -> str:
        return f"step {self.step} of run {self.path}" if self.kind == RUN else f"converted model {self.path}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Pretrained:
    """A pretrained model loaded for a job."""

    model_cfg: ModelConfig  # the source's architecture with the job's runtime settings
    params: Any  # the parameter tree, placed on the mesh by the rules table
    palette: Palette
    data_cfg: ml_collections.ConfigDict  # the job's data config with the source's DATA_FIELDS
    layout: Layout  # the parameters' abstract tree and shardings
    info: SourceInfo
    run_config: ml_collections.ConfigDict | None  # the pretraining run's full config (None for a converted model)
    mesh: Mesh  # where the parameters are
    rules: Any  # the logical-axis rules that placed them

    @property
    def step(self) -> int | None:
        return self.info.step

    @property
    def source(self) -> str:
        return self.info.path


def _is_remote(path: str) -> bool:
    return "://" in path


def _abspath(path: str) -> str:
    return path if _is_remote(path) else os.path.abspath(os.path.expanduser(path))


def _exists(path: str) -> bool:
    if _is_remote(path):
        return epath.Path(path).exists()
    return os.path.exists(path)


def _read_json(path: str) -> Any:
    return json.loads(epath.Path(path).read_text())


def is_converted_model(path: str) -> bool:
    """Whether `path` holds a converted model (its model_config.json)."""
    return _exists(os.path.join(path, CONFIG_FILE))


def _not_a_source(path: str) -> str:
    hf = " (it looks like a Hugging Face folder: convert it first with python -m igpt_jax.pretrained.convert " \
         f"--hf={path} --out=DIR)" if _exists(os.path.join(path, "config.json")) else ""
    return (f"no checkpoint in {ckpt_lib.checkpoint_dir(path)} and no converted model in {path}{hf}: expected a "
            "pretraining run's workdir (checkpoints/<step>) or a folder written by python -m "
            f"igpt_jax.pretrained.convert ({CONFIG_FILE}, {PALETTE_FILE}, {PARAMS_DIR}/)")


class Source:
    """A pretrained model's source, opened read-only: a run's checkpoints or a converted model's folder.

    Raises:
      MissingSource (a FileNotFoundError): `path` is neither (naming the path and what was expected).
    """

    def __init__(self, path: str):
        self.path = _abspath(str(path))
        self._ckpt: ckpt_lib.Checkpointer | None = None
        if is_converted_model(self.path):
            self.kind = CONVERTED
            for name in (PALETTE_FILE, PARAMS_DIR):
                if not _exists(os.path.join(self.path, name)):
                    raise MissingSource(f"converted model {self.path} has no {name}: expected {CONFIG_FILE}, "
                                        f"{PALETTE_FILE} and {PARAMS_DIR}/ (rerun python -m "
                                        "igpt_jax.pretrained.convert)")
        else:
            self.kind = RUN
            if not _exists(str(ckpt_lib.checkpoint_dir(self.path))):
                raise MissingSource(_not_a_source(self.path))
            self._ckpt = ckpt_lib.Checkpointer(self.path, create=False, async_save=False)
            if not self._ckpt.all_steps():
                self.close()
                raise MissingSource(_not_a_source(self.path))

    # ------------------------------------------------------------------ steps
    def steps(self) -> list[int]:
        """A run's saved steps; [] for a converted model."""
        return self._ckpt.all_steps() if self._ckpt else []

    def resolve_step(self, step: int) -> int | None:
        """A run's named step (>= 0) or its latest (-1); None for a converted model (which takes only -1).

        Raises:
          FileNotFoundError: a step the run does not have; ValueError: a step asked of a converted model.
        """
        if self._ckpt is not None:
            return ckpt_lib.resolve_step(self._ckpt, int(step))
        if int(step) != -1:
            raise ConfigError(f"checkpoint.step={step} but {self.path} is a converted model, which has no steps: "
                             "expected checkpoint.step=-1")
        return None

    def where(self, step: int | None) -> str:
        return f"checkpoint {self._ckpt.directory}/{step}" if self._ckpt else f"converted model {self.path}"

    # ------------------------------------------------------------------ what the source says
    def run_config(self, step: int | None) -> ml_collections.ConfigDict | None:
        return self._ckpt.restore_config(step) if self._ckpt else None

    def model_config(self, step: int | None) -> ModelConfig:
        """The source's own model config (its runtime fields as saved)."""
        if self._ckpt is None:
            return ModelConfig.from_config(_read_json(os.path.join(self.path, CONFIG_FILE)))
        run_config = self._ckpt.restore_config(step)
        if "model" not in run_config:
            raise ConfigError(f"{self.where(step)} has no model config: expected a checkpoint of the pretraining job")
        return ModelConfig.from_config(run_config.model)

    def palette(self, step: int | None) -> Palette:
        """The source's palette, checked against its vocabulary.

        Raises:
          ValueError: a palette whose number of colours is not the model's vocabulary (naming the file).
        """
        if self._ckpt is None:
            path = os.path.join(self.path, PALETTE_FILE)
            palette = Palette(np.asarray(_read_json(path)["centres"], np.float32))
        else:
            path = f"{self._ckpt.directory}/{step}/{ckpt_lib.PALETTE}"
            palette = Palette(self._ckpt.restore_palette(step))
        vocab = self.model_config(step).vocab_size
        if palette.k != vocab:
            raise ConfigError(f"the palette in {path} has {palette.k} colours but the model's vocabulary is {vocab}: "
                             "expected one colour per token")
        return palette

    def data_settings(self, step: int | None) -> dict[str, int]:
        """`DATA_FIELDS` the model was trained on: a run's config.data; a converted model's context and palette."""
        if self._ckpt is not None:
            data = self._ckpt.restore_config(step).get("data") or {}
            if all(name in data for name in source_fields("data")):
                return {name: int(data[name]) for name in source_fields("data")}
        model_cfg, palette = self.model_config(step), self.palette(step)
        side = math.isqrt(model_cfg.n_ctx)
        if side * side != model_cfg.n_ctx:
            raise ConfigError(f"{self.where(step)} has a context of {model_cfg.n_ctx} tokens, not a square image: "
                             "expected n_ctx = resolution**2")
        return {"resolution": side, "channels": palette.channels, "n_colors": palette.k}

    # ------------------------------------------------------------------ parameters
    def restore_params(self, step: int | None, layout: Layout) -> Any:
        """Only the parameters, restored into the layout's shardings."""
        try:
            if self._ckpt is None:
                with ocp.StandardCheckpointer() as ckptr:
                    return ckptr.restore(os.path.join(self.path, PARAMS_DIR), layout.abstract)
            item = {"params": layout.abstract}
            restore_args = ocp.checkpoint_utils.construct_restore_args(item)
            restored = self._ckpt.manager.restore(step, args=ocp.args.Composite(**{
                ckpt_lib.STATE: ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)}))
            return restored[ckpt_lib.STATE]["params"]
        except (ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"cannot restore the model parameters of {self.where(step)}: {first}. Expected the "
                             "parameters of the model its config describes") from err

    def settings(self, config: ml_collections.ConfigDict, step: int | None
                 ) -> tuple[ModelConfig, Palette, ml_collections.ConfigDict]:
        """(model config, palette, data config) of `step` (resolved) under the job's `config`; no parameters read."""
        where = self.where(step)
        model_cfg = model_config_for_job(config.get("model"), self.model_config(step), where=where)
        palette = self.palette(step)
        data_cfg = data_config_for_job(config.get("data"), self.data_settings(step), model_cfg, where=where)
        return model_cfg, palette, data_cfg

    def load(self, config: ml_collections.ConfigDict, mesh: Mesh, rules, *, step: int | None = None,
             layout: Layout | None = None) -> Pretrained:
        """The model at `step` (default ``config.checkpoint.step``) under the job's `config`, on `mesh`."""
        step = self.resolve_step(int(config.checkpoint.step if step is None else step))
        model_cfg, palette, data_cfg = self.settings(config, step)
        layout = layout or param_layout(model_cfg, mesh, rules)
        params = self.restore_params(step, layout)
        info = SourceInfo(path=self.path, kind=self.kind, step=step)
        logging.info("loaded %s: %d layers, width %d, context %d, vocabulary %d, objective %s", info.describe(),
                     model_cfg.n_layer, model_cfg.d_model, model_cfg.n_ctx, model_cfg.vocab_size, model_cfg.objective)
        return Pretrained(model_cfg=model_cfg, params=params, palette=palette, data_cfg=data_cfg, layout=layout,
                          info=info, run_config=self.run_config(step), mesh=mesh, rules=rules)

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()
            self._ckpt = None

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def source_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """``config.checkpoint.source_workdir``, or the job's own workdir when that is empty."""
    return str(config.checkpoint.source_workdir or workdir)


def open_source(config: ml_collections.ConfigDict, workdir: str) -> Source:
    """The `Source` of ``config.checkpoint.source_workdir`` (empty: the job's workdir)."""
    return Source(source_path(config, workdir))


def load(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, rules, *, step: int | None = None
         ) -> Pretrained:
    """Loads the job's pretrained model (see the module docstring for which settings come from where).

    Args:
      config: the job's config (``checkpoint.source_workdir``, ``checkpoint.step``, ``model``, ``data``).
      workdir: the job's workdir (the source when ``checkpoint.source_workdir`` is empty).
      mesh, rules: where the parameters go.
      step: the run's step (default ``config.checkpoint.step``; -1 = latest).

    Raises:
      FileNotFoundError: no run or converted model at the source path, or no such step.
      ValueError: the job's config disagrees with the source, or the source is inconsistent (one line each).
    """
    with open_source(config, workdir) as source:
        return source.load(config, mesh, rules, step=step)


def load_on_mesh(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> Pretrained:
    """`load` onto the job's mesh (``config.mesh.shape`` over `devices`, default all) and rules."""
    rules = sharding.rules_from_config(config.mesh.rules)
    mesh = sharding.make_mesh(config.mesh.shape, devices)
    return load(config, workdir, mesh, rules)


# ---------------------------------------------------------------------------------------------------- the rule


def _items(cfg: Any, section: str) -> dict[str, Any]:
    """The fields of a config section ('model', 'data') that the job sets: None, and AUTO in a source field, are
    unset."""
    if cfg is None:
        return {}
    items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    return {k: v for k, v in items.items()
            if not (v is None or (k in source_fields(section) and settings.is_auto(f"{section}.{k}", v)))}


def model_config_for_job(job_model: Any, source_model: ModelConfig, *, where: str) -> ModelConfig:
    """The source's architecture run with the job's runtime settings.

    Raises:
      ValueError: the job sets an architecture field (not None) to another value than the source's; one line naming
        each such field, both values and the source.
    """
    job = _items(job_model, "model")
    diffs = [f"model.{name}={job[name]!r} but the source has {getattr(source_model, name)!r}" for name in
             source_fields("model") if job.get(name) is not None and job[name] != getattr(source_model, name)]
    if diffs:
        raise ConfigError(f"the job's config disagrees with {where}: " + "; ".join(diffs)
                         + " (architecture comes from the source: leave these unset or equal to it)")
    runtime = {name: job[name] for name in job_model_fields() if job.get(name) is not None}
    return source_model.replace(**runtime)


def data_config_for_job(job_data: Any, source_data: dict[str, int], model_cfg: ModelConfig, *, where: str
                        ) -> ml_collections.ConfigDict:
    """The job's data config with the source's `DATA_FIELDS`.

    Raises:
      ValueError: a job resolution whose tokens exceed the model's context, or a job value of a `DATA_FIELDS`
        field (not None) that differs from the source's; one line naming both values and the source.
    """
    job = _items(job_data, "data")
    data_cfg = ml_collections.ConfigDict(job_data.to_dict() if hasattr(job_data, "to_dict") else job)
    res = job.get("resolution")
    if res is not None and int(res) ** 2 > model_cfg.n_ctx:
        largest = math.isqrt(model_cfg.n_ctx)
        raise ConfigError(f"data.resolution={res} gives {int(res) ** 2} tokens per image, more than the context "
                         f"n_ctx={model_cfg.n_ctx} of {where}: expected data.resolution <= {largest}")
    diffs = [f"data.{name}={job[name]!r} but the source was trained with {source_data[name]!r}"
             for name in source_fields("data") if job.get(name) is not None and int(job[name]) != source_data[name]]
    if diffs:
        raise ConfigError(f"the job's config disagrees with {where}: " + "; ".join(diffs)
                         + " (these come from the source: leave them unset or equal to it)")
    for name in source_fields("data"):
        data_cfg[name] = source_data[name]
    return data_cfg
