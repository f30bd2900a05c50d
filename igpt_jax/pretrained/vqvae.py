"""A VQ-VAE run's pieces that several jobs share: its config from a job config, its state and optimizer, the one way
to load a trained one (`load`, or `TrainedVQVAE.from_state` for a state in memory), encoding and decoding with it
(the vqvae job trains it, tokenize encodes with it, sample decodes codes with it)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from igpt_jax import sharding
from igpt_jax.config import settings
from igpt_jax.data import codes as codes_lib
from igpt_jax.data import iterators
from igpt_jax.errors import ConfigError
from igpt_jax.models import vqvae as vq
from igpt_jax.training import checkpoint as ckpt_lib


def source_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The image dataset the VQ-VAE reads (``config.vqvae.data``) with ``tokens='raw'``."""
    data_cfg = ml_collections.ConfigDict(config.vqvae.data.to_dict())
    data_cfg.tokens = "raw"
    return data_cfg


def model_config(config: ml_collections.ConfigDict) -> vq.VQVAEConfig:
    """`VQVAEConfig` of ``config.vqvae``, checked against the data (channels, divisible resolution)."""
    cfg = vq.VQVAEConfig.from_config({**config.vqvae.to_dict(), "channels": config.vqvae.data.channels})
    cfg.grid(int(config.vqvae.data.resolution))  # raises for a resolution the encoder cannot divide
    return cfg


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam at ``config.vqvae.lr``: the VQ-VAE's optimizer, for training and for the state a checkpoint holds."""
    return optax.adam(float(config.vqvae.lr))


def create_state(cfg: vq.VQVAEConfig, tx: optax.GradientTransformation, resolution: int, key: jax.Array,
                 data_variance: jax.Array) -> dict[str, Any]:
    """params, Adam state, codebook (EMA statistics), step and the data variance the loss divides by."""
    params_key, codebook_key = jax.random.split(key)
    params = vq.init_params(cfg, params_key, resolution)
    return {"params": params, "opt_state": tx.init(params), "codebook": vq.init_codebook(cfg, codebook_key),
            "step": jnp.zeros((), jnp.int32), "data_variance": jnp.asarray(data_variance, jnp.float32)}


def abstract_state(cfg: vq.VQVAEConfig, tx: optax.GradientTransformation, resolution: int, mesh) -> Any:
    """The state's shapes with replicated shardings (for restoring)."""
    shapes = jax.eval_shape(lambda: create_state(cfg, tx, resolution, jax.random.key(0), 1.0))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)


def reconstruct_fn(cfg: vq.VQVAEConfig):
    """jitted (params, embeddings, images) -> (codes [b, g, g], reconstructions [b, R, R, C])."""
    model = vq.VQVAE(cfg)

    @jax.jit
    def fn(params, embeddings, images):
        z = model.apply({"params": params}, images, method=vq.VQVAE.encode)
        codes, zq = vq.quantize(z, embeddings)
        return codes, model.apply({"params": params}, zq, method=vq.VQVAE.decode)

    return fn


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8, as the palette decodes its centres (rint(127.5 (x + 1)))."""
    return np.clip(np.rint(127.5 * (np.asarray(images, np.float64) + 1.0)), 0, 255).astype(np.uint8)


def evaluate_split(cfg: vq.VQVAEConfig, params, embeddings, data_cfg, split: str, *, batch_size: int,
                   grid_images: int = 0) -> dict[str, Any]:
    """Reconstruction MSE over a whole split ([-1, 1] units, and grey levels^2 after rounding to uint8, as the
    palette's error), the codes' usage, and the first `grid_images` originals and reconstructions (uint8)."""
    fn = reconstruct_fn(cfg)
    it = iterators.make_iterator(data_cfg, split, batch_size=batch_size, train=False, seed=0,
                                 shard_index=0, shard_count=1)
    sq_sum, sq8_sum, values, counts = 0.0, 0.0, 0, np.zeros(cfg.vocab_size, np.int64)
    originals, recons = [], []
    for batch in it:
        mask = batch["mask"]
        codes, recon = jax.device_get(fn(params, embeddings, batch["image"]))
        images, recon = batch["image"][mask], np.clip(recon[mask], -1.0, 1.0)
        sq_sum += float(np.sum(np.square(recon.astype(np.float64) - images)))
        sq8_sum += float(np.sum(np.square(to_uint8(recon).astype(np.float64) - to_uint8(images))))
        values += images.size
        counts += np.bincount(codes[mask].reshape(-1), minlength=cfg.vocab_size)
        if sum(len(o) for o in originals) < grid_images:
            originals.append(to_uint8(images))
            recons.append(to_uint8(recon))
    probs = counts / max(1, counts.sum())
    nz = probs[probs > 0]
    result = {"split": split, "mse": sq_sum / max(1, values), "mse_grey_levels": sq8_sum / max(1, values),
              "rmse_grey_levels": math.sqrt(sq8_sum / max(1, values)), "codes_used": int(np.sum(counts > 0)),
              "vocab_size": cfg.vocab_size, "perplexity": float(np.exp(-np.sum(nz * np.log(nz))))}
    if grid_images:
        result["originals"] = np.concatenate(originals)[:grid_images]
        result["reconstructions"] = np.concatenate(recons)[:grid_images]
    return result


def check_checkpoint_codebook(ckpt: ckpt_lib.Checkpointer, step: int, vq_cfg: vq.VQVAEConfig, *,
                              stored: ml_collections.ConfigDict | None = None) -> None:
    """The checkpoint's VQ-VAE must be the config's (`stored`: the step's config, when already read).

    Raises:
      ConfigError: naming the setting, the checkpoint's value and the config's.
    """
    saved = (ckpt.restore_config(step) if stored is None else stored).get("vqvae", {})
    for key in settings.names("vqvae", settings.ARCHITECTURE):  # codebook size and blocks
        if key in saved and int(saved[key]) != int(getattr(vq_cfg, key)):
            raise ConfigError(f"VQ-VAE checkpoint {ckpt.directory}/{step} has vqvae.{key}={saved[key]} but the config "
                             f"says vqvae.{key}={getattr(vq_cfg, key)}")


@dataclasses.dataclass(frozen=True)
class TrainedVQVAE:
    """A trained VQ-VAE on the host: what encoding and decoding need, and where it came from.

    Attributes:
      cfg: its architecture.
      params: the encoder's and decoder's parameters (host arrays).
      embeddings: the codebook, float [vocab_size, width] (host array).
      step: the training step it was saved or taken at.
      directory: the checkpoint directory it was restored from ('' for a state in memory).
    """

    cfg: vq.VQVAEConfig
    params: Any
    embeddings: Any
    step: int
    directory: str = ""

    @classmethod
    def from_state(cls, cfg: vq.VQVAEConfig, state: dict[str, Any], *, step: int | None = None,
                   directory: str = "") -> TrainedVQVAE:
        """The VQ-VAE of a training state (`create_state`'s structure; `step` defaults to the state's own)."""
        step = int(jax.device_get(state["step"])) if step is None else int(step)
        return cls(cfg, jax.device_get(state["params"]), jax.device_get(state["codebook"].embeddings), step,
                   directory)


def load(workdir: str, step: int = -1, config: ml_collections.ConfigDict | None = None) -> TrainedVQVAE:
    """The VQ-VAE that a vqvae run saved in `workdir` at `step` (-1: the latest), restored onto one device.

    Args:
      workdir: the vqvae run's workdir.
      step: the checkpoint step, or -1 for the latest.
      config: a job config whose ``vqvae`` settings the checkpoint must match (the tokenize job's); None: the
        checkpoint's own config (the VQ-VAE named by a codes dataset).

    Raises:
      MissingSource: no checkpoint, or no such step, in `workdir`.
      ConfigError: the checkpoint's codebook or architecture is not `config`'s.
      ValueError: the restored codebook's size is not the config's vocabulary.
    """
    ckpt = ckpt_lib.Checkpointer(workdir, create=False)
    try:
        step = ckpt_lib.resolve_step(ckpt, int(step))
        stored = ckpt.restore_config(step)
        config = stored if config is None else config
        vq_cfg = model_config(config)
        check_checkpoint_codebook(ckpt, step, vq_cfg, stored=stored)
        mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
        state = ckpt.restore(step, abstract_state(vq_cfg, make_optimizer(config), int(config.vqvae.data.resolution),
                                                  mesh))
        trained = TrainedVQVAE.from_state(vq_cfg, state, step=step, directory=str(ckpt.directory))
    finally:
        ckpt.close()
    if trained.embeddings.shape[0] != vq_cfg.vocab_size:
        raise ValueError(f"VQ-VAE checkpoint {trained.directory}/{step} has a codebook of "
                         f"{trained.embeddings.shape[0]} codes but vqvae.vocab_size={vq_cfg.vocab_size}")
    return trained


class CodeDecoder:
    """Decodes code grids to images through a trained VQ-VAE's decoder; `decode` has the palette's signature, so
    the sample job's panels can use it in place of the palette (data.tokens='codes')."""

    def __init__(self, vq_cfg: vq.VQVAEConfig, params: Any, embeddings: Any):
        self.cfg, self.params, self.embeddings = vq_cfg, params, jnp.asarray(embeddings)
        model = vq.VQVAE(vq_cfg)
        self._decode = jax.jit(lambda p, e, ids: model.apply({"params": p}, e[ids], method=vq.VQVAE.decode))

    @classmethod
    def from_codes_dataset(cls, data_cfg: ml_collections.ConfigDict) -> CodeDecoder:
        """The VQ-VAE named in a codes dataset's metadata (the tokenize job's), at the step that wrote it."""
        meta = codes_lib.check_codes_dataset(data_cfg)
        trained = load(str(epath.Path(meta["vqvae_checkpoint"]).parent), int(meta["vqvae_step"]))
        return cls(trained.cfg, trained.params, trained.embeddings)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """int [..., g, g] -> uint8 [..., g*f, g*f, C]."""
        ids = np.asarray(ids)
        flat = ids.reshape(-1, *ids.shape[-2:])
        images = to_uint8(jax.device_get(self._decode(self.params, self.embeddings, jnp.asarray(flat, jnp.int32))))
        return images.reshape(*ids.shape[:-2], *images.shape[1:])
