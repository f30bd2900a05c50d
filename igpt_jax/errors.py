"""The errors that end a command in one line (exit 2, nothing written): raised anywhere, reported by `igpt_jax.main`.

A leaf module: it imports nothing of igpt_jax, so every layer can raise these without importing the validator.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem, in one line that names the field, its value and what is expected."""


class MissingSource(FileNotFoundError):
    """The checkpoint or converted model a job reads is not where the config and workdir say, in one line that
    names the path and what was expected (the command line reports it like a `ConfigError`)."""
