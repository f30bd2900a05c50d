"""iGPT on CIFAR-10 at 16x16 on 2 CPU cores (an hour of pretraining): pretrain, then linear probes and fine-tuning.

An 8-layer, width-128 autoregressive iGPT (512 colours, 256 tokens per image) pretrained on the 45,000 training
images (5,000 held out for validation) from ../shared/data/cifar10.npz, then (`config.then`) the probe job (every
layer, L-BFGS with the regulariser chosen on validation, refit on all 50,000 labelled images, the raw-pixel and
random-init baselines, low-data budgets) and the fine-tuning job (L_GEN + L_CLF, early stopping on validation).
While pretraining, every 500 steps, every layer is probed on 2,000 + 1,000 fixed training/validation images
(`track.*`, igpt_jax/probing/tracking.py): track/* metrics and WORKDIR/tracking.png, accuracy vs loss.

Command:   python -m igpt_jax.main --config=configs/cifar10_cpu.py --workdir=workdirs/cifar10_cpu
           (results: workdirs/cifar10_cpu/probe/results.json and workdirs/cifar10_cpu/finetune/results.json)
Hardware:  any CPU; sized for 2 cores (measured on this project's 2-core machine).
Time:      about 2 h 10 min in all with nothing beside it: pretraining 1 h 13 min (2,000 steps, 7,489 tokens/s);
           probe job 25.6 min (features of 60,000 images in 6 min per model, pretrained and random-init;
           scikit-learn L-BFGS fits, before the JAX solver became probe.solver's default: bench/RESULTS.md "Linear
           probe"); fine-tuning 30.7 min (800 steps of 64, 5 passes over the validation split, the test split).
           With tracking and the JAX solver (README "The paper's findings", run beside other work): pretraining
           2 h 13 min at 4,114 tokens/s, of which 4 tracking evaluations of 37-43 s (2.0 %); probe job 29.3 min;
           fine-tuning 83.6 min.
Result:    validation loss 3.168 -> 3.053 -> 2.968 -> 2.945 nats/token at steps 500-2000; test 2.946 nats/token.
           Tracking (best layer, 1,000 validation images): 38.7 -> 39.4 -> 42.1 -> 43.4 % at steps 500-2000.
           Linear probe, test accuracy (C chosen on validation, refit on all 50,000 labelled images): best layer
           6 of 8: 49.23 %; concatenated layers 5-7: 54.15 %; raw 16x16 pixels 41.36 %; the same model with
           random weights 29.58 % (its best layer, 0). Low-data probes of layer 6 (5 balanced subsets): 40 labels
           20.51 +- 1.91 %, 250 labels 29.08 +- 0.62 %, 4,000 labels 45.05 +- 0.48 %.
           Fine-tuning (L_GEN + L_CLF, head on the final norm, lr 1e-3 constant): validation 9.40 % (zero
           head) -> 43.56 / 51.60 / 52.60 / 56.52 % at steps 200-800; best step 800: test 55.58 %.
           Per-layer table and plot: README.md "Measured", bench/figures/cifar10_cpu_probe_layers.png.
           Quadrant pooling (--config.job=probe --config.probe.pooling=quadrants, README "The paper's findings"):
           best layer 7: 55.90 %; layers 6-8 concatenated (1,536 features): 59.92 %.
           Width 64 (--config.model.d_model=64 --config.model.n_head=2): validation loss 3.009, best layer 42.77 %,
           layers 5-7 concatenated 48.50 %.
           BERT (--config.model.objective=bert, README "The paper's findings"): validation loss 2.640 nats per
           masked token at step 2000; probe (5-mask ensemble) best layer 8 (final norm): 42.36 %, layers 6-8
           concatenated 45.81 %, raw pixels 41.36 %, random weights 31.14 %; steps 501-2000 took 1 h 20 min at
           5,140 tokens/s, the probe job 40.2 min; fine-tuned (800 steps, 5-mask ensemble): test 48.26 %.
"""

from igpt_jax.config import defaults as config_defaults


def get_config(arg=None):
    config_defaults.parse_arg(arg)  # no variants
    config = config_defaults.base_config()
    config.data = config_defaults.default_data_config("cifar10", auto=True)  # auto-imported from ../shared/data
    config.data.resolution = 16
    config.data.cifar_pad = 2  # the 32x32 recipe's 4 pixels, scaled to 16x16
    # vocabulary and context follow the data: 512 colours, 16x16 = 256 tokens
    config.model = config_defaults.model_config(d_model=128, n_head=4, n_layer=8, remat="none")
    config.train.batch_size = 64
    config.train.num_steps = 2000  # 128,000 images: 2.8 epochs of the 45,000 training images
    config.train.lr = 3e-3
    config.train.warmup_steps = 200
    config.train.log_every = 50
    config.train.eval_every = 500
    config.train.eval_batches = 40  # 2,560 of the 5,000 validation images
    config.checkpoint.every_steps = 250
    # Every 500 steps (4 times), a probe of every layer on 2,000 + 1,000 fixed images: tracking.png, track/* metrics.
    config.track.every = 500
    config.track.train_examples = 2000
    config.track.val_examples = 1000
    config.track.C = (1e-3, 1e-2, 0.1, 1.0)  # widened at its edges (probe.C_widen)
    config.then = ("probe", "finetune")

    config.probe.C = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
    config.probe.concat_layers = 3
    config.probe.low_data_budgets = (40, 250, 4000)  # paper 4.7, 5 class-balanced subsets each
    config.probe.batch_size = 256

    config.finetune.lr = 1e-3
    config.finetune.warmup_steps = 50
    config.finetune.num_steps = 800
    config.finetune.eval_every = 200
    config.finetune.eval_batch_size = 250  # 20 batches: the whole validation split
    return config
