"""iGPT-XL: 60 layers, width 3072, 24 heads (the paper does not publish the head count), 64x64 input
(4096 context), about 6.8B parameters (paper section 3.4).

Command:   python -m igpt_jax.main --config=configs/igpt_xl.py:pod=v4-1024 --workdir=gs://BUCKET/igpt_xl
           variants: `:runlocal` (tiny model on CIFAR-10 from ../shared/data), `:res=N`, `:dataset=...`,
           `:pod=...` (below); join them with commas.
Fits?      python -m igpt_jax.main --config=configs/igpt_xl.py:pod=v4-1024 --config.job=compile --workdir=/tmp/c
Hardware:  a Cloud TPU slice, `:pod=TYPE` (default v4-1024), each proven to fit by the compile job
           (`--config.job=compile`, libtpu, no TPU needed; figures in bench/RESULTS.md "Pod compile (AOT)"):
             pod        topology    devices  mesh (data, fsdp, context, tensor)
             v3-1024    v3:16x32    1024     (1, 64, 2, 8)   a v3 device is a core: 16 GiB
             v3-2048    v3:32x32    2048     (1, 64, 4, 8)
             v4-1024    v4:8x8x8     512     (1, 64, 1, 8)   a v4/v5p device is a chip (megacore)
             v4-2048    v4:8x8x16   1024     (1, 64, 2, 8)
             v5p-1024   v5p:8x8x8    512     (1, 64, 1, 8)
             v5p-2048   v5p:8x8x16  1024     (1, 64, 2, 8)
             any        -             <=64   (1, -1, 1, 1)   fsdp over all devices (a slice of at most 64 devices)
           Batch 64 splits at most 64 ways ('fsdp'); 'tensor' splits the 24 heads, the MLP and the vocabulary 8 ways;
           beyond 512 devices 'context' splits each 4096-token sequence 2 or 4 ways (context parallelism: queries
           split along the sequence, keys/values gathered, parameters over 'fsdp' x 'context'). Same math, only the
           layout differs. Attention 'auto': the Pallas splash kernel on TPU (blocks of 512 divide 4096 and its
           shards); `--config.model.attention=dense` for the dense comparison in bench/RESULTS.md. The
           parameters and Adam state are sharded over every device. Float32 parameters and compute (on TPU, XLA's
           default precision runs float32 matmuls as one bfloat16 pass), remat 'dots_no_batch' (figures for dense):
           the blocks keep their weight matmuls' outputs and recompute only attention in the backward pass, 6 %
           more matmul FLOPs than none (remat 'full': 24 %). Without remat the [4096, 4096] scores of every head
           and layer do not fit: XLA needs 42.7 GiB of temporaries on v4-1024 (30.75 GiB usable); with
           'dots_no_batch' the step needs 8.5 GiB of 32 (v4-1024) and 4.3 of 16 (v3-1024). With splash (the TPU
           default) 8.4 GiB, and without remat 26.6 GiB: it fits (`--config.model.remat=none`, 8 % fewer FLOPs).
           bfloat16 compute (`--config.model.dtype=bfloat16`; parameters, norm statistics, softmax, logits and loss
           stay float32): 4.4 GiB on v4-1024, and the compile job's ESTIMATE 0.339 s per step against 0.468 s in
           float32 (bench/RESULTS.md "Roofline estimates"); not the default until a TPU run shows its loss curve.
Time:      the paper trains XL at batch 64 on ImageNet for fewer steps than L.
Result:    paper: ImageNet linear probe 72.0 % with concatenated features (IR 64).
           Learning rate: not published for XL; 0.001 (L's at 32x32) is our choice.
"""

from igpt_jax import sharding
from igpt_jax.config import defaults as config_defaults

# Context parallelism: each sequence splits over 'context' (DEFAULT_RULES), the parameters over 'fsdp' x 'context'.
SEQUENCE_RULES = tuple({**dict(sharding.DEFAULT_RULES), "embed": ("fsdp", "context")}.items())
# Cloud TPU accelerator type -> (topology the compile job describes, mesh (data, fsdp, context, tensor), rules).
PODS = {
    "v3-1024": ("v3:16x32", (1, 64, 2, 8), SEQUENCE_RULES),
    "v3-2048": ("v3:32x32", (1, 64, 4, 8), SEQUENCE_RULES),
    "v4-1024": ("v4:8x8x8", (1, 64, 1, 8), sharding.DEFAULT_RULES),
    "v4-2048": ("v4:8x8x16", (1, 64, 2, 8), SEQUENCE_RULES),
    "v5p-1024": ("v5p:8x8x8", (1, 64, 1, 8), sharding.DEFAULT_RULES),
    "v5p-2048": ("v5p:8x8x16", (1, 64, 2, 8), SEQUENCE_RULES),
    "any": ("", (1, -1, 1, 1), sharding.DEFAULT_RULES),
}


def get_config(arg=None):
    args = config_defaults.parse_arg(arg, runlocal=False, bert=False, dataset="imagenet2012", res=64, pod="v4-1024")
    config = config_defaults.base_config()
    config.data = config_defaults.default_data_config(args.dataset, auto=True)
    config.data.resolution = args.res
    objective = "bert" if args.bert else "ar"
    config.model = config_defaults.paper_model("xl", objective=objective, remat="dots_no_batch",
                                               attention="auto")
    config.train.batch_size = 64
    config.train.num_steps = 1_000_000
    config.train.lr = 0.001
    config.train.warmup_steps = -1
    config.train.log_every = 100
    config.train.eval_every = 10_000
    config.train.eval_batches = 50
    config.checkpoint.every_steps = 1_000
    if args.pod not in PODS:
        raise ValueError(f"pod={args.pod!r}: choose one of {sorted(PODS)}")
    config.compile.topology, config.mesh.shape, config.mesh.rules = PODS[args.pod]
    if args.runlocal:
        config_defaults.make_runlocal(config)
        config.mesh.shape, config.mesh.rules = (-1, 1, 1, 1), sharding.DEFAULT_RULES
    return config
