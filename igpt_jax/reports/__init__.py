"""What people look at: plots, image grids, and the findings report drawn from result files.

  plots     line and bar charts (matplotlib)
  images    image grids of completions and samples, PNG and .npy writers (local or gs://)
  findings  the paper's Figures 2-4 and a table across runs, from their result files

May import: the leaves only (a report reads the files jobs write, named in `igpt_jax.workdir`, never a job).
"""
