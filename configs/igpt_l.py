"""iGPT-L: 48 layers, width 1536, 16 heads, 1,362,250,752 parameters at 32x32 (paper section 3.4, Table 5).

Command:   python -m igpt_jax.main --config=configs/igpt_l.py --workdir=gs://BUCKET/igpt_l
           variants: `:res=48` (2304 context, lr 0.01), `:bert` (lr 0.001), `:runlocal`, `:dataset=cifar10`.
Hardware:  TPU pod slice; parameters and optimizer state sharded with fsdp (see mesh below).
Time:      1M steps of batch 128; about 2500 V100-days in the paper (OpenAI's post).
Result:    paper: CIFAR-10 linear probe 96.3 %, fine-tune 99.0 %; ImageNet probe 60.3 % (IR 32), 65.2 % (IR 48).
"""

from igpt_jax import config_defaults


def get_config(arg=None):
    args = config_defaults.parse_arg(arg, runlocal=False, bert=False, dataset="imagenet2012", res=32)
    config = config_defaults.base_config()
    config.data = config_defaults.default_data_config(args.dataset)
    config.data.resolution = args.res
    objective = "bert" if args.bert else "ar"
    config.model = config_defaults.paper_model("l", n_ctx=args.res**2, objective=objective, remat="full")
    config.train.batch_size = 128
    config.train.num_steps = 1_000_000
    config.train.lr = 0.01 if (args.res == 48 and not args.bert) else 0.001
    config.train.warmup_steps = -1
    config.train.log_every = 100
    config.train.eval_every = 10_000
    config.train.eval_batches = 50
    config.checkpoint.every_steps = 2_000
    config.mesh.shape = (1, -1, 1)  # fsdp over every device: 1.4B parameters + Adam do not fit replicated
    if args.runlocal:
        config_defaults.make_runlocal(config)
        config.mesh.shape = (-1, 1, 1)
    return config
