"""iGPT-S: 24 layers, width 512, 8 heads, 76,571,648 parameters at 32x32 (paper section 3.4, Table 5).

Command:   python -m igpt_jax.main --config=configs/igpt_s.py --workdir=gs://BUCKET/igpt_s
           variants: `:runlocal` (tiny model, CIFAR-10 from ../shared/data, a few hundred steps on a CPU),
           `:bert` (BERT objective, lr 0.01), `:dataset=cifar10`, `:res=48`.
Hardware:  up to 128 devices (batch 128), the batch and the parameters and Adam state split over all of them
           ('fsdp', mesh (1, -1, 1, 1)), no remat: v4-256 (`v4:4x4x8`, 128 chips: 1.36 of 32 GiB per chip), checked
           with `--config.job=compile` (bench/RESULTS.md "Roofline estimates"). Until issue 25 the config was pure data
           parallelism with remat 'full' (1.3 GiB per chip): every chip then ran Adam over all 76.6M float32
           parameters for its one example, and the compile job's estimate was 0.108 s per step on v4-256 against
           0.028 s now (memory-bound both; compute alone 0.003 s). Larger slices: igpt_l.py's layouts.
Time:      1M steps of batch 128 (the paper's schedule) take days even on a pod slice.
Result:    paper Table 5 learning rate 0.003 (AR) / 0.01 (BERT). `:runlocal` on 2 CPU cores: see README.md.
"""

from igpt_jax.config import defaults as config_defaults


def get_config(arg=None):
    args = config_defaults.parse_arg(arg, runlocal=False, bert=False, dataset="imagenet2012", res=32)
    config = config_defaults.base_config()
    config.data = config_defaults.default_data_config(args.dataset, auto=True)
    config.data.resolution = args.res
    objective = "bert" if args.bert else "ar"
    config.model = config_defaults.paper_model("s", objective=objective, remat="none")
    config.train.batch_size = 128
    config.train.num_steps = 1_000_000
    config.train.lr = 0.01 if args.bert else 0.003
    config.train.warmup_steps = -1  # one epoch
    config.train.log_every = 100
    config.train.eval_every = 10_000
    config.train.eval_batches = 50
    config.checkpoint.every_steps = 5_000
    config.compile.topology = "v4:4x4x8"  # v4-256: 128 chips, one example each (also fits v3:8x8, v3-128)
    config.mesh.shape = (1, -1, 1, 1)  # fsdp: one example and 1/128 of the parameters and Adam state per device
    if args.runlocal:
        config_defaults.make_runlocal(config)
        config.mesh.shape = (-1, 1, 1, 1)
    return config
