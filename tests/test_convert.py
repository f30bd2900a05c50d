"""Weight interchange with the Hugging Face port: logits parity both ways, exact round trip, clear errors."""

from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_models import random_hf_model  # noqa: E402

from igpt_jax.data.palette import Palette  # noqa: E402
from igpt_jax.models.igpt import IGPT, ModelConfig, abstract_params  # noqa: E402
from igpt_jax.pretrained import convert  # noqa: E402

TOL = 1e-4
# Tiny but complete: 2 layers, width 64, 4 heads, 64 positions (8x8), the real 512-colour vocabulary.
HF_KW = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=513)


def _random_hf_model(seed: int):
    return random_hf_model(seed, **HF_KW)


def _hf_logits(model, tokens: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    ids = torch.from_numpy(convert.hf_input_ids(tokens, cfg))
    with torch.no_grad():
        return model(input_ids=ids).logits.numpy()


@functools.cache
def _jitted_logits(cfg: ModelConfig):
    return jax.jit(lambda params, tokens: IGPT(cfg).apply({"params": params}, tokens).logits)


def _our_logits(params, tokens: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return np.asarray(_jitted_logits(cfg)(params, tokens))


def _tokens(seed: int, batch: int, length: int, vocab: int = 512) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int32)


def test_config_round_trip():
    hf_cfg = transformers.ImageGPTConfig(**HF_KW)
    cfg = convert.hf_config_to_model_config(hf_cfg)
    assert (cfg.vocab_size, cfg.n_ctx, cfg.d_model, cfg.n_head, cfg.n_layer, cfg.mlp_ratio) == (512, 64, 64, 4, 2, 4)
    assert cfg.dropout == 0.0 and cfg.norm_eps == 1e-5 and cfg.objective == "ar"
    back = convert.model_config_to_hf_config(cfg)
    assert back.vocab_size == 513 and back.n_positions == 64 and back.activation_function == "quick_gelu"
    assert back.resid_pdrop == back.embd_pdrop == back.attn_pdrop == 0.0
    assert convert.hf_config_to_model_config(back.to_dict()) == cfg  # config.json dicts work too
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True"):
        convert.hf_config_to_model_config(transformers.ImageGPTConfig(**HF_KW, scale_attn_by_inverse_layer_idx=True))


@pytest.mark.parametrize("attention", ["dense", "blockwise"])
def test_hf_to_ours_logits_match(attention):
    diffs = []
    for seed in range(3):
        model = _random_hf_model(seed)
        cfg = convert.hf_config_to_model_config(model.config, attention=attention, attention_block=16, remat="none")
        params = convert.from_hf_state_dict(model.state_dict(), cfg)
        tokens = _tokens(seed, batch=3, length=cfg.n_ctx)
        ours, theirs = _our_logits(params, tokens, cfg), _hf_logits(model, tokens, cfg)
        assert ours.shape == theirs.shape == (3, cfg.n_ctx, 512)
        assert np.std(theirs) > 0.5  # non-trivial logits: a broken mapping could not pass by accident
        diffs.append(float(np.max(np.abs(ours - theirs))))
    print(f"HF -> ours ({attention}) max abs logit differences: {diffs}")
    assert max(diffs) < TOL, diffs


def test_hf_to_ours_shorter_sequence_and_unprefixed_keys():
    model = _random_hf_model(7)
    cfg = convert.hf_config_to_model_config(model.config, attention="dense", remat="none")
    bare = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    params = convert.from_hf_state_dict(bare, cfg)
    tokens = _tokens(7, batch=2, length=37)
    diff = np.max(np.abs(_our_logits(params, tokens, cfg) - _hf_logits(model, tokens, cfg)))
    assert diff < TOL, diff


def _random_params(cfg: ModelConfig, seed: int) -> dict:
    """Our parameter tree with every leaf random (wtet too, which our init leaves at zero; norms around 1)."""
    rng = np.random.default_rng(seed)
    params: dict = {}
    for name, shape in convert.expected_param_shapes(cfg).items():
        node = params
        *parents, leaf = name.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        if name.endswith("scale"):
            node[leaf] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            node[leaf] = rng.normal(0.0, 0.3 if leaf in ("wte", "wpe", "sos") else 0.15, shape).astype(np.float32)
    return params


def test_ours_to_hf_logits_match_and_round_trip_is_exact():
    cfg = ModelConfig(vocab_size=512, n_ctx=64, d_model=64, n_head=4, n_layer=2, attention="dense", remat="none")
    params = _random_params(cfg, 0)
    state = convert.to_hf_state_dict(params, cfg)
    assert state["transformer.wte.weight"].shape == (513, 64) and state["lm_head.weight"].shape == (512, 64)
    np.testing.assert_array_equal(state["transformer.wte.weight"][512], params["sos"])
    assert not np.any(state["transformer.h.1.attn.c_attn.bias"])
    model = convert.to_hf_model(params, cfg)
    tokens = _tokens(1, batch=3, length=64)
    theirs = _hf_logits(model, tokens, cfg)
    diff = float(np.max(np.abs(_our_logits(params, tokens, cfg) - theirs)))
    print(f"ours -> HF max abs logit difference: {diff}")
    assert np.std(theirs) > 0.5 and diff < TOL, diff

    back = convert.from_hf_state_dict(state, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert a.dtype == np.float32 and np.array_equal(a, b)
    # and from_hf -> to_hf is exact too, for a real HF state dict
    sd = {k: v.numpy() for k, v in _random_hf_model(3).state_dict().items()}
    again = convert.to_hf_state_dict(convert.from_hf_state_dict(sd, cfg), cfg)
    assert set(again) == set(sd) and all(np.array_equal(again[k], sd[k]) for k in sd)


def test_tree_matches_model_init_and_boxed_params_are_accepted():
    """Our converter's tree is exactly `init_params`' (abstractly: no compile), boxes and all."""
    cfg = ModelConfig(vocab_size=512, n_ctx=16, d_model=32, n_head=4, n_layer=3, remat="none")
    abstract = abstract_params(cfg)
    plain = _random_params(cfg, 2)
    assert jax.tree.structure(nn.meta.unbox(abstract)) == jax.tree.structure(plain)
    for a, b in zip(jax.tree.leaves(nn.meta.unbox(abstract)), jax.tree.leaves(plain)):
        assert a.shape == b.shape
    boxed = jax.tree.map(lambda box, v: box.replace_boxed(v), abstract, plain,
                         is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert isinstance(boxed["wte"], nn.LogicallyPartitioned)
    state = convert.to_hf_state_dict(boxed, cfg)
    assert all(np.array_equal(state[k], v) for k, v in convert.to_hf_state_dict(plain, cfg).items())


# ---------------------------------------------------------------------------------------------- bad checkpoints


@pytest.fixture(scope="module")
def hf_state():
    model = _random_hf_model(11)
    return {k: v.clone() for k, v in model.state_dict().items()}, convert.hf_config_to_model_config(model.config)


def test_shape_mismatch_names_key_and_expected_shape(hf_state):
    sd, cfg = hf_state
    wide = cfg.replace(d_model=128, n_head=4)
    with pytest.raises(ValueError) as e:
        convert.from_hf_state_dict(sd, wide)
    msg = str(e.value)
    assert "transformer.h.1.attn.c_attn.weight has shape (64, 192), expected (d, 3d) = (128, 384)" in msg
    assert "model.d_model=128" in msg

    with pytest.raises(ValueError, match=r"transformer\.wte\.weight has shape \(513, 64\), expected \(V \+ 1, d\) = "
                                         r"\(257, 64\) for model\.vocab_size=256"):
        convert.from_hf_state_dict(sd, cfg.replace(vocab_size=256))
    with pytest.raises(ValueError, match=r"transformer\.wpe\.weight has shape \(64, 64\), expected \(n, d\) = "
                                         r"\(256, 64\) for model\.n_ctx=256"):
        convert.from_hf_state_dict(sd, cfg.replace(n_ctx=256))
    with pytest.raises(ValueError, match=r"2 layers\), expected h\.0\.\.h\.3 for model\.n_layer=4"):
        convert.from_hf_state_dict(sd, cfg.replace(n_layer=4))


def test_missing_and_unexpected_keys(hf_state):
    sd, cfg = hf_state
    missing = {k: v for k, v in sd.items() if k != "transformer.h.0.mlp.c_fc.weight"}
    with pytest.raises(ValueError, match=r"missing 1 key\(s\).*'transformer\.h\.0\.mlp\.c_fc\.weight'"):
        convert.from_hf_state_dict(missing, cfg)
    no_head = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"lm_head"):
        convert.from_hf_state_dict(no_head, cfg)
    extra = dict(sd, **{"transformer.h.0.attn.q_attn.weight": torch.zeros(64, 64)})
    with pytest.raises(ValueError, match=r"unexpected key\(s\): \['transformer\.h\.0\.attn\.q_attn\.weight'\]"):
        convert.from_hf_state_dict(extra, cfg)
    # the causal-mask buffers of older pytorch_model.bin checkpoints are ignored
    buffers = dict(sd)
    buffers.update({"transformer.h.0.attn.bias": torch.ones(1, 1, 64, 64), "h.1.attn.masked_bias": torch.tensor(-1e4)})
    convert.check_hf_state_dict(buffers, cfg)


def test_nonzero_bias_is_refused(hf_state):
    sd, cfg = hf_state
    bad = dict(sd)
    bad["transformer.h.1.mlp.c_proj.bias"] = sd["transformer.h.1.mlp.c_proj.bias"].clone()
    bad["transformer.h.1.mlp.c_proj.bias"][5] = 1e-3
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_proj\.bias is not zero \(max \|bias\| = 0\.001"):
        convert.from_hf_state_dict(bad, cfg)
    convert.from_hf_state_dict(bad, cfg, bias_atol=1e-2)  # explicitly tolerated


def test_to_hf_shape_mismatch(hf_state):
    sd, cfg = hf_state
    params = convert.from_hf_state_dict(sd, cfg)
    with pytest.raises(ValueError, match=r"blocks/attn/q has shape \(2, 64, 4, 16\), expected \(2, 64, 8, 8\)"):
        convert.to_hf_state_dict(params, cfg.replace(n_head=8))


def test_orbax_export_round_trip(hf_state, tmp_path):
    sd, cfg = hf_state
    params = convert.from_hf_state_dict(sd, cfg)
    palette = Palette(np.random.default_rng(0).uniform(-1, 1, (cfg.vocab_size, 3)))
    out = tmp_path / "igpt_export"
    convert.save_params(str(out), params, cfg, palette)
    assert json.loads((out / convert.CONFIG_FILE).read_text())["d_model"] == 64
    cfg2, restored, palette2 = convert.load_params(str(out))
    assert cfg2 == cfg and np.array_equal(palette2.centres, palette.centres)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        assert isinstance(a, np.ndarray) and np.array_equal(a, b)
    with pytest.raises(FileExistsError):
        convert.save_params(str(out), params, cfg, palette)
    assert os.path.isdir(out / convert.PARAMS_DIR)
    with pytest.raises(ValueError, match="the palette has 16 colours but the model's vocabulary is 512"):
        convert.save_params(str(tmp_path / "other"), params, cfg, Palette(np.zeros((16, 3))))


def test_cli_functions_round_trip_through_folders(tmp_path):
    """What ``python -m igpt_jax.pretrained.convert`` does, both directions, on a local save_pretrained folder."""
    model = _random_hf_model(5)
    model.save_pretrained(str(tmp_path / "hf_in"))
    clusters = np.random.default_rng(5).uniform(-1, 1, (512, 3)).astype(np.float32)
    transformers.ImageGPTImageProcessor(clusters=clusters, size={"height": 8, "width": 8}).save_pretrained(
        str(tmp_path / "hf_in"))
    cfg = convert.export_from_hf(str(tmp_path / "hf_in"), str(tmp_path / "ours"))
    assert cfg == convert.hf_config_to_model_config(model.config)
    with pytest.raises(FileExistsError, match="already exists"):
        convert.export_from_hf(str(tmp_path / "hf_in"), str(tmp_path / "ours"))
    convert.export_to_hf(str(tmp_path / "ours"), str(tmp_path / "hf_out"))
    back = transformers.ImageGPTForCausalImageModeling.from_pretrained(str(tmp_path / "hf_out")).state_dict()
    original = model.state_dict()
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)
    processor = transformers.ImageGPTImageProcessor.from_pretrained(str(tmp_path / "hf_out"))
    np.testing.assert_array_equal(np.asarray(processor.clusters, np.float32), clusters)
    assert processor.size["height"] == 8  # the model's resolution (n_ctx 64)


def test_export_refuses_a_bert_model_and_warns_for_a_prefix_model(hf_state, tmp_path, caplog):
    """The port's attention is causal: a BERT model is refused in one line before anything is written; a
    prefix-causal model is exported (the port runs it with an empty prefix, as our sampler does) with a warning."""
    sd, cfg = hf_state
    palette = Palette(np.random.default_rng(0).uniform(-1, 1, (cfg.vocab_size, 3)))
    bert = cfg.replace(objective="bert")
    bert_params = jax.tree.map(np.asarray, IGPT(bert).init(jax.random.key(0), np.zeros((1, 64), np.int32))["params"])
    convert.save_params(str(tmp_path / "bert"), nn.unbox(bert_params), bert, palette)
    with pytest.raises(convert.ConfigError, match=r"^model\.objective='bert': only autoregressive \('ar'\) models"):
        convert.export_to_hf(str(tmp_path / "bert"), str(tmp_path / "bert_hf"))
    assert not (tmp_path / "bert_hf").exists()

    prefix = cfg.replace(mask="prefix")
    convert.save_params(str(tmp_path / "prefix"), convert.from_hf_state_dict(sd, cfg), prefix, palette)
    with caplog.at_level("WARNING"):
        assert convert.export_to_hf(str(tmp_path / "prefix"), str(tmp_path / "prefix_hf")) == prefix
    assert "model.mask='prefix': ImageGPTForCausalImageModeling runs the model causally" in caplog.text
    back = transformers.ImageGPTForCausalImageModeling.from_pretrained(str(tmp_path / "prefix_hf")).state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert caplog.text.count("runs the model causally") == 1
