"""The paper's learning-rate search (section 3.4) for `configs/cifar10_cpu.py`: short runs down 0.01, 0.003, ...

The same 8-layer, width-128 model on CIFAR-10 at 16x16 (../shared/data), pretrained in trials of a tenth of its
schedule (200 of 2,000 steps, warmup 20, the cosine ending at step 200) at 0.01, 0.003, 0.001, ... (largest first),
each in WORKDIR/lr_<lr>/, until the final validation loss (40 batches of 64 validation images) rises: the rate
before the rise is picked. The table (lr, steps, validation loss, time), lr_search.png and lr_search.json are written
to the workdir, and the job prints the command of the full run (pretraining, probe and fine-tuning of
`configs/cifar10_cpu.py`) at the picked rate. Rerunning the command resumes an interrupted search.

Command:   python -m igpt_jax.main --config=configs/lr_search_cifar10.py --workdir=workdirs/lr_search_cifar10
           then the printed command, e.g. python -m igpt_jax.main --config=configs/lr_search_cifar10.py
           --config.job=pretrain --config.train.lr=0.003 --workdir=workdirs/lr_search_cifar10/pretrain
Hardware:  any CPU; sized for 2 cores.
Time:      not measured as a whole. Each trial is 200 steps of the pretraining measured in configs/cifar10_cpu.py
           (2,000 steps in 1 h 13 min), so about 7-8 min per trial, and 3 trials or more (at least one past the
           minimum).
Result:    not measured (a full search is longer than this project's shared machine allows). The paper picks 0.003
           for iGPT-S and M at 32x32 (Table 5); cifar10_cpu.py trains at 3e-3.
"""

import importlib.util
import os

from igpt_jax.config import defaults as config_defaults


def _cifar10_cpu():
    """configs/cifar10_cpu.py (configs/ is a folder of files, not a package)."""
    path = os.path.join(os.path.dirname(__file__), "cifar10_cpu.py")
    spec = importlib.util.spec_from_file_location("cifar10_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    config_defaults.parse_arg(arg)  # no variants
    config = _cifar10_cpu().get_config()
    config.job = "lr_search"  # config.then (probe, finetune) is for the full run at the picked rate
    config.lr_search.lrs = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
    config.lr_search.schedule_fraction = 0.1  # 200 of 2,000 steps
    return config
