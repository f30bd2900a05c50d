"""iGPT-L on VQ-VAE codes of ImageNet (paper 3.2, 4.4, A.2): IR 192x192x3 -> 48x48 codes from 4,096, on a pod.

The paper's best ImageNet linear probe (69.0 %, 11 concatenated layers; 65.3 % best single layer) comes from iGPT-L
pretrained on the 48x48 code grids of a small VQ-VAE: two encoder blocks (4x4 stride-2 convolutions, ReLU, a
residual stack of 32 hidden units; 64 channels) compress 192x192x3 images 4x per side; the codebook has 4,096 codes
of 64 dimensions, updated by EMA with dead-code revival (`:ir=96` uses one block, 96x96 -> 48x48). One command runs
the VQ-VAE job, then (`config.then`) tokenize (a TFDS dataset `imagenet2012_vq48_k4096` of code grids), pretraining
on the codes (2,304 tokens per image, vocabulary 4,096, lr 0.01 as the paper's iGPT-L at 48x48) and the probe.

Command:   python -m igpt_jax.main --config=configs/vqvae_imagenet.py:pod=v4-1024 --workdir=gs://BUCKET/vq_l
Fits?      python -m igpt_jax.main --config=configs/vqvae_imagenet.py:pod=v4-1024 --config.job=compile \
           "--config.then=()" --workdir=/tmp/c
Hardware:  a Cloud TPU slice, `:pod=TYPE` as configs/igpt_l.py (default v4-1024, mesh (1, 128, 4)); the
           pretraining step on codes compiles and fits (bench/RESULTS.md "VQ-VAE"). The VQ-VAE (219,715
           parameters outside the codebook: two blocks, each with its residual stack; the paper says fewer than
           200K) trains data-parallel on the same mesh, its parameters replicated.
Time:      not run here; the paper's iGPT-L pretraining is 1M steps of batch 128 (about 2500 V100-days).
Result:    not measured here (no ImageNet on this machine). Paper: linear probe 65.3 % best layer, 69.0 % with 11
           concatenated layers (Table 2).
"""

import importlib.util
import os

from igpt_jax.config import defaults as config_defaults


def _igpt_l():
    """configs/igpt_l.py (configs/ is a folder of files, not a package)."""
    spec = importlib.util.spec_from_file_location("igpt_l", os.path.join(os.path.dirname(__file__), "igpt_l.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    args = config_defaults.parse_arg(arg, pod="v4-1024", ir=192, vocab=4096)
    config = _igpt_l().get_config(f"res=48,pod={args.pod}")
    if args.ir not in (96, 192):
        raise ValueError(f"ir={args.ir}: the paper's VQ-VAEs take 96 (one block) or 192 (two blocks) to 48x48")
    config.vqvae.data = config_defaults.default_data_config("imagenet2012")
    config.vqvae.data.resolution = args.ir
    config.vqvae.data.data_dir = config.data.get_ref("data_dir")
    config.vqvae.downsample = 1 if args.ir == 96 else 2
    config.vqvae.vocab_size = args.vocab
    config.vqvae.batch_size = 128  # paper A.2: expected usage 128 x 48^2 / 4096 = 72
    config.vqvae.num_steps = 100_000
    config.vqvae.log_every = 100
    config.vqvae.eval_batch_size = 512

    name = f"imagenet2012_vq48_k{args.vocab}" + ("" if args.ir == 192 else f"_ir{args.ir}")
    data_dir = config.data.get_ref("data_dir")
    config.data = config_defaults.default_data_config(name)
    config.data.data_dir = data_dir
    config.data.update(tokens="codes", resolution=48, n_colors=args.vocab, channels=1, augment="none",
                       val_fraction=0.04, auto_import=False)
    config.model.vocab_size = args.vocab

    config.job = "vqvae"
    config.then = ("tokenize", "pretrain", "probe")
    config.probe.solver = "sgd"
    config.probe.concat_layers = 11
    return config
