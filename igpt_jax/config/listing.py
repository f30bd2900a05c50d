"""``--list``: the jobs, and every config field with its value, its default and what it means.

A field's meaning is the comment next to it in the source that defines it (read with `tokenize`, so it cannot drift
from the code): the ``# ...`` at the end of its assignment line, or the ``# ...`` lines right above it, in
`config_defaults.base_config` and `igpt_jax.data.config.default_data_config`; the model's fields are described in the
"Attributes:" section of `igpt_jax.models.igpt.ModelConfig`'s docstring.
"""

from __future__ import annotations

import ast
import inspect
import io
import re
import textwrap
import tokenize
from typing import Any

import ml_collections

from igpt_jax.config import checks as config_checks
from igpt_jax.config import defaults as config_defaults
from igpt_jax.data import config as data_config
from igpt_jax.models.igpt import ModelConfig


def source_comments(function: Any, root: str, prefix: str = "") -> dict[str, str]:
    """{dotted field: comment} for the assignments ``root.a.b = ...`` in `function`'s source.

    Args:
      function: a function whose body builds a ConfigDict in a local variable named `root`.
      root: that variable's name ('c', 'cfg').
      prefix: prepended to every field path (e.g. 'data.').
    """
    source = textwrap.dedent(inspect.getsource(function))
    lines = source.splitlines()
    trailing: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            line = lines[token.start[0] - 1]
            if line[: token.start[1]].strip():
                trailing[token.start[0]] = token.string.lstrip("#").strip()
    out: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        path = _attribute_path(node.targets[0], root)
        if path is None:
            continue
        comment = trailing.get(node.lineno) or trailing.get(node.end_lineno)
        if not comment:
            above = []
            i = node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            comment = " ".join(above)
        if comment:
            out[prefix + path] = comment
    return out


def _attribute_path(target: ast.expr, root: str) -> str | None:
    parts = []
    while isinstance(target, ast.Attribute):
        parts.insert(0, target.attr)
        target = target.value
    if isinstance(target, ast.Name) and target.id == root and parts:
        return ".".join(parts)
    return None


def docstring_attributes(cls: type, prefix: str = "") -> dict[str, str]:
    """{prefix + name: description} from the "Attributes:" section of a Google-style class docstring."""
    doc = inspect.getdoc(cls) or ""
    section = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    out: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        match = re.match(r"^\s{2}(\w+): (.*)$", line)
        if match:
            name = match[1]
            out[prefix + name] = match[2].strip()
        elif name and line.startswith("    ") and line.strip():
            out[prefix + name] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    return out


def field_comments() -> dict[str, str]:
    """Every documented config field's meaning."""
    comments = source_comments(config_defaults.base_config, "c")
    comments.update(source_comments(data_config.default_data_config, "cfg", prefix="data."))
    # the VQ-VAE's images are a data config too
    comments.update(source_comments(data_config.default_data_config, "cfg", prefix="vqvae.data."))
    comments.update(docstring_attributes(ModelConfig, prefix="model."))
    auto = {"model.vocab_size": "0: data.n_colors", "model.n_ctx": "0: data.resolution**2"}
    for field, note in auto.items():
        comments[field] = f"{comments.get(field, '')} ({note})".strip()
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
    """The text of ``--list``: jobs with descriptions, then ``field = value  # comment`` for every field.

    Values are `config`'s (after command-line overrides and derivation); where the config file changes a default of
    `config_defaults.base_config`, the default follows in brackets.
    """
    lines = ["Jobs (--config.job=JOB; --config.then=\"('probe', ...)\" runs jobs after pretraining):"]
    width = max(map(len, config_checks.JOBS))
    for name, (_, description) in config_checks.JOBS.items():
        lines.append(f"  {name:<{width}}  {description}")
    lines.append("")
    lines.append(f"Config fields of {config_name or 'the defaults'} (override with --config.FIELD=VALUE; "
                 "[default] where this config differs from config_defaults.base_config):")
    defaults = _flat(config_checks.resolve(config_defaults.base_config(), read_data=False))
    comments = field_comments()
    for field, value in _flat(config).items():
        text = f"  {field} = {value!r}"
        if field in defaults and defaults[field] != value and field != "mesh.rules":
            text += f" [{defaults[field]!r}]"
        if field in comments:
            text += f"  # {comments[field]}"
        lines.append(text)
    return "\n".join(lines) + "\n"
