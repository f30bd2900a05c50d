"""iGPT-XL: 60 layers, width 3072, 24 heads (the paper does not publish the head count), 64x64 input
(4096 context), about 6.8B parameters (paper section 3.4).

Command:   python -m igpt_jax.main --config=configs/igpt_xl.py --workdir=gs://BUCKET/igpt_xl
           variants: `:runlocal` (tiny model on CIFAR-10 from ../shared/data), `:res=N`, `:dataset=...`.
Hardware:  TPU pod slice; parameters and optimizer state sharded with fsdp (see mesh below).
Time:      the paper trains XL at batch 64 on ImageNet for fewer steps than L.
Result:    paper: ImageNet linear probe 72.0 % with concatenated features (IR 64).
           Learning rate: not published for XL; 0.001 (L's at 32x32) is our choice.
"""

from igpt_jax import config_defaults


def get_config(arg=None):
    args = config_defaults.parse_arg(arg, runlocal=False, bert=False, dataset="imagenet2012", res=64)
    config = config_defaults.base_config()
    config.data = config_defaults.default_data_config(args.dataset)
    config.data.resolution = args.res
    objective = "bert" if args.bert else "ar"
    config.model = config_defaults.paper_model("xl", n_ctx=args.res**2, objective=objective, remat="full")
    config.train.batch_size = 64
    config.train.num_steps = 1_000_000
    config.train.lr = 0.001
    config.train.warmup_steps = -1
    config.train.log_every = 100
    config.train.eval_every = 10_000
    config.train.eval_batches = 50
    config.checkpoint.every_steps = 1_000
    config.mesh.shape = (1, -1, 1)
    if args.runlocal:
        config_defaults.make_runlocal(config)
        config.mesh.shape = (-1, 1, 1)
    return config
