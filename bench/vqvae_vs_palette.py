"""Reconstruction error on CIFAR-10's test split: a trained VQ-VAE (16x16 codes) vs the 512-colour palette at 16x16.

    python bench/vqvae_vs_palette.py --vqvae_workdir=workdirs/vqvae_cifar10 --data_dir=DIR

Errors are mean squared errors over pixels and channels, in [-1, 1] units and in grey levels (uint8) after
rounding the reconstruction to uint8, as `Palette.reconstruction_error(..., units='uint8')` does:
  * palette vs its own input: the 16x16 (area-resized) test image against its palette colours (what
    configs/cifar10_cpu.py's tokens lose relative to the 16x16 image);
  * palette vs the 32x32 image: the palette colours of the 16x16 image, each repeated over its 2x2 block, against
    the original 32x32 image (what the palette tokens lose relative to the image the VQ-VAE encodes);
  * VQ-VAE: decode(encode(32x32 image)) against the 32x32 image (the vqvae job's test figure, recomputed).
Prints one JSON object.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
from absl import app, flags

from igpt_jax.data import iterators, palette_cache
from igpt_jax.pretrained import vqvae as vqvae_run
from igpt_jax.training import checkpoint as ckpt_lib

_WORKDIR = flags.DEFINE_string("vqvae_workdir", None, "Workdir of a finished vqvae job.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir holding cifar10 (and its 16x16 palette).")


def _test_images(data_cfg, resolution: int) -> np.ndarray:
    cfg = data_cfg.copy_and_resolve_references()
    cfg.resolution, cfg.tokens = resolution, "raw"
    it = iterators.make_iterator(cfg, "test", batch_size=500, train=False, shard_index=0, shard_count=1)
    return np.concatenate([vqvae_run.to_uint8(b["image"][b["mask"]]) for b in it])  # uint8 [n, r, r, 3]


def main(argv):
    del argv
    ckpt = ckpt_lib.Checkpointer(_WORKDIR.value, create=False)
    config = ckpt.restore_config(ckpt_lib.resolve_step(ckpt, -1))
    ckpt.close()
    if _DATA_DIR.value:
        config.vqvae.data.data_dir = _DATA_DIR.value
    config.checkpoint.source_workdir = _WORKDIR.value
    config.checkpoint.step = -1
    data_cfg = config.vqvae.data
    full = _test_images(data_cfg, 32)
    small = _test_images(data_cfg, 16)
    pal_cfg = data_cfg.copy_and_resolve_references()
    pal_cfg.resolution, pal_cfg.n_colors, pal_cfg.tokens = 16, 512, "palette"
    palette = palette_cache.load_or_fit_palette(pal_cfg)
    own = palette.reconstruction_error(small, units="uint8")
    decoded = palette.decode(palette.encode_lut(small)).repeat(2, axis=1).repeat(2, axis=2)  # [n, 32, 32, 3]
    vs_full = float(np.mean(np.square(full.astype(np.float64) - decoded)))

    trained = vqvae_run.load(_WORKDIR.value, -1, config)
    step = trained.step
    test = vqvae_run.evaluate_split(trained.cfg, trained.params, trained.embeddings,
                                    vqvae_run.source_data_config(config), "test", batch_size=500)
    out = {
        "images": int(len(full)),
        "palette_16x16_vs_16x16": {"mse_grey_levels": own, "rmse_grey_levels": math.sqrt(own),
                                   "mse": palette.reconstruction_error(small)},
        "palette_16x16_vs_32x32": {"mse_grey_levels": vs_full, "rmse_grey_levels": math.sqrt(vs_full)},
        "vqvae_16x16_codes_vs_32x32": {"step": step, "mse": test["mse"], "mse_grey_levels": test["mse_grey_levels"],
                                       "rmse_grey_levels": test["rmse_grey_levels"], "codes_used": test["codes_used"],
                                       "perplexity": test["perplexity"], "vocab_size": test["vocab_size"]},
        "devices": str(jax.devices()[0]),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    app.run(main)
