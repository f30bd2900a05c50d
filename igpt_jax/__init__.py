"""igpt_jax: Generative Pretraining from Pixels in JAX/Flax.

The package is layered; a package may import only the packages below it (tests/test_architecture.py checks this from
the code's own imports, and that nothing imports a job):

  main         the command line: parses and checks the config, runs the job named by ``config.job`` and its follow-ups
  jobs/        one module per job (pretrain, probe, finetune, sample, evaluate, vqvae, tokenize, lr_search, compile)
  pretrained/  a trained model as a job reads it: a run's checkpoint or a converted Hugging Face model; the VQ-VAE
  training/    what every training job shares: optimizer, train step, checkpoints, the run log and metric writers
  config/      every setting: defaults and roles, the checks run before any work, resume rules, ``--list``
  probing/     features of every layer, logistic-regression probes, representation tracking
  models/      Flax modules (iGPT, attention kernels, VQ-VAE), objectives, KV-cache decoding, parameter layouts
  data/        TFDS datasets without TensorFlow, the palette, the Grain pipeline, host rows and global batches
  reports/     plots, image grids and the findings report (reads result files, never a job)
  leaves       errors (one-line errors), workdir (the names of a workdir's files), sharding (mesh and rules),
               quiet_start: import nothing of igpt_jax
"""

__version__ = "0.1.0"
