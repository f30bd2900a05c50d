"""An independent float64 numpy implementation of the released iGPT forward pass (../shared/REFERENCE.md).

Written from the reference's description, not from igpt_jax.models.igpt, so that the two can be compared.
"""

import numpy as np


def _rms(x, g, eps=1e-5):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def forward(params, tokens, *, causal=True, bert_mask=None, eps=1e-5):
    """Returns (logits [b, t, V], per-layer ln_1 means [b, L, d], ln_f mean [b, d])."""
    p = {k: v for k, v in params.items()}
    wte, wpe, sos, wtet = (np.asarray(p[k], np.float64) for k in ("wte", "wpe", "sos", "wtet"))
    blocks = {k: {kk: np.asarray(vv, np.float64) for kk, vv in v.items()} for k, v in p["blocks"].items()}
    b, t = tokens.shape
    emb = wte[tokens]
    if causal:
        x = np.concatenate([np.broadcast_to(sos, (b, 1, sos.shape[0])), emb[:, :-1]], axis=1)
    else:
        x = np.where(bert_mask[..., None], 0.0, emb) if bert_mask is not None else emb
    x = x + wpe[:t]
    n_layer = blocks["ln_1"]["scale"].shape[0]
    feats = []
    for l in range(n_layer):
        h = _rms(x, blocks["ln_1"]["scale"][l], eps)
        feats.append(h.mean(axis=1))
        q = np.einsum("btd,dhk->bhtk", h, blocks["attn"]["q"][l])
        k = np.einsum("btd,dhk->bhtk", h, blocks["attn"]["k"][l])
        v = np.einsum("btd,dhk->bhtk", h, blocks["attn"]["v"][l])
        s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
        if causal:
            s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v  # [b, h, t, k]
        x = x + np.einsum("bhtk,hkd->btd", a, blocks["attn"]["o"][l])
        h2 = _rms(x, blocks["ln_2"]["scale"][l], eps)
        m = h2 @ blocks["mlp"]["fc"][l]
        m = m / (1.0 + np.exp(-1.702 * m))
        x = x + m @ blocks["mlp"]["proj"][l]
    hf = _rms(x, np.asarray(p["ln_f"]["scale"], np.float64), eps)
    return hf @ wtet.T, np.stack(feats, axis=1), hf.mean(axis=1)
