"""The VQ-VAE of paper appendix A.2: a small convolutional autoencoder with an EMA-updated codebook.

    image [b, R, R, C] in [-1, 1]
      -> encoder: `downsample` x (4x4 stride-2 conv to 64 channels, ReLU, residual stack)  -> z [b, g, g, 64]
      -> nearest code of the codebook [K, 64]                                              -> codes [b, g, g]
      -> decoder: `downsample` x (residual stack, ReLU, 4x4 stride-2 transposed conv)      -> [b, R, R, C]
    with g = R / 2**downsample (one block: 32 -> 16, 96 -> 48; two blocks: 192 -> 48).

A residual stack (van den Oord et al. 2017, with 32 hidden units as in the paper) is `residual_layers` times
``h + conv1x1(relu(conv3x3(relu(h))))`` (64 -> 32 -> 64 channels), followed by a ReLU.

The codebook is not a parameter: it is updated by exponential moving averages of the cluster sizes and sums of the
encoder outputs assigned to each code (Laplace-smoothed), and codes whose averaged usage falls below a fraction of
the expected usage (batch x grid / vocabulary) are revived at a random encoder output of the batch plus small noise
(paper A.2; Jukebox's bottleneck does the same). The update and the revival are pure functions of
(`CodebookState`, encoder outputs, codes, key), so they can be tested against a direct computation.

Losses (paper A.2): L2 reconstruction divided by the data variance, plus 0.02 x the commitment loss
``|z - sg(e)|^2`` divided by the variance of the encoder outputs (both rescaled to unit variance); the decoder sees
``z + sg(e - z)`` (straight-through estimator), so reconstruction gradients reach the encoder.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

CODE_DIM = 64  # paper: 64 channels for resampling convolutions and the codebook
RESIDUAL_HIDDEN = 32  # paper: 32 hidden units in the residual branch


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """The VQ-VAE's architecture and codebook settings (``config.vqvae``)."""

    vocab_size: int = 512
    downsample: int = 1  # encoder blocks: 1 -> 2x (32 -> 16, 96 -> 48), 2 -> 4x (192 -> 48)
    channels: int = 3
    width: int = CODE_DIM
    residual_hidden: int = RESIDUAL_HIDDEN
    residual_layers: int = 1  # residual layers per block
    decay: float = 0.99  # EMA decay of cluster sizes and sums
    epsilon: float = 1e-5  # Laplace smoothing of the cluster sizes
    commitment: float = 0.02  # beta of the commitment loss (paper A.2)
    dead_fraction: float = 0.1  # a code is dead below this fraction of its expected usage
    revive_noise: float = 0.01  # revived code = encoder output + this x its std x N(0, 1)

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict | dict) -> VQVAEConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(cfg).items() if k in fields})

    @property
    def factor(self) -> int:
        return 2**self.downsample

    def grid(self, resolution: int) -> int:
        """The code grid side for images of `resolution`.

        Raises:
          ValueError: the resolution is not a multiple of 2**downsample.
        """
        if resolution < self.factor or resolution % self.factor:
            raise ValueError(f"data.resolution={resolution} is not divisible by the encoder's downsampling factor "
                             f"{self.factor} (vqvae.downsample={self.downsample})")
        return resolution // self.factor


class ResidualStack(nn.Module):
    """``residual_layers`` x (h + conv1x1(relu(conv3x3(relu(h))))), then ReLU."""

    width: int
    hidden: int
    layers: int

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:  # [b, H, W, width]
        for i in range(self.layers):
            branch = nn.Conv(self.hidden, (3, 3), padding="SAME", name=f"res{i}_conv3")(nn.relu(h))
            h = h + nn.Conv(self.width, (1, 1), name=f"res{i}_conv1")(nn.relu(branch))
        return nn.relu(h)


class Encoder(nn.Module):
    cfg: VQVAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [b, R, R, C] -> [b, R/f, R/f, width]
        h = x
        for i in range(self.cfg.downsample):
            h = nn.Conv(self.cfg.width, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)), name=f"down{i}")(h)
            h = ResidualStack(self.cfg.width, self.cfg.residual_hidden, self.cfg.residual_layers,
                              name=f"res_stack{i}")(nn.relu(h))
        return h


class Decoder(nn.Module):
    cfg: VQVAEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:  # [b, g, g, width] -> [b, g*f, g*f, C]
        h = z
        for i in range(self.cfg.downsample):
            h = ResidualStack(self.cfg.width, self.cfg.residual_hidden, self.cfg.residual_layers,
                              name=f"res_stack{i}")(h)
            out = self.cfg.channels if i == self.cfg.downsample - 1 else self.cfg.width
            # Transposed 4x4 stride-2 convolution; padding 'SAME' doubles the size exactly.
            h = nn.ConvTranspose(out, (4, 4), strides=(2, 2), padding="SAME", name=f"up{i}")(nn.relu(h))
        return h


class VQVAE(nn.Module):
    """Encoder and decoder (the parameters); quantisation uses a codebook passed in."""

    cfg: VQVAEConfig

    def setup(self) -> None:
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)

    def encode(self, x: jax.Array) -> jax.Array:
        return self.encoder(x)

    def decode(self, z: jax.Array) -> jax.Array:
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:  # init: both halves
        return self.decoder(self.encoder(x))


# ------------------------------------------------------------------ codebook (pure functions)
@flax.struct.dataclass
class CodebookState:
    """EMA statistics and the codebook they define."""

    embeddings: jax.Array  # [K, D]
    cluster_size: jax.Array  # [K], EMA of codes' counts per batch
    embed_sum: jax.Array  # [K, D], EMA of the sums of the vectors assigned to each code


def init_codebook(cfg: VQVAEConfig, key: jax.Array) -> CodebookState:
    """Random codes with zero usage: every code is dead at the first step and revived from the batch's encoder
    outputs, which initialises the codebook from data (as Jukebox does)."""
    embeddings = jax.random.normal(key, (cfg.vocab_size, cfg.width), jnp.float32)
    return CodebookState(embeddings, jnp.zeros((cfg.vocab_size,), jnp.float32), jnp.zeros_like(embeddings))


def nearest_codes(z: jax.Array, embeddings: jax.Array) -> jax.Array:
    """Index of the nearest code (squared L2, ties to the lowest index) of each row of z [N, D] -> int32 [N]."""
    distances = (jnp.sum(z * z, axis=1, keepdims=True) - 2.0 * z @ embeddings.T
                 + jnp.sum(embeddings * embeddings, axis=1)[None, :])  # [N, K]
    return jnp.argmin(distances, axis=1).astype(jnp.int32)


def ema_update(state: CodebookState, z: jax.Array, codes: jax.Array, *, decay: float, epsilon: float
               ) -> CodebookState:
    """One EMA step of the codebook from encoder outputs z [N, D] assigned to `codes` [N].

    cluster_size <- decay * cluster_size + (1 - decay) * counts
    embed_sum    <- decay * embed_sum + (1 - decay) * (sum of the z assigned to each code)
    embeddings   =  embed_sum / smoothed cluster_size, with Laplace smoothing
                    n * (cluster_size + eps) / (n + K * eps), n = sum(cluster_size).
    """
    k = state.embeddings.shape[0]
    onehot = jax.nn.one_hot(codes, k, dtype=z.dtype)  # [N, K]
    counts = jnp.sum(onehot, axis=0)  # [K]
    sums = onehot.T @ z  # [K, D]
    cluster_size = decay * state.cluster_size + (1.0 - decay) * counts
    embed_sum = decay * state.embed_sum + (1.0 - decay) * sums
    n = jnp.sum(cluster_size)
    smoothed = (cluster_size + epsilon) / (n + k * epsilon) * n
    # A code with no usage keeps its vector (0 / 0 otherwise at the first steps).
    embeddings = jnp.where(smoothed[:, None] > 0, embed_sum / jnp.maximum(smoothed, 1e-12)[:, None],
                           state.embeddings)
    return CodebookState(embeddings, cluster_size, embed_sum)


def expected_usage(num_vectors: int, vocab_size: int) -> float:
    """Codes' expected count per batch under uniform use: batch x grid / vocabulary (paper: 128 x 48^2 / 4096 = 72)."""
    return num_vectors / vocab_size


def revive_dead_codes(state: CodebookState, z: jax.Array, key: jax.Array, *, dead_fraction: float,
                      noise: float) -> tuple[CodebookState, jax.Array]:
    """Codes whose EMA usage is below `dead_fraction` x the expected usage move to a random encoder output of the
    batch plus ``noise x std(z) x N(0, 1)``; their usage restarts at the threshold, so a revived code that the
    next batch does not pick is dead again and moves to another encoder output (as in Jukebox's bottleneck).

    Args:
      state: the codebook after this step's EMA update.
      z: float [N, D], this batch's encoder outputs.
      key: the step's key (the revival is a function of it).

    Returns:
      (the new state, int32 number of codes revived).
    """
    k, d = state.embeddings.shape
    expected = expected_usage(z.shape[0], k)
    threshold = dead_fraction * expected
    dead = state.cluster_size < threshold  # [K]
    pick_key, noise_key = jax.random.split(key)
    picks = jax.random.randint(pick_key, (k,), 0, z.shape[0])
    scale = noise * jnp.std(z)
    fresh = z[picks] + scale * jax.random.normal(noise_key, (k, d), z.dtype)  # [K, D]
    embeddings = jnp.where(dead[:, None], fresh, state.embeddings)
    cluster_size = jnp.where(dead, jnp.asarray(threshold, z.dtype), state.cluster_size)
    embed_sum = jnp.where(dead[:, None], fresh * threshold, state.embed_sum)
    return CodebookState(embeddings, cluster_size, embed_sum), jnp.sum(dead).astype(jnp.int32)


def perplexity(codes: jax.Array, vocab_size: int) -> jax.Array:
    """exp(entropy) of the codes' empirical distribution: the effective number of codes in use."""
    probs = jnp.bincount(codes.reshape(-1), length=vocab_size) / codes.size
    return jnp.exp(-jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.maximum(probs, 1e-30)), 0.0)))


# ------------------------------------------------------------------ forward and losses
def quantize(z: jax.Array, embeddings: jax.Array) -> tuple[jax.Array, jax.Array]:
    """z [b, g, g, D] -> (codes int32 [b, g, g], straight-through quantised z: z + sg(e - z))."""
    flat = z.reshape(-1, z.shape[-1])
    codes = nearest_codes(flat, embeddings)
    quantized = embeddings[codes].reshape(z.shape)
    return codes.reshape(z.shape[:-1]), z + jax.lax.stop_gradient(quantized - z)


def loss_and_aux(params: Any, model: VQVAE, codebook: CodebookState, images: jax.Array, *, data_variance: float,
                 commitment: float, mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss (recon / data variance + commitment x |z - sg(e)|^2 / var(z)) and what the step needs.

    Args:
      images: float [b, R, R, C] in [-1, 1].
      mask: bool [b]; False rows (padding) do not count.
    """
    z = model.apply({"params": params}, images, method=VQVAE.encode)  # [b, g, g, D]
    codes, z_st = quantize(z, codebook.embeddings)
    recon = model.apply({"params": params}, z_st, method=VQVAE.decode)
    weights = jnp.ones(images.shape[0], jnp.float32) if mask is None else mask.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(weights), 1.0)
    mse = jnp.sum(jnp.mean(jnp.square(recon - images), axis=(1, 2, 3)) * weights) / denom
    commit = jnp.sum(jnp.mean(jnp.square(z - jax.lax.stop_gradient(codebook.embeddings[codes])), axis=(1, 2, 3))
                     * weights) / denom
    z_var = jax.lax.stop_gradient(jnp.var(z)) + 1e-6
    recon_loss = mse / data_variance
    commit_loss = commit / z_var
    loss = recon_loss + commitment * commit_loss
    return loss, {"z": z, "codes": codes, "recon": recon, "mse": mse, "recon_loss": recon_loss,
                  "commit_loss": commit_loss}


def count_params(params: Any) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def init_params(cfg: VQVAEConfig, key: jax.Array, resolution: int) -> Any:
    cfg.grid(resolution)
    return VQVAE(cfg).init(key, jnp.zeros((1, resolution, resolution, cfg.channels), jnp.float32))["params"]
