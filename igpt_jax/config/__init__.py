"""Every setting of a run, and the rules about them.

  defaults  `base_config()`: every field with its default and meaning (configs/ start from it)
  checks    `resolve` (fields left AUTO follow the data), `validate` (one line per problem, before any work),
            `follow_up_jobs` (how ``config.then`` jobs are configured), the job registry `JOBS`
  changes   what a resumed run may change, and the record of each change (``config_history.jsonl``)
  listing   ``--list``: the jobs and every field with its value, default and meaning

May import: the leaves (errors, workdir, sharding), data, models and probing (to check their settings).
"""
