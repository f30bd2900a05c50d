"""The sample job: images from a pretrained model (a run's checkpoint or a converted model), with a key/value cache.

Commands (``--workdir`` receives the outputs; the checkpoint comes from ``config.checkpoint.source_workdir``, or
from the workdir itself when that is empty; ``config.checkpoint.step`` -1 = the latest):
  # completions of the first 8 test images from their top half, 4 samples each -> completions.png
  python -m igpt_jax.main --config=configs/demo.py --config.job=sample --workdir=workdirs/demo_samples \
      --config.checkpoint.source_workdir=workdirs/demo
  # 16 unconditional samples from the SOS token, greedy -> samples.png
  python -m igpt_jax.main --config=configs/demo.py --config.job=sample --workdir=workdirs/demo_samples \
      --config.checkpoint.source_workdir=workdirs/demo --config.sample.mode=unconditional \
      --config.sample.temperature=0

Settings (``config.sample``): mode ('complete' | 'unconditional'), num_samples, split, num_images, given_rows
(-1 = half), samples_per_image, temperature (0 = greedy), top_k (0 = off), seed, batch_size.

Outputs in the workdir (process 0):
  complete:      completions.png (one row per image: the original, the given rows with the rest grey, then the
                 samples), completions.npy int32 [num_images, samples_per_image, res*res], originals.npy int32
                 [num_images, res*res], sample_info.json.
  unconditional: samples.png (a square-ish grid), samples.npy int32 [num_samples, res*res], sample_info.json.

Generation is `igpt_jax.models.decoding.generate` jitted on the job's mesh (batch over the data axes): one prefill
of the given rows, then a `lax.fori_loop` of one-token cached steps. Batch i of the job uses the key
``fold_in(key(seed), i)``, so the same seed and batch size give the same images.

`write_completion_grid(config, workdir)` runs the 'complete' mode for a pretraining run's own workdir (the demo
calls it after pretraining).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from igpt_jax import sharding
from igpt_jax import workdir as workdir_files
from igpt_jax.data import iterators, records
from igpt_jax.models import decoding
from igpt_jax.pretrained.sources import Pretrained, load_on_mesh
from igpt_jax.pretrained.vqvae import CodeDecoder
from igpt_jax.reports import images
from igpt_jax.workdir import workpath_of

MODES = ("complete", "unconditional")


def resolve_given_rows(given_rows: int, resolution: int, n_ctx: int) -> int:
    """``sample.given_rows`` (-1 = the top half) checked against the image and the model's context.

    Raises:
      ValueError: naming the setting, when the prefix has more rows than the image or more tokens than n_ctx.
    """
    rows = resolution // 2 if int(given_rows) == -1 else int(given_rows)
    if rows < 0:
        raise ValueError(f"sample.given_rows={given_rows} must be -1 (half) or a number of rows >= 0")
    if rows * resolution > n_ctx:
        raise ValueError(f"sample.given_rows={rows} gives a prefix of {rows * resolution} tokens, longer than the "
                         f"model's context n_ctx={n_ctx}")
    if rows > resolution:
        raise ValueError(f"sample.given_rows={rows} is more than the {resolution} rows of an image")
    return rows


def check_sample_config(sample_cfg: ml_collections.ConfigDict, loaded: Pretrained) -> None:
    """Fails fast, naming the setting, before anything is read or compiled."""
    if sample_cfg.mode not in MODES:
        raise ValueError(f"sample.mode={sample_cfg.mode!r}, expected one of {MODES}")
    decoding.check_sampling_args(loaded.model_cfg, prefix_length=0, length=loaded.data_cfg.resolution**2,
                                 temperature=float(sample_cfg.temperature), top_k=int(sample_cfg.top_k))
    for name in ("batch_size",) + (("num_samples",) if sample_cfg.mode == "unconditional"
                                   else ("num_images", "samples_per_image")):
        if int(sample_cfg[name]) < 1:
            raise ValueError(f"sample.{name}={sample_cfg[name]} must be >= 1")
    if sample_cfg.mode == "complete":
        if sample_cfg.split not in records.SPLITS:
            raise ValueError(f"sample.split={sample_cfg.split!r}, expected one of {records.SPLITS}")
        resolve_given_rows(sample_cfg.given_rows, loaded.data_cfg.resolution, loaded.model_cfg.n_ctx)


def first_images(loaded: Pretrained, split: str, num_images: int) -> np.ndarray:
    """Tokens of the first `num_images` images of a split (every process reads the same ones); int32 [n, res*res]."""
    it = iterators.make_iterator(loaded.data_cfg, split, batch_size=min(num_images, 64), train=False, seed=0,
                                 shard_index=0, shard_count=1, palette=loaded.palette)
    found = []
    for batch in it:
        found.append(np.asarray(batch["tokens"])[np.asarray(batch["mask"], bool)])
        if sum(len(f) for f in found) >= num_images:
            break
    tokens = np.concatenate(found)[:num_images].astype(np.int32)
    if len(tokens) < num_images:
        logging.warning("split %r has only %d images; completing those", split, len(tokens))
    return tokens


def _global(array: np.ndarray, named_sharding) -> jax.Array:
    """A host array that every process holds in full -> a global array on `named_sharding`."""
    return jax.make_array_from_callback(array.shape, named_sharding, lambda index: array[index])


def _fetch(array: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


def generate_rows(loaded: Pretrained, prefixes: np.ndarray, sample_cfg: ml_collections.ConfigDict
                  ) -> tuple[np.ndarray, dict[str, float]]:
    """Completes every row of int32 `prefixes` [rows, t] to the image length, `sample_cfg.batch_size` at a time.

    Returns:
      (int32 [rows, res*res], timing {'seconds', 'tokens_per_s', 'batch_size'}).
    """
    model_cfg, mesh, rules = loaded.model_cfg, loaded.mesh, loaded.rules
    length = loaded.data_cfg.resolution**2
    rows, t = prefixes.shape
    dp = sharding.data_parallel_size(mesh, rules)
    batch = min(int(sample_cfg.batch_size), rows)
    batch = max(dp, math.ceil(batch / dp) * dp)  # whole rows per data-parallel shard
    padded = math.ceil(rows / batch) * batch
    prefixes = np.concatenate([prefixes, np.repeat(prefixes[:1], padded - rows, axis=0)]) if padded > rows else prefixes
    fn = decoding.make_generate_fn(model_cfg, mesh, rules, loaded.layout.shardings, length=length,
                                   temperature=float(sample_cfg.temperature), top_k=int(sample_cfg.top_k))
    batch_sharding = sharding.batch_sharding(mesh, rules)
    base = jax.random.key(int(sample_cfg.seed))
    out = []
    start = time.perf_counter()
    for i in range(padded // batch):
        prefix = _global(np.ascontiguousarray(prefixes[i * batch:(i + 1) * batch]), batch_sharding)
        out.append(_fetch(fn(loaded.params, prefix, jax.random.fold_in(base, i))))
    seconds = time.perf_counter() - start
    tokens = np.concatenate(out)[:rows]
    new_tokens = padded * (length - t)
    return tokens, {"seconds": seconds, "tokens_per_s": new_tokens / max(seconds, 1e-9), "batch_size": batch}


def sample_and_save(loaded: Pretrained, sample_cfg: ml_collections.ConfigDict, workdir: str, *,
                    scale: int | None = None) -> dict[str, Any]:
    """Runs the configured mode and writes the grid, the token arrays and sample_info.json to `workdir`."""
    check_sample_config(sample_cfg, loaded)
    res = int(loaded.data_cfg.resolution)
    decoder, factor = _panel_decoder(loaded)
    scale = images.default_scale(res * factor) if scale is None else int(scale)
    workpath = workpath_of(workdir)
    info: dict[str, Any] = {
        "mode": sample_cfg.mode, "source": loaded.source, "step": loaded.step, "dataset": str(loaded.data_cfg.name),
        "resolution": res, "temperature": float(sample_cfg.temperature), "top_k": int(sample_cfg.top_k),
        "seed": int(sample_cfg.seed),
    }
    if sample_cfg.mode == "complete":
        result, panels, files, timing = _complete(loaded, sample_cfg, decoder, factor, workpath, info)
    else:
        result, panels, files, timing = _unconditional(loaded, sample_cfg, decoder, workpath, info)
    grid = images.image_grid(panels, scale=scale)
    info.update(timing, grid_shape=list(grid.shape), files={k: str(v) for k, v in files.items()})
    if jax.process_index() == 0:
        images.save_png(files["grid"], grid)
        (workpath / workdir_files.SAMPLE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    print(f"Sampling ({sample_cfg.mode}): wrote {files['grid']} ({grid.shape[1]}x{grid.shape[0]} pixels) and "
          f"{files['tokens']}; {timing['tokens_per_s']:,.0f} tokens/s (batch {timing['batch_size']}, "
          f"{timing['seconds']:.1f}s including compilation). {loaded.info.describe().capitalize()}.", flush=True)
    result.update(info=info, grid=grid, files=files)
    return result


def _panel_decoder(loaded: Pretrained) -> tuple[Any, int]:
    """What turns tokens into pixels for the grid, and how many image rows one token row is.

    Palette tokens are decoded by the palette; codes (``data.tokens='codes'``) by the VQ-VAE that wrote them, one
    code row being ``factor`` image rows.
    """
    if records.tokens_kind(loaded.data_cfg) == "codes":
        decoder = CodeDecoder.from_codes_dataset(loaded.data_cfg)
        return decoder, decoder.cfg.factor
    return loaded.palette, 1


def _complete(loaded: Pretrained, sample_cfg: ml_collections.ConfigDict, decoder: Any, factor: int,
              workpath: epath.Path, info: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray, dict, dict]:
    """Completions of the split's first images from their given rows; writes their tokens, adds to `info`.

    Returns:
      (result, grid panels, output files, timing).
    """
    res = int(loaded.data_cfg.resolution)
    given = resolve_given_rows(sample_cfg.given_rows, res, loaded.model_cfg.n_ctx)
    originals = first_images(loaded, str(sample_cfg.split), int(sample_cfg.num_images))
    per_image = int(sample_cfg.samples_per_image)
    prefixes = np.repeat(originals[:, :given * res], per_image, axis=0)  # [n * S, given * res]
    tokens, timing = generate_rows(loaded, prefixes, sample_cfg)
    samples = tokens.reshape(len(originals), per_image, res * res)
    panels = images.completion_panels(decoder, originals, samples, resolution=res, given_rows=given * factor)
    info.update(split=str(sample_cfg.split), images=len(originals), given_rows=given, samples_per_image=per_image)
    files = {"grid": workpath / workdir_files.COMPLETIONS_GRID, "tokens": workpath / workdir_files.COMPLETIONS,
             "originals": workpath / workdir_files.ORIGINALS}
    if jax.process_index() == 0:
        images.save_npy(files["tokens"], samples)
        images.save_npy(files["originals"], originals)
    return {"samples": samples, "originals": originals}, panels, files, timing


def _unconditional(loaded: Pretrained, sample_cfg: ml_collections.ConfigDict, decoder: Any, workpath: epath.Path,
                   info: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray, dict, dict]:
    """Samples from the start token alone; writes their tokens, adds to `info`.

    Returns:
      (result, grid panels, output files, timing).
    """
    n = int(sample_cfg.num_samples)
    tokens, timing = generate_rows(loaded, np.zeros((n, 0), np.int32), sample_cfg)
    panels = images.sample_panels(decoder, tokens, resolution=int(loaded.data_cfg.resolution))
    info.update(num_samples=n)
    files = {"grid": workpath / workdir_files.SAMPLES_GRID, "tokens": workpath / workdir_files.SAMPLES}
    if jax.process_index() == 0:
        images.save_npy(files["tokens"], tokens)
    return {"samples": tokens}, panels, files, timing


def run(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict[str, Any]:
    """The 'sample' job: restore the checkpoint, generate, write the grid and the tokens to `workdir`."""
    loaded = load_on_mesh(config, workdir, devices=devices)
    return sample_and_save(loaded, config.sample, workdir)


def write_completion_grid(config: ml_collections.ConfigDict, workdir: str, *, num_images: int | None = None,
                          samples_per_image: int | None = None, devices=None) -> dict[str, Any]:
    """Completions of a pretraining run's own checkpoint, written into its workdir (the demo's last step).

    Uses ``config.sample`` with mode 'complete' (``num_images`` and ``samples_per_image`` override it), the latest
    checkpoint of ``config.checkpoint.source_workdir`` or else `workdir`, and writes completions.png,
    completions.npy and originals.npy to `workdir`.
    """
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy; the caller's config is left alone
    config.sample.mode = "complete"
    if num_images is not None:
        config.sample.num_images = int(num_images)
    if samples_per_image is not None:
        config.sample.samples_per_image = int(samples_per_image)
    return run(config, workdir, devices=devices)
