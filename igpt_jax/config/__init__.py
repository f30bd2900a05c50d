"""Every setting of a run, and the rules about them.

  settings  every field declared once: its default, meaning and role (architecture, tokens, data, schedule,
            runtime, job) and AUTO value; every rule below reads it
  defaults  `base_config()` (built from the declaration; configs/ start from it), the paper's models, variants
  checks    `resolve` (fields left AUTO follow the data), `validate` (one line per problem, before any work),
            `follow_up_jobs` (how ``config.then`` jobs are configured), the job registry `JOBS`
  changes   what a resumed run may change (by role), and the record of each change (``config_history.jsonl``)
  listing   ``--list``: the jobs and every field with its role, value, default and meaning

May import: the leaves (errors, workdir, sharding), data, models and probing (to check their settings).
"""
