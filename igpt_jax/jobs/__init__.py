"""One module per job, each with ``run(config, workdir)``; `igpt_jax.config.checks.JOBS` names them and `igpt_jax.main`
imports the one a command asks for. A job reads top to bottom as what it does, from the shared modules below it.

May import: every package below it; never another job.
"""
