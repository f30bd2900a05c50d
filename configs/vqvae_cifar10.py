"""iGPT on VQ-VAE codes of CIFAR-10 on 2 CPU cores: 32x32x3 -> 16x16 codes from 512, then cifar10_cpu's model.

The paper's VQ-VAE (appendix A.2) with one encoder block (4x4 stride-2 convolution to 64 channels, ReLU, residual
stack of 32 hidden units; the decoder mirrors it) compresses CIFAR-10's 32x32x3 images to 16x16 grids of codes.
Vocabulary 512: the same sequence length (256) and vocabulary as configs/cifar10_cpu.py's 512-colour palette at
16x16 pixels, so the transformer (8 layers, width 128) and its step cost are identical and only the input differs:
a code summarises a 2x2x3 patch at full resolution, a palette token one colour of a 2x-downsampled image.
One command: the VQ-VAE job, then (`config.then`) tokenize (TFDS dataset `cifar10_vq16_k512`, train and test in
the source's order, so the validation cut is the same 5,000 images), pretraining on the codes with cifar10_cpu's
schedule (2,000 steps of 64) and the linear probe of every layer.

Command:   python -m igpt_jax.main --config=configs/vqvae_cifar10.py --workdir=workdirs/vqvae_cifar10
           (VQ-VAE: workdirs/vqvae_cifar10/vqvae_results.json, reconstructions.png; then tokenize/, pretrain/,
           probe/results.json)
Hardware:  any CPU; sized for 2 cores.
Time:      VQ-VAE 2,000 steps of 64 images (2.8 epochs): about 29 min on the 2 shared cores (0.75 s/step at load
           average 12-20); tokenize 60,000 images: 4 min 51 s. Pretraining on codes: 1 h 57 min
           (2,000 steps, 4,689 tokens/s at load ~10 from other jobs; configs/cifar10_cpu.py measured 1 h 13 min on a
           quiet machine); probe: features of the 60,000 images in 17.5 min, then the fits.
Result:    VQ-VAE, CIFAR-10 test split: reconstruction MSE 0.0215 ([-1, 1] units), RMSE 18.71 grey levels against
           the 32x32 images; all 512 codes used (perplexity 281). The 512-colour palette at 16x16: RMSE 4.87 against
           its 16x16 input, 17.28 against the 32x32 images (bench/vqvae_vs_palette.py; README "VQ-VAE").
           Pretraining on codes: validation loss 2.239 -> 2.046 -> 1.906 nats/token at steps 500/1000/2000.
           Linear probe, test accuracy (C chosen on validation, refit on all 50,000 labelled images): best layer
           7 of 8: 49.36 %; concatenated layers 6-8: 54.33 % (the palette model of configs/cifar10_cpu.py at the
           same steps: 49.17 % and 54.07 %); raw code ids 17.05 %; random weights 38.38 %. README "VQ-VAE codes
           instead of pixels".
"""

from igpt_jax.config import defaults as config_defaults


def get_config(arg=None):
    config_defaults.parse_arg(arg)  # no variants
    config = config_defaults.base_config()
    config.job = "vqvae"
    config.then = ("tokenize", "pretrain", "probe")

    # The images the VQ-VAE encodes; --config.data.data_dir moves both datasets.
    codes = config_defaults.default_data_config("cifar10_vq16_k512")
    config.vqvae.data = config_defaults.default_data_config("cifar10")  # auto-imported from ../shared/data
    config.vqvae.data.data_dir = codes.get_ref("data_dir")
    config.vqvae.data.augment = "cifar"  # pad 4, random crop, flip (training only)
    config.vqvae.vocab_size = 512
    config.vqvae.downsample = 1
    config.vqvae.batch_size = 64
    config.vqvae.num_steps = 2000
    config.vqvae.log_every = 100
    config.vqvae.grid_images = 16

    config.data = codes
    config.data.update(tokens="codes", resolution=16, n_colors=512, channels=1, augment="none", auto_import=False)
    config.model = config_defaults.model_config(
        vocab_size=512, n_ctx=16 * 16, d_model=128, n_head=4, n_layer=8, remat="none",
    )
    config.train.batch_size = 64
    config.train.num_steps = 2000  # as configs/cifar10_cpu.py
    config.train.lr = 3e-3
    config.train.warmup_steps = 200
    config.train.log_every = 50
    config.train.eval_every = 500
    config.train.eval_batches = 40
    config.checkpoint.every_steps = 250

    config.probe.C = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
    config.probe.concat_layers = 3
    config.probe.batch_size = 256
    return config
