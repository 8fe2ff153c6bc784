"""Logit processing shared by every model in a hierarchy.

A draft must report exactly the distribution it sampled from (research.md §2), so the target,
the drafts and plain AR all go through `distribution` here: temperature, then top-k, then top-p,
in the order transformers applies them. Temperature 0 is greedy: a one-hot at the argmax. A
temperature below MIN_TEMPERATURE is greedy too: it is that limit, and dividing float32 logits by
it would overflow (1e-45 turned every logit into +-inf and every draw into token 0).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

import hsd_jax.models.cpu_kernel as cpu_kernel

MIN_TEMPERATURE = 1e-4  # below this (and above 0) sampling is greedy: the limit T -> 0


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not _is_real(t) or math.isnan(t) or t < 0 or math.isinf(t):
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {t!r}")
        if isinstance(k, np.integer) and not isinstance(k, np.bool_):
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {k!r}")
        if vocab_size is not None and k > vocab_size:
            raise ValueError(
                f"top_k={k} exceeds the vocabulary size {vocab_size}; use top_k <= {vocab_size} or 0"
            )
        if not _is_real(p) or math.isnan(p) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {p!r}")
        t = float(t) if t >= MIN_TEMPERATURE else 0.0
        return dataclasses.replace(self, temperature=t, top_k=k, top_p=float(p))


def distribution(logits: jax.Array, params: SamplingParams, *, kernel: bool = False) -> jax.Array:
    """Processed next-token probabilities [..., V] (float32) that `sample` draws from; with `kernel`
    (see `on_kernel`) the softmax runs on our CPU kernel."""
    logits = logits.astype(jnp.float32)
    if params.greedy:
        return jax.nn.one_hot(argmax(logits, kernel=kernel), logits.shape[-1], dtype=jnp.float32)
    temperature = params.temperature
    if params.top_k or params.top_p < 1.0:
        logits, temperature = logits / temperature, 1.0
    neg_inf = jnp.finfo(jnp.float32).min
    if params.top_k:
        kth = jax.lax.top_k(logits, params.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if params.top_p < 1.0:
        # transformers' TopP: drop the tokens whose mass, counted from the least likely up,
        # is <= 1 - top_p. In descending order: keep a token iff the mass strictly before it < top_p.
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        kept = jnp.sum(mass_before < params.top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_logits, kept - 1, axis=-1)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    if kernel:
        return cpu_kernel.softmax(logits, temperature)
    return jax.nn.softmax(logits / temperature, axis=-1)


_BLOCK = 256


def _first_above(cdf: jax.Array, u: jax.Array, mass: jax.Array) -> jax.Array:
    """The first index whose cumulative mass exceeds u, never an index with no mass (the last
    index where none has any)."""
    index = jnp.sum(cdf <= u, axis=-1)
    last_positive = mass.shape[-1] - 1 - jnp.argmax(jnp.flip(mass > 0, axis=-1), axis=-1)
    return jnp.minimum(index, last_positive)


def _invert(probs: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
    """`sample`'s draw with its two uniforms u, v [..., 1] given."""
    mass = jnp.where(probs > 0, probs.astype(jnp.float32), 0.0)
    vocab = mass.shape[-1]
    pad = -vocab % _BLOCK
    blocks = jnp.pad(mass, [(0, 0)] * (mass.ndim - 1) + [(0, pad)]).reshape(*mass.shape[:-1], -1, _BLOCK)
    block_mass = jnp.sum(blocks, axis=-1)
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    block = _first_above(block_cdf, u * block_cdf[..., -1:], block_mass)
    inside = jnp.take_along_axis(blocks, block[..., None, None], axis=-2)[..., 0, :]
    inside_cdf = jnp.cumsum(inside, axis=-1)
    token = block * _BLOCK + _first_above(inside_cdf, v * inside_cdf[..., -1:], inside)
    return jnp.minimum(token, vocab - 1).astype(jnp.int32)


def sample(key: jax.Array, probs: jax.Array, *, kernel: bool = False) -> jax.Array:
    """Draw one token per row from probabilities [..., V] by inverting the CDF in two stages: a block
    of 256 tokens with one uniform, then a token inside it with a second, P = P(block) P(token |
    block). The rows need not be normalised. Zero, negative (round-off) and NaN entries add no
    mass and are never drawn; a row with no mass at all gives V - 1. With `kernel` (see
    `on_kernel`) the same inversion runs on our CPU kernel, from the same two uniforms.

    Two random numbers per row instead of a Gumbel draw per vocabulary entry: ~1 ms less per token
    on a 49k vocabulary on CPU. Blocking keeps float32 round-off in each stage's cumulative sums
    relative to a block's mass rather than the whole vocabulary's (total variation <= ~1e-5).
    """
    block_key, token_key = jax.random.split(key)
    lead = probs.shape[:-1] + (1,)
    u = jax.random.uniform(block_key, lead, jnp.float32)
    v = jax.random.uniform(token_key, lead, jnp.float32)
    if kernel:
        return cpu_kernel.sample(probs, jnp.concatenate([u, v], axis=-1))
    return _invert(probs, u, v)


def total(x: jax.Array, *, kernel: bool = False) -> jax.Array:
    """float32 sums of x [..., V] over its last axis: [...] (with `kernel`, on our CPU kernel)."""
    if kernel:
        return cpu_kernel.row_sums(x)[..., 0]
    return jnp.sum(x.astype(jnp.float32), axis=-1)


def on_kernel(models) -> bool:
    """Whether decoding these models runs its passes over the vocabulary (argmax, softmax, draws
    and verification's sums) on our CPU kernel: on the CPU where the kernel runs, with no model
    sharded over a mesh (there each device reduces its own logits)."""
    return cpu_kernel.rows_available() and all(getattr(m, "sharding", None) is None for m in models)


def argmax(logits: jax.Array, *, kernel: bool = False) -> jax.Array:
    """int32 [...]: the first index of the largest logit (a NaN counts as the largest), as
    `jnp.argmax`; with `kernel` (see `on_kernel`) on our CPU kernel, the same answer in
    microseconds instead of XLA:CPU's ~0.25 ms a row of a 49k vocabulary."""
    if kernel:
        return cpu_kernel.argmax(logits)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample_logits(key: jax.Array, logits: jax.Array, params: SamplingParams, *,
                  kernel: bool = False) -> tuple[jax.Array, jax.Array]:
    """Process logits and draw: returns (tokens [...], the probabilities they were drawn from).
    Greedy: the argmax and its one-hot. With `kernel` (see `on_kernel`) on our CPU kernel."""
    if params.greedy:
        token = argmax(logits.astype(jnp.float32), kernel=kernel)
        return token, jax.nn.one_hot(token, logits.shape[-1], dtype=jnp.float32)
    probs = distribution(logits, params, kernel=kernel)
    return sample(key, probs, kernel=kernel), probs
