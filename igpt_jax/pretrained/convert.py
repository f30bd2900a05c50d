"""Models to and from the Hugging Face port of iGPT (`transformers.ImageGPTForCausalImageModeling`).

This is what loads OpenAI's released iGPT-S/M/L weights (`openai/imagegpt-small`, `openai/imagegpt-medium`,
`openai/imagegpt-large` on the Hugging Face Hub) into our jobs, on a machine that can reach the Hub:

    python -m igpt_jax.pretrained.convert --hf=openai/imagegpt-small --out=/abs/path/igpt_s_openai

(``--hf`` may also be a folder holding ``save_pretrained`` output of the model and of its image processor, e.g.
copied by hand). The output is a converted model that every job accepts as
``--config.checkpoint.source_workdir=/abs/path/igpt_s_openai`` (see `igpt_jax.pretrained.sources`): ``params/``
(an Orbax
checkpoint of the plain parameter tree), ``model_config.json`` (our `ModelConfig`) and ``palette.json`` (the image
processor's ``clusters``: OpenAI's 512 colours, already in [-1, 1]). The other way,

    python -m igpt_jax.pretrained.convert --direction=to_hf --source=RUN_OR_CONVERTED_DIR --out=/abs/path/igpt_s_hf

writes a folder that ``ImageGPTForCausalImageModeling.from_pretrained`` and ``ImageGPTImageProcessor.from_pretrained``
load: the model, and the processor with our palette as its clusters and the model's resolution as its size.

Tokens: the processor maps a pixel to ``argmin_j |x - c_j|^2`` with x the pixel scaled to [-1, 1]
(``(v / 255 - 0.5) / 0.5``) and c_j the clusters, computed as ``|x|^2 - 2 x.c_j + |c_j|^2`` in float32, ties to the
lowest index. `igpt_jax.data.palette.Palette.encode` uses the same colour space (``v / 127.5 - 1``), the same squared
distance and the same tie rule, but sums ``(x - c_j)^2`` per channel, which has no cancellation error; the two
disagree only where two clusters are within float32 rounding (~1e-7) of equally near a pixel. Measured on the first
2,000 CIFAR-10 training images with three sets of 512 random clusters: 1, 1 and 4 pixels of 2,048,000 differ
(``python bench/palette_vs_hf.py``). Resizing differs: the
processor resizes every image to its ``size`` (bilinear), our pipeline resizes with Pillow's area filter when
shrinking (`igpt_jax.data.augment`); for images already at the model's resolution (CIFAR-10 at 32x32) neither resizes.

How the port differs from our model, and how each piece maps (L layers, width d, H heads of size k, V colours):

    HF key (``transformer.`` prefix optional)   HF shape     ours
    wte.weight                                  [V + 1, d]   rows :V -> wte [V, d]; row V (the SOS id) -> sos [d]
    wpe.weight                                  [n, d]       wpe [n, d]
    h.i.ln_1.weight / ln_2.weight               [d]          blocks/ln_1/scale, blocks/ln_2/scale [L, d]
    h.i.attn.c_attn.weight (Conv1D, [in, out])  [d, 3d]      q | k | v side by side -> blocks/attn/{q,k,v} [L, d, H, k]
    h.i.attn.c_proj.weight                      [d, d]       blocks/attn/o [L, H, k, d]
    h.i.mlp.c_fc.weight / c_proj.weight         [d, 4d] ...  blocks/mlp/fc [L, d, 4d], blocks/mlp/proj [L, 4d, d]
    ln_f.weight                                 [d]          ln_f/scale [d]
    lm_head.weight (no prefix)                  [V, d]       wtet [V, d]
    h.i.attn.c_attn.bias, c_proj.bias, mlp.c_fc.bias, mlp.c_proj.bias: must be zero (our model has no biases);
    they are exactly zero in the converted OpenAI weights.

The HF model is fed ``[V] + x[:-1]`` (SOS first); its logits at position i then predict x_i, as ours do for ``x``.
Its dropouts default to 0.1: `model_config_to_hf_config` sets them to 0 (the paper trains without dropout).

torch and transformers are optional dependencies (the ``test`` extra): they are imported only inside the
functions that need them. Everything else takes and returns numpy arrays.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging

from igpt_jax import sharding
from igpt_jax.data.palette import Palette
from igpt_jax.errors import ConfigError
from igpt_jax.models.igpt import ModelConfig
from igpt_jax.models.layout import param_layout
from igpt_jax.pretrained import sources as pretrained
from igpt_jax.pretrained.sources import CONFIG_FILE, PALETTE_FILE, PARAMS_DIR

PREFIX = "transformer."
LM_HEAD = "lm_head.weight"
# Buffers that older checkpoints (pytorch_model.bin) carry next to the weights: the causal mask and its fill value.
_IGNORED_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_LAYER_KEY = re.compile(r"^h\.(\d+)\.")
_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
PROCESSOR_FILE = "preprocessor_config.json"  # the image processor of a save_pretrained folder


# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------


def _hf_get(hf_config: Any, *names: str, default: Any = None) -> Any:
    """Reads the first present attribute/key of `names` from an ImageGPTConfig or a config.json mapping."""
    for name in names:
        if isinstance(hf_config, Mapping):
            if name in hf_config:
                return hf_config[name]
        elif hasattr(hf_config, name):
            return getattr(hf_config, name)
    return default


def hf_config_to_model_config(hf_config: Any, **overrides: Any) -> ModelConfig:
    """Our `ModelConfig` for a Hugging Face `ImageGPTConfig` (or its config.json as a dict).

    The vocabulary is the HF one minus the SOS id; dropout is 0 (the paper's setting, whatever the HF config
    says) unless overridden. `overrides` are `ModelConfig` fields (e.g. ``attention='dense'``, ``remat='none'``).
    Settings that change the function computed (activation, attention scaling, cross-attention) must be iGPT's;
    ``tie_word_embeddings`` is not checked here: an lm_head tied to the 513-row wte fails the state dict's shape check.

    Raises:
      ValueError: when the HF config uses a feature our model does not have (naming the setting and the value).
    """
    n_embd = _hf_get(hf_config, "n_embd", "hidden_size")
    n_inner = _hf_get(hf_config, "n_inner")
    problems = []
    checks = {
        "activation_function": ("quick_gelu", _hf_get(hf_config, "activation_function", default="quick_gelu")),
        "scale_attn_weights": (True, _hf_get(hf_config, "scale_attn_weights", default=True)),
        "scale_attn_by_inverse_layer_idx": (
            False, _hf_get(hf_config, "scale_attn_by_inverse_layer_idx", default=False)
        ),
        "add_cross_attention": (False, _hf_get(hf_config, "add_cross_attention", default=False)),
    }
    for name, (want, got) in checks.items():
        if got != want:
            problems.append(f"{name}={got!r} (our model supports only {want!r})")
    if n_inner is not None and (n_inner % n_embd):
        problems.append(f"n_inner={n_inner} is not a multiple of n_embd={n_embd}")
    if problems:
        raise ValueError("Hugging Face ImageGPT config is not an iGPT our model can represent: " + "; ".join(problems))
    fields = dict(
        vocab_size=int(_hf_get(hf_config, "vocab_size")) - 1,
        n_ctx=int(_hf_get(hf_config, "n_positions", "max_position_embeddings")),
        d_model=int(n_embd),
        n_head=int(_hf_get(hf_config, "n_head", "num_attention_heads")),
        n_layer=int(_hf_get(hf_config, "n_layer", "num_hidden_layers")),
        mlp_ratio=4 if n_inner is None else int(n_inner) // int(n_embd),
        norm_eps=float(_hf_get(hf_config, "layer_norm_epsilon", default=1e-5)),
        objective="ar",
        dropout=0.0,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def model_config_to_hf_config(cfg: ModelConfig, **overrides: Any):
    """A `transformers.ImageGPTConfig` for our `ModelConfig`: vocab V + 1 (SOS), dropouts 0, quick GELU.

    `overrides` are passed on to `ImageGPTConfig` (e.g. ``resid_pdrop=0.1``).
    """
    from transformers import ImageGPTConfig  # optional dependency

    fields = dict(
        vocab_size=cfg.vocab_size + 1,
        n_positions=cfg.n_ctx,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.d_mlp,
        activation_function="quick_gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=cfg.norm_eps,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        tie_word_embeddings=False,
        architectures=["ImageGPTForCausalImageModeling"],
    )
    fields.update(overrides)
    return ImageGPTConfig(**fields)


# --------------------------------------------------------------------------------------------------------------
# State dict <-> parameters
# --------------------------------------------------------------------------------------------------------------


def _expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """HF key (without prefix) -> (symbolic shape, concrete shape, the config values it comes from)."""
    V, n, d, L, m = cfg.vocab_size, cfg.n_ctx, cfg.d_model, cfg.n_layer, cfg.d_mlp
    vd = f"model.vocab_size={V}, model.d_model={d}"
    dd = f"model.d_model={d}"
    dm = f"model.d_model={d}, model.mlp_ratio={cfg.mlp_ratio}"
    out = {
        "wte.weight": ("(V + 1, d)", (V + 1, d), vd + " (V colours plus the SOS row)"),
        "wpe.weight": ("(n, d)", (n, d), f"model.n_ctx={n}, model.d_model={d}"),
        "ln_f.weight": ("(d,)", (d,), dd),
    }
    for i in range(L):
        h = f"h.{i}."
        out[h + "ln_1.weight"] = ("(d,)", (d,), dd)
        out[h + "ln_2.weight"] = ("(d,)", (d,), dd)
        out[h + "attn.c_attn.weight"] = ("(d, 3d)", (d, 3 * d), dd)
        out[h + "attn.c_attn.bias"] = ("(3d,)", (3 * d,), dd)
        out[h + "attn.c_proj.weight"] = ("(d, d)", (d, d), dd)
        out[h + "attn.c_proj.bias"] = ("(d,)", (d,), dd)
        out[h + "mlp.c_fc.weight"] = ("(d, 4d)", (d, m), dm)
        out[h + "mlp.c_fc.bias"] = ("(4d,)", (m,), dm)
        out[h + "mlp.c_proj.weight"] = ("(4d, d)", (m, d), dm)
        out[h + "mlp.c_proj.bias"] = ("(d,)", (d,), dd)
    out[LM_HEAD] = ("(V, d)", (V, d), vd)
    return out


def _full_key(key: str) -> str:
    """The key as `ImageGPTForCausalImageModeling.state_dict()` names it."""
    return key if key == LM_HEAD else PREFIX + key


def _to_numpy(value: Any) -> np.ndarray:
    """A float32 numpy copy of a numpy/jax array or a torch tensor (any float dtype, any device)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    return np.array(value, dtype=np.float32, copy=True)


def _normalise_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Strips the optional ``transformer.`` prefix; refuses a key given both with and without it."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        short = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if short in out:
            raise ValueError(f"Hugging Face state dict has {short!r} both with and without the {PREFIX!r} prefix")
        out[short] = value
    return out


def check_hf_state_dict(state_dict: Mapping[str, Any], cfg: ModelConfig, *, bias_atol: float = 0.0) -> None:
    """Validates an HF state dict against `cfg` without building anything.

    Checks, in order: the number of layers; missing keys; unexpected keys (besides the causal-mask buffers
    ``h.i.attn.bias`` / ``h.i.attn.masked_bias`` of older checkpoints); every shape; and that every linear bias
    is zero (``max |b| <= bias_atol``; the default 0 means exactly zero, which converted OpenAI weights are).

    Raises:
      ValueError: naming each offending key, its shape or value, and what `cfg` expects.
    """
    sd = _normalise_keys(state_dict)
    expected = _expected_hf_shapes(cfg)

    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))})
    if layers and layers != list(range(cfg.n_layer)):
        raise ValueError(
            f"Hugging Face state dict has blocks h.{{{', '.join(map(str, layers))}}} "
            f"({len(layers)} layers), expected h.0..h.{cfg.n_layer - 1} for model.n_layer={cfg.n_layer}"
        )
    missing = [_full_key(k) for k in expected if k not in sd]
    if missing:
        hint = " (an ImageGPTModel without its lm_head?)" if missing == [LM_HEAD] else ""
        raise ValueError(f"Hugging Face state dict is missing {len(missing)} key(s){hint}: {missing}")
    unexpected = sorted(_full_key(k) for k in sd if k not in expected and not _IGNORED_BUFFER.match(k))
    if unexpected:
        raise ValueError(f"Hugging Face state dict has {len(unexpected)} unexpected key(s): {unexpected}")

    problems = []
    for key, (symbolic, shape, source) in expected.items():
        got = tuple(sd[key].shape)
        if got != shape:
            problems.append(f"{_full_key(key)} has shape {got}, expected {symbolic} = {shape} for {source}")
    if problems:
        raise ValueError("Hugging Face state dict does not match the model config:\n  " + "\n  ".join(problems))

    for i in range(cfg.n_layer):
        for lin in _LINEARS:
            key = f"h.{i}.{lin}.bias"
            worst = float(np.max(np.abs(_to_numpy(sd[key]))))
            if not worst <= bias_atol:  # also catches NaN
                raise ValueError(
                    f"{_full_key(key)} is not zero (max |bias| = {worst:.3g} > bias_atol={bias_atol}): our model has "
                    f"no linear biases, so this checkpoint cannot be converted without changing its outputs"
                )


def from_hf_state_dict(
    state_dict: Mapping[str, Any], cfg: ModelConfig, *, bias_atol: float = 0.0
) -> dict[str, Any]:
    """Our parameters from an `ImageGPTForCausalImageModeling` state dict.

    Args:
      state_dict: key -> torch tensor / numpy / jax array; keys with or without the ``transformer.`` prefix.
      cfg: the model config the parameters are for (e.g. from `hf_config_to_model_config`).
      bias_atol: largest |bias| accepted (and dropped) on the linear layers; 0 means exactly zero.

    Returns:
      A plain nested dict of float32 numpy arrays in our parameter tree (no LogicallyPartitioned boxes), usable
      as ``IGPT(cfg).apply({'params': params}, tokens)``.

    Raises:
      ValueError: from `check_hf_state_dict`, before any array is built.
    """
    check_hf_state_dict(state_dict, cfg, bias_atol=bias_atol)
    sd = _normalise_keys(state_dict)
    V, d, H, k, L = cfg.vocab_size, cfg.d_model, cfg.n_head, cfg.head_dim, cfg.n_layer

    def stack(name: str) -> np.ndarray:
        return np.stack([_to_numpy(sd[f"h.{i}.{name}"]) for i in range(L)])

    wte = _to_numpy(sd["wte.weight"])
    c_attn = stack("attn.c_attn.weight")  # [L, d, 3d]: columns q | k | v, each head-major (h * k + j)
    q, kk, v = (c_attn[:, :, s * d:(s + 1) * d].reshape(L, d, H, k) for s in range(3))
    return {
        "wte": wte[:V],
        "sos": wte[V],
        "wpe": _to_numpy(sd["wpe.weight"]),
        "wtet": _to_numpy(sd[LM_HEAD]),
        "ln_f": {"scale": _to_numpy(sd["ln_f.weight"])},
        "blocks": {
            "ln_1": {"scale": stack("ln_1.weight")},
            "ln_2": {"scale": stack("ln_2.weight")},
            "attn": {"q": q, "k": kk, "v": v, "o": stack("attn.c_proj.weight").reshape(L, H, k, d)},
            "mlp": {"fc": stack("mlp.c_fc.weight"), "proj": stack("mlp.c_proj.weight")},
        },
    }


def expected_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter tree's shapes, flattened with '/' separators."""
    V, n, d, H, k, L, m = cfg.vocab_size, cfg.n_ctx, cfg.d_model, cfg.n_head, cfg.head_dim, cfg.n_layer, cfg.d_mlp
    return {
        "wte": (V, d), "wpe": (n, d), "sos": (d,), "wtet": (V, d), "ln_f/scale": (d,),
        "blocks/ln_1/scale": (L, d), "blocks/ln_2/scale": (L, d),
        "blocks/attn/q": (L, d, H, k), "blocks/attn/k": (L, d, H, k), "blocks/attn/v": (L, d, H, k),
        "blocks/attn/o": (L, H, k, d), "blocks/mlp/fc": (L, d, m), "blocks/mlp/proj": (L, m, d),
    }


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_hf_state_dict(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The `ImageGPTForCausalImageModeling` state dict (float32 numpy, zero biases) for our parameters.

    Args:
      params: our parameter tree, plain or with LogicallyPartitioned boxes, numpy or jax arrays.
      cfg: its model config.

    Returns:
      key -> array with the HF names (``transformer.`` prefix, ``lm_head.weight``); the non-persistent causal-mask
      buffers are not included. `from_hf_state_dict` of it gives `params` back exactly.

    Raises:
      ValueError: naming any missing, unexpected or mis-shaped parameter.
    """
    flat = _flatten(nn.meta.unbox(params))
    expected = expected_param_shapes(cfg)
    problems = [f"missing parameter {name}" for name in expected if name not in flat]
    problems += [f"unexpected parameter {name}" for name in flat if name not in expected]
    problems += [
        f"{name} has shape {tuple(np.shape(flat[name]))}, expected {shape}"
        for name, shape in expected.items()
        if name in flat and tuple(np.shape(flat[name])) != shape
    ]
    if problems:
        raise ValueError(
            f"parameters do not match the model config (L={cfg.n_layer}, d={cfg.d_model}, H={cfg.n_head}, "
            f"V={cfg.vocab_size}, n={cfg.n_ctx}):\n  " + "\n  ".join(problems)
        )
    p = {name: _to_numpy(value) for name, value in flat.items()}
    L, d, m = cfg.n_layer, cfg.d_model, cfg.d_mlp
    sd = {
        PREFIX + "wte.weight": np.concatenate([p["wte"], p["sos"][None]], axis=0),
        PREFIX + "wpe.weight": p["wpe"],
    }
    for i in range(L):
        h = f"{PREFIX}h.{i}."
        sd[h + "ln_1.weight"] = p["blocks/ln_1/scale"][i]
        sd[h + "attn.c_attn.weight"] = np.concatenate(
            [p[f"blocks/attn/{s}"][i].reshape(d, d) for s in "qkv"], axis=1
        )
        sd[h + "attn.c_attn.bias"] = np.zeros((3 * d,), np.float32)
        sd[h + "attn.c_proj.weight"] = p["blocks/attn/o"][i].reshape(d, d)
        sd[h + "attn.c_proj.bias"] = np.zeros((d,), np.float32)
        sd[h + "ln_2.weight"] = p["blocks/ln_2/scale"][i]
        sd[h + "mlp.c_fc.weight"] = p["blocks/mlp/fc"][i]
        sd[h + "mlp.c_fc.bias"] = np.zeros((m,), np.float32)
        sd[h + "mlp.c_proj.weight"] = p["blocks/mlp/proj"][i]
        sd[h + "mlp.c_proj.bias"] = np.zeros((d,), np.float32)
    sd[PREFIX + "ln_f.weight"] = p["ln_f/scale"]
    sd[LM_HEAD] = p["wtet"]
    return {key: np.ascontiguousarray(value) for key, value in sd.items()}


# --------------------------------------------------------------------------------------------------------------
# torch-side helpers (need torch and transformers)
# --------------------------------------------------------------------------------------------------------------


def load_hf_pretrained(
    name_or_path: str, *, bias_atol: float = 0.0, model_overrides: Mapping[str, Any] | None = None, **kwargs: Any
) -> tuple[ModelConfig, dict[str, Any]]:
    """Loads an `ImageGPTForCausalImageModeling` checkpoint and converts it: returns (cfg, params).

    With a Hub name this is how OpenAI's released weights are loaded on a machine that can reach the Hugging Face
    Hub: ``openai/imagegpt-small`` (iGPT-S, 24 x 512), ``openai/imagegpt-medium`` (iGPT-M, 36 x 1024),
    ``openai/imagegpt-large`` (iGPT-L, 48 x 1536); all 32x32 (n_ctx 1024) with a 512-colour palette. A local
    folder written by ``save_pretrained`` works offline.

    Args:
      name_or_path: Hub model id or local folder.
      bias_atol: see `from_hf_state_dict`.
      model_overrides: `ModelConfig` fields to set on the returned config (e.g. attention, remat, dtype).
      **kwargs: passed to ``from_pretrained`` (e.g. revision, cache_dir, local_files_only).
    """
    import torch  # noqa: F401  (optional dependency)
    from transformers import ImageGPTForCausalImageModeling

    model = ImageGPTForCausalImageModeling.from_pretrained(name_or_path, **kwargs)
    cfg = hf_config_to_model_config(model.config, **dict(model_overrides or {}))
    return cfg, from_hf_state_dict(model.state_dict(), cfg, bias_atol=bias_atol)


def check_exportable(cfg: ModelConfig) -> None:
    """Refuses, in one line, a model that `ImageGPTForCausalImageModeling` would run as something else.

    The port's attention is always causal. A BERT model (bidirectional, trained to fill masked positions) would
    silently become a causal model with the wrong weights for it, so it is refused. (A prefix-causal model is
    exported, with the warning of `to_hf_model`: it was also trained on causal positions after its prefix.)

    Raises:
      ConfigError: `cfg.objective` is not 'ar'.
    """
    if cfg.objective != "ar":
        raise ConfigError(f"model.objective={cfg.objective!r}: only autoregressive ('ar') models can be exported to "
                          "ImageGPTForCausalImageModeling, whose attention is always causal")


def to_hf_model(params: Mapping[str, Any], cfg: ModelConfig, **hf_config_overrides: Any):
    """An eval-mode `ImageGPTForCausalImageModeling` (float32, dropouts 0) holding our parameters.

    A prefix-causal model is logged with a warning: the port runs it with an empty prefix, as our sampler does.

    Raises:
      ConfigError: the model is not autoregressive (`check_exportable`).
    """
    import torch
    from transformers import ImageGPTForCausalImageModeling

    check_exportable(cfg)
    if cfg.mask != "causal":
        logging.warning("model.mask=%r: ImageGPTForCausalImageModeling runs the model causally (an empty prefix), "
                        "as igpt_jax's sampler does; its bidirectional prefix features stay in igpt_jax", cfg.mask)
    model = ImageGPTForCausalImageModeling(model_config_to_hf_config(cfg, **hf_config_overrides))
    state = {key: torch.from_numpy(value) for key, value in to_hf_state_dict(params, cfg).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def hf_input_ids(tokens: Any, cfg: ModelConfig) -> np.ndarray:
    """HF input ids for our tokens [batch, length]: SOS (id V) followed by tokens[:, :-1]."""
    tokens = np.asarray(tokens)
    sos = np.full((tokens.shape[0], 1), cfg.vocab_size, dtype=np.int64)
    return np.concatenate([sos, tokens[:, :-1].astype(np.int64)], axis=1)


# --------------------------------------------------------------------------------------------------------------
# The palette: the image processor's clusters
# --------------------------------------------------------------------------------------------------------------


def load_hf_palette(name_or_path: str, **kwargs: Any) -> tuple[Palette, dict[str, Any]]:
    """The palette of an `ImageGPTImageProcessor` (its ``clusters``, already in [-1, 1]) and its settings.

    Returns:
      (Palette of the clusters as float32, the processor's dict: size, resample, do_normalize, ...).

    Raises:
      ValueError: a folder without an image processor (preprocessor_config.json) or a processor without clusters.
    """
    from transformers import ImageGPTImageProcessor  # optional dependency

    where = os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path
    if os.path.isdir(name_or_path) and not os.path.exists(os.path.join(name_or_path, PROCESSOR_FILE)):
        raise ValueError(f"{where} has no image processor ({PROCESSOR_FILE}): expected the folder to hold the "
                         "ImageGPTImageProcessor saved with save_pretrained next to the model (its clusters are the "
                         "palette)")
    try:
        processor = ImageGPTImageProcessor.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        raise ValueError(f"cannot load the image processor of {where}: expected an ImageGPTImageProcessor with its "
                         f"clusters (the palette) ({str(err).splitlines()[0] if str(err) else err!r})") from err
    clusters = getattr(processor, "clusters", None)
    if clusters is None:
        raise ValueError(f"the image processor of {where} has no clusters: expected the palette as "
                         "clusters [n_colors, 3]")
    centres = np.asarray(_to_numpy(clusters) if hasattr(clusters, "detach") else clusters, np.float32)
    return Palette(centres), processor.to_dict()


def hf_image_processor(palette: Palette, resolution: int):
    """An `ImageGPTImageProcessor` whose tokens are ours: clusters = the palette, resized to `resolution`.

    Raises:
      ValueError: a grayscale palette (the processor quantizes RGB only).
    """
    from transformers import ImageGPTImageProcessor  # optional dependency

    if palette.channels != 3:
        raise ValueError(f"the palette has {palette.channels} channel(s): ImageGPTImageProcessor quantizes RGB "
                         "colours only, expected 3")
    return ImageGPTImageProcessor(clusters=palette.centres.astype(np.float32),
                                  size={"height": int(resolution), "width": int(resolution)})


# --------------------------------------------------------------------------------------------------------------
# Converted models: what `igpt_jax.pretrained.sources` reads
# --------------------------------------------------------------------------------------------------------------


def save_params(directory: str, params: Mapping[str, Any], cfg: ModelConfig, palette: Palette) -> None:
    """Writes a converted model: ``params/`` (Orbax, plain tree), ``model_config.json`` and ``palette.json``.

    Raises:
      FileExistsError: the directory already holds parameters.
      ValueError: a palette whose size is not the vocabulary.
    """
    directory = os.path.abspath(directory)
    target = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(target):
        raise FileExistsError(f"{target} already exists; choose a new --out directory")
    if palette.k != cfg.vocab_size:
        raise ValueError(f"the palette has {palette.k} colours but the model's vocabulary is {cfg.vocab_size}: "
                         "expected one colour per token")
    os.makedirs(directory, exist_ok=True)
    tree = jax.tree.map(lambda x: np.asarray(x, np.float32), nn.meta.unbox(params))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, tree)
        ckptr.wait_until_finished()
    with open(os.path.join(directory, PALETTE_FILE), "w") as f:
        json.dump({"centres": np.asarray(palette.centres, np.float64).tolist()}, f)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:  # last: its presence marks a complete model
        json.dump(dataclasses.asdict(cfg), f, indent=2, sort_keys=True)


def load_params(directory: str, *, step: int = -1, check: Callable[[ModelConfig], None] | None = None
                ) -> tuple[ModelConfig, dict[str, Any], Palette]:
    """A pretrained model as numpy: (its config, plain float32 parameter tree, palette).

    `directory` is a converted model or a pretraining run (`step` of it; -1 = the latest), read through
    `igpt_jax.pretrained.sources` on one device. `check`, when given, sees the config before anything is restored
    (and may raise).
    """
    with pretrained.Source(directory) as source:
        step = source.resolve_step(step)
        cfg = source.model_config(step)
        if check is not None:
            check(cfg)
        palette = source.palette(step)
        mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
        params = source.restore_params(step, param_layout(cfg, mesh, sharding.DEFAULT_RULES))
    return cfg, jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params)), palette


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def export_from_hf(name_or_path: str, out: str, *, bias_atol: float = 0.0, **kwargs: Any) -> ModelConfig:
    """What ``--direction=from_hf`` does: the HF model and its processor's palette into a converted model `out`.

    Raises:
      FileExistsError: `out` already holds a model (checked before anything is downloaded).
      ValueError: no image processor, or a palette whose size is not the vocabulary (naming the source).
    """
    target = os.path.join(os.path.abspath(out), PARAMS_DIR)
    if os.path.exists(target):  # fail before downloading gigabytes
        raise FileExistsError(f"{target} already exists; choose a new --out directory")
    palette, processor = load_hf_palette(name_or_path, **kwargs)
    cfg, params = load_hf_pretrained(name_or_path, bias_atol=bias_atol, **kwargs)
    if palette.k != cfg.vocab_size:
        raise ValueError(f"the image processor of {name_or_path} has {palette.k} clusters but the model's vocabulary "
                         f"is {cfg.vocab_size} (+1 SOS): expected one cluster per colour token")
    size = processor.get("size") or {}
    side = math.isqrt(cfg.n_ctx)
    if processor.get("do_resize", True) and size.get("height") not in (None, side):
        print(f"Note: the image processor resizes to {size}, the model's context is {side}x{side}; our jobs use "
              f"data.resolution={side}.")
    save_params(out, params, cfg, palette)
    return cfg


def export_to_hf(source_dir: str, out: str, *, step: int = -1) -> ModelConfig:
    """What ``--direction=to_hf`` does: a run or converted model into a ``save_pretrained`` folder, palette included.

    `out` then holds the `ImageGPTForCausalImageModeling` (config.json and weights) and the `ImageGPTImageProcessor`
    (preprocessor_config.json) whose clusters are our palette and whose size is the model's resolution.
    """
    cfg, params, palette = load_params(source_dir, step=step, check=check_exportable)  # refused before restoring
    processor = hf_image_processor(palette, math.isqrt(cfg.n_ctx))  # refuses grayscale before writing anything
    out = os.path.abspath(out)
    to_hf_model(params, cfg).save_pretrained(out)
    processor.save_pretrained(out)
    return cfg


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    FLAGS = flags.FLAGS
    if not FLAGS.out:
        raise app.UsageError("--out=DIR is required")
    out = os.path.abspath(FLAGS.out)
    if FLAGS.direction == "from_hf":
        if not FLAGS.hf:
            raise app.UsageError("--direction=from_hf needs --hf=HUB_ID_OR_FOLDER")
        cfg = export_from_hf(FLAGS.hf, out, bias_atol=FLAGS.bias_atol)
    else:
        source = FLAGS.source or FLAGS.params
        if not source:
            raise app.UsageError("--direction=to_hf needs --source=DIR (a pretraining run's workdir or a converted "
                                 "model)")
        try:
            cfg = export_to_hf(source, out, step=FLAGS.step)
        except ConfigError as error:
            raise app.UsageError(str(error)) from None
    logging.info("wrote %s for %s", out, cfg)
    print(out)


if __name__ == "__main__":
    flags.DEFINE_enum("direction", "from_hf", ["from_hf", "to_hf"], "Convert from or to the Hugging Face port.")
    flags.DEFINE_string("hf", None, "from_hf: Hub id (e.g. openai/imagegpt-small) or save_pretrained folder.")
    flags.DEFINE_string("source", None, "to_hf: a pretraining run's workdir or a converted model's folder.")
    flags.DEFINE_string("params", None, "to_hf: the same as --source (older name).")
    flags.DEFINE_integer("step", -1, "to_hf from a run: the checkpoint step (-1 = the latest).")
    flags.DEFINE_string("out", None, "Output directory (made absolute).")
    flags.DEFINE_float("bias_atol", 0.0, "from_hf: largest |linear bias| accepted and dropped (0 = exactly zero).")
    app.run(main)
