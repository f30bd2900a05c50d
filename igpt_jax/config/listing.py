"""``--list``: the jobs, and every config field with its role, value, default and meaning.

Roles, defaults and meanings are the declaration's (`igpt_jax.config.settings`), so the listing cannot drift from
the rules that read them.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from igpt_jax.config import checks as config_checks
from igpt_jax.config import defaults as config_defaults
from igpt_jax.config import settings


def field_comments() -> dict[str, str]:
    """{field: meaning} of every declared field (with what an AUTO value follows) and section."""
    comments = settings.section_meanings()
    comments.update({path: settings.meaning(path) for path in settings.SETTINGS if settings.meaning(path)})
    return comments


def _flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def listing(config: ml_collections.ConfigDict, *, config_name: str = "") -> str:
    """The text of ``--list``: jobs with descriptions, the roles, then ``role  field = value  # meaning`` for every
    field.

    Values are `config`'s (after command-line overrides and derivation); where the config file changes a default of
    `config_defaults.base_config`, the default follows in brackets. A field the declaration does not know has the
    role '?'.
    """
    lines = ["Jobs (--config.job=JOB; --config.then=\"('probe', ...)\" runs jobs after pretraining):"]
    width = max(map(len, config_checks.JOBS))
    for name, (_, description) in config_checks.JOBS.items():
        lines.append(f"  {name:<{width}}  {description}")
    lines.append("")
    lines.append("Roles (each field's is declared in igpt_jax/config/settings.py; igpt_jax/config/changes.py says what "
                 "a resumed run may change):")
    role_width = max(map(len, settings.ROLES))
    for role, description in settings.ROLES.items():
        lines.append(f"  {role:<{role_width}}  {description}")
    lines.append("")
    lines.append(f"Config fields of {config_name or 'the defaults'}, each after its role (override with "
                 "--config.FIELD=VALUE; [default] where this config differs from config_defaults.base_config):")
    defaults = _flat(config_checks.resolve(config_defaults.base_config(), read_data=False))
    for field, value in _flat(config).items():
        setting = settings.get(field)
        role = setting.role if setting is not None and setting.role else "?"
        text = f"  {role:<{role_width}}  {field} = {value!r}"
        if field in defaults and defaults[field] != value and field != "mesh.rules":
            text += f" [{defaults[field]!r}]"
        meaning = settings.meaning(field)
        if meaning:
            text += f"  # {meaning}"
        lines.append(text)
    return "\n".join(lines) + "\n"
