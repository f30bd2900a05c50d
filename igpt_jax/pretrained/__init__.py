"""A trained model as a job reads it.

  sources  the one way in: a pretraining run's checkpoint or a converted model, restored onto the job's mesh, with
           the rule for which settings come from the source and which from the job
  convert  OpenAI's released iGPT (a Hugging Face ``ImageGPTForCausalImageModeling`` folder) -> a converted model
  vqvae    a trained VQ-VAE's state, encoder and decoder (the VQ-VAE job, tokenize, and sampling of code models)

May import: the leaves, data, models, config and training.
"""
