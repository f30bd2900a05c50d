"""The networks and what is computed from them, free of data, checkpoints and jobs.

  igpt        the iGPT transformer (`IGPT`, `ModelConfig`): logical axis names on every parameter
  attention   dense, blockwise, splash (TPU Pallas) and cuDNN attention, sequence-parallel variants
  objectives  autoregressive and BERT losses, masks
  decoding    KV-cache sampling (prefill, decode steps, generate)
  layout      shapes and shardings of a state on a mesh (`layout_of`, `param_layout`, random parameters)
  vqvae       the paper's VQ-VAE (A.2): encoder, EMA codebook, decoder, losses

May import: the leaves (errors, workdir, sharding).
"""
