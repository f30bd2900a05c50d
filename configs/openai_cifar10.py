"""The paper's CIFAR-10 protocol on OpenAI's released iGPT-S/M/L (converted from the Hugging Face Hub).

Variants `:s` (default), `:m`, `:l`: the architecture of openai/imagegpt-small / -medium / -large (24 x 512,
36 x 1024, 48 x 1536; 32x32 inputs, 512 colours). The job is the linear probe (paper 2.4, 4.1, 4.7) of every layer
on the converted model's palette: L-BFGS logistic regression with C chosen on the validation split (the last 5,000
training images), the best layer (on validation) refitted on all 50,000 and scored on the 10,000 test images, the
11 layers centred on it concatenated, and the low-data probes (40 / 250 / 4,000 labels, 5 balanced subsets each);
then (`config.then`) fine-tuning (L_GEN + L_CLF, head on the final norm, early stopping on validation). Both read
the model from ``config.checkpoint.source_workdir``; the architecture, palette and 32x32 resolution come from it.

Command:   # a machine that can reach the Hugging Face Hub (torch + transformers: pip install -e '.[test]'):
           python -m igpt_jax.pretrained.convert --hf=openai/imagegpt-small --out=/abs/path/igpt_s_openai
           python -m igpt_jax.main --config=configs/openai_cifar10.py:s --workdir=workdirs/openai_cifar10_s \
               --config.checkpoint.source_workdir=/abs/path/igpt_s_openai
           # offline: copy the Hub repository's files (config.json, model.safetensors or pytorch_model.bin,
           # preprocessor_config.json) into a folder by hand, then the same with --hf=/abs/path/that_folder.
           # iGPT-M / iGPT-L: openai/imagegpt-medium with `:m`, openai/imagegpt-large with `:l`.
           Results: WORKDIR/results.json (the probe table is printed) and WORKDIR/finetune/results.json.
Hardware:  a TPU host or GPU: the probe holds every layer's features of 60,000 images in host memory (iGPT-S
           3 GiB, iGPT-M 9 GiB, iGPT-L 18 GiB, float32); the forward passes run on the mesh (`config.mesh`).
Time:      not measured here (no Hub access from this machine and no accelerator); the forward pass over 60,000
           images x 1,024 tokens is the bulk of the probe, fine-tuning is 3,500 steps of 128.
Result:    not measured here: the weights cannot be downloaded on this machine. The paper reports for iGPT-L a
           linear probe of 96.3 % and fine-tuning to 99.0 % on CIFAR-10, and low-data errors of 26.8 +- 1.5
           (40 labels), 12.4 +- 0.6 (250), 5.7 +- 0.1 % (4,000); a public notebook reports 78.6 % for iGPT-S's
           best layer with mean pooling. The code path (conversion, tokens, per-layer features, NLL) is checked
           against the Hugging Face model in tests/test_pretrained_sources.py.
"""

from igpt_jax.config import defaults as config_defaults

HUB_IDS = {"s": "openai/imagegpt-small", "m": "openai/imagegpt-medium", "l": "openai/imagegpt-large"}


def get_config(arg=None):
    args = config_defaults.parse_arg(arg, s=False, m=False, l=False)
    sizes = [size for size in HUB_IDS if args[size]] or ["s"]
    if len(sizes) > 1:
        raise ValueError(f"configs/openai_cifar10.py: choose one size of s, m, l, got {arg!r}")
    size = sizes[0]
    config = config_defaults.base_config()
    config.job = "probe"
    config.then = ("finetune",)
    config.data = config_defaults.default_data_config("cifar10")  # 32x32, auto-imported from ../shared/data
    # The released models' architecture (what the converted model says; a mismatch is an error naming both).
    config.model = config_defaults.paper_model(size, n_ctx=32 * 32, vocab_size=512,
                                               remat="none" if size == "s" else "full")
    config.checkpoint.source_workdir = ""  # set on the command line: the folder written by igpt_jax.pretrained.convert

    config.probe.layers = "all"
    config.probe.solver = "lbfgs"
    config.probe.C = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
    config.probe.concat_layers = 11  # paper 4.3: 11 layers centred on the best one
    config.probe.low_data_budgets = (40, 250, 4000)  # paper 4.7
    config.probe.low_data_subsets = 5
    config.probe.baselines = False  # a random-weights pass of the large model would double the feature time
    config.probe.batch_size = 256

    config.finetune.objective = "gen+clf"
    config.finetune.batch_size = 128  # paper 3.4
    config.finetune.lr = 1e-4 if size == "s" else 3e-5  # a starting point: the paper searched it
    config.finetune.num_steps = 3500  # ~10 epochs of the 45,000 training images
    config.finetune.eval_every = 350
    config.finetune.patience = 3
    config.finetune.eval_batch_size = 250
    return config
