"""Judging a model's features: per-layer features, logistic-regression probes and tracking them while training.

  features      every layer's pooled features of a split (BERT mask ensembles), on the mesh
  linear_probe  the paper's probe: C chosen on validation, refit, baselines, low-data budgets, concatenation
  logreg_jax    scikit-learn's L2 logistic regression objective solved by L-BFGS in JAX, many problems per call
  fitting       probes fitted to a model's extracted splits: the splits, per-layer probes, pixel baseline, low data
  progress      the probe job's saved features and fits (a rerun reuses them)
  tracking      representation tracking while pretraining (the paper's Figure 3, live)

May import: the leaves, data, models and reports.
"""
