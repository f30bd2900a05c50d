r"""Our palette encoding against the Hugging Face `ImageGPTImageProcessor` on real CIFAR-10 images.

For each of ``--seeds`` sets of 512 random clusters (uniform in [-1, 1]^3), the first ``--images`` CIFAR-10
training images (32x32, so the processor's resize to 32x32 changes nothing) are tokenized by the processor
(``input_ids``) and by `igpt_jax.data.palette.Palette` (`encode` and the input pipeline's `encode_lut`); the script prints
how many pixels get a different token. Differences come only from near-ties: the processor computes
``|x|^2 - 2 x.c + |c|^2`` in float32, we sum ``(x - c)^2`` per channel.

Example:
  python bench/palette_vs_hf.py                     # 2,000 images, 3 cluster sets
"""

from __future__ import annotations

import argparse

import numpy as np
from transformers import ImageGPTImageProcessor

from igpt_jax.data.auto_import import SHARED_DATA
from igpt_jax.data.palette import Palette


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    with np.load(SHARED_DATA / "cifar10.npz") as z:
        images = z["x_train"][:args.images]
    for seed in range(args.seeds):
        clusters = np.random.default_rng(seed).uniform(-1, 1, (512, 3)).astype(np.float32)
        processor = ImageGPTImageProcessor(clusters=clusters, size={"height": 32, "width": 32})
        theirs = np.asarray(processor(images=list(images), return_tensors="np")["input_ids"])
        palette = Palette(clusters)
        ours = np.asarray(palette.encode(images)).reshape(len(images), -1)
        lut = np.asarray(palette.encode_lut(images)).reshape(len(images), -1)
        print(f"clusters seed {seed}: {int((theirs != ours).sum())} (encode) / {int((theirs != lut).sum())} "
              f"(lookup table) of {theirs.size:,} pixels differ", flush=True)


if __name__ == "__main__":
    main()
