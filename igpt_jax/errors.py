"""The errors that end a command in one line (exit 2, nothing written): raised anywhere, reported by `igpt_jax.main`.

A leaf module: it imports nothing of igpt_jax, so every layer can raise these without importing the validator.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem, in one line that names the field, its value and what is expected."""


class MissingSource(FileNotFoundError):
    """The checkpoint or converted model a job reads is not where the config and workdir say, in one line that
    names the path and what was expected (the command line reports it like a `ConfigError`)."""


class WorkdirInUse(RuntimeError):
    """Another run holds the workdir's lease (`igpt_jax.training.lease`), in one line that names it and how to take
    over (the command line reports it like a `ConfigError`)."""


class StorageError(RuntimeError):
    """Writing to the workdir failed (a full disk or quota, an unwritable directory, a vanished bucket), in one line
    that names the path, the step being saved and the newest intact checkpoint (the command line prints it and exits
    with status 1; ``--verbose`` shows the traceback)."""
