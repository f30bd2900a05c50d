"""iGPT-L: 48 layers, width 1536, 16 heads, 1,362,250,752 parameters at 32x32 (paper section 3.4, Table 5).

Command:   python -m igpt_jax.main --config=configs/igpt_l.py:pod=v4-1024 --workdir=gs://BUCKET/igpt_l
           variants: `:res=48` (2304 context, lr 0.01), `:bert` (lr 0.001), `:runlocal`, `:dataset=cifar10`,
           `:pod=...` (below); join them with commas (`:res=48,pod=v3-2048`).
Fits?      python -m igpt_jax.main --config=configs/igpt_l.py:pod=v4-1024 --config.job=compile --workdir=/tmp/c
Hardware:  a Cloud TPU slice, `:pod=TYPE` (default v4-1024), each proven to fit by the compile job
           (`--config.job=compile`, libtpu, no TPU needed; figures in bench/RESULTS.md "Pod compile (AOT)"):
             pod        topology    devices  mesh (data, fsdp, context, tensor)
             v3-1024    v3:16x32    1024     (1, 128, 1, 8)   a v3 device is a core: 16 GiB
             v3-2048    v3:32x32    2048     (1, 128, 2, 8)   'context' splits each sequence in two (see below)
             v4-1024    v4:8x8x8     512     (1, 128, 1, 4)   a v4/v5p device is a chip (megacore)
             v4-2048    v4:8x8x16   1024     (1, 128, 1, 8)
             v5p-1024   v5p:8x8x8    512     (1, 128, 1, 4)
             v5p-2048   v5p:8x8x16  1024     (1, 128, 1, 8)
             any        -             <=128  (1, -1, 1, 1)    fsdp over all devices (a slice of at most 128 devices)
           `:res=96` (9,216 tokens, past the paper's 64x64; only v4-2048 (its default) and v5p-2048, mesh
           (1, 64, 2, 8), 2 micro-batches of 64): each sequence split in two over 'context', the splash kernel.
           Batch 128 splits at most 128 ways, so the rest of the slice is tensor parallelism (heads, MLP, vocabulary
           4 or 8 ways; 16 heads) and, on 2048 devices, sequence (context) parallelism over 'context' (queries split
           along the sequence, keys/values gathered, the parameters over 'fsdp' x 'context'): the same math, only the
           layout differs. The parameters and Adam state are sharded over every device (fsdp x tensor). Float32
           parameters and compute (on TPU, XLA's default precision runs float32 matmuls as one bfloat16 pass),
           attention 'auto' (the Pallas splash kernel on TPU; the figures below are for dense), and no
           rematerialisation: the step needs at most 54 % of a v3 core's 16 GiB (48x48 on v3-1024; 20 % at 32x32)
           and 40 % of a v4 chip's 32 GiB, so recomputing activations would cost FLOPs for nothing.
           bfloat16 compute (`--config.model.dtype=bfloat16`): 2.8 instead of 3.4 GiB on v4-1024 at 32x32, and the
           compile job's ESTIMATE 0.072 s per step against 0.085 s in float32 (bench/RESULTS.md "Roofline
           estimates"); not the default until a TPU run shows its loss curve.
Time:      1M steps of batch 128; about 2500 V100-days in the paper (OpenAI's post).
Result:    paper: CIFAR-10 linear probe 96.3 %, fine-tune 99.0 %; ImageNet probe 60.3 % (IR 32), 65.2 % (IR 48).
"""

from igpt_jax import sharding
from igpt_jax.config import defaults as config_defaults

# Context parallelism: each sequence splits over 'context' (DEFAULT_RULES), the parameters over 'fsdp' x 'context'.
SEQUENCE_RULES = tuple({**dict(sharding.DEFAULT_RULES), "embed": ("fsdp", "context")}.items())
# Cloud TPU accelerator type -> (topology the compile job describes, mesh (data, fsdp, context, tensor), rules).
PODS = {
    "v3-1024": ("v3:16x32", (1, 128, 1, 8), sharding.DEFAULT_RULES),
    "v3-2048": ("v3:32x32", (1, 128, 2, 8), SEQUENCE_RULES),
    "v4-1024": ("v4:8x8x8", (1, 128, 1, 4), sharding.DEFAULT_RULES),
    "v4-2048": ("v4:8x8x16", (1, 128, 1, 8), sharding.DEFAULT_RULES),
    "v5p-1024": ("v5p:8x8x8", (1, 128, 1, 4), sharding.DEFAULT_RULES),
    "v5p-2048": ("v5p:8x8x16", (1, 128, 1, 8), sharding.DEFAULT_RULES),
    "any": ("", (1, -1, 1, 1), sharding.DEFAULT_RULES),
}
# 96x96 (9,216 tokens, `:res=96`): each sequence split in two over 'context', the batch 64 ways.
PODS_96 = {
    "v4-2048": ("v4:8x8x16", (1, 64, 2, 8), SEQUENCE_RULES),
    "v5p-2048": ("v5p:8x8x16", (1, 64, 2, 8), SEQUENCE_RULES),
}


def get_config(arg=None):
    args = config_defaults.parse_arg(arg, runlocal=False, bert=False, dataset="imagenet2012", res=32, pod="")
    config = config_defaults.base_config()
    config.data = config_defaults.default_data_config(args.dataset, auto=True)
    config.data.resolution = args.res
    objective = "bert" if args.bert else "ar"
    config.model = config_defaults.paper_model("l", objective=objective, remat="none",
                                               attention="auto")
    config.train.batch_size = 128
    config.train.num_steps = 1_000_000
    config.train.lr = 0.01 if (args.res == 48 and not args.bert) else 0.001
    config.train.warmup_steps = -1
    config.train.log_every = 100
    config.train.eval_every = 10_000
    config.train.eval_batches = 50
    config.checkpoint.every_steps = 2_000
    pods = PODS_96 if args.res == 96 else PODS
    pod = args.pod or ("v4-2048" if args.res == 96 else "v4-1024")  # the default slice
    if pod not in pods:
        raise ValueError(f"pod={args.pod!r}: choose one of {sorted(pods)}" + (" at res=96" if args.res == 96 else ""))
    config.compile.topology, config.mesh.shape, config.mesh.rules = pods[pod]
    if args.res == 96 and not args.runlocal:
        config.train.grad_accum_steps = 2  # two micro-batches of 64: one example per device at a time
    if args.runlocal:
        config_defaults.make_runlocal(config)
        config.mesh.shape, config.mesh.rules = (-1, 1, 1, 1), sharding.DEFAULT_RULES
    return config
