"""Autoregressive generation: prefill, then one `lax.while_loop` of single-token steps (`ar_steps`,
shared by the one-shot program and the stream).

Shared with `hsd.py`: input validation, prefill and the output buffer in which every row
commits tokens at its own pace and finishes at EOS or `max_new_tokens`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from hsd_jax.decoding.sampling import SamplingParams, sample_logits
from hsd_jax.models import KVCache, Model


@struct.dataclass
class GenerationOutput:
    tokens: jax.Array  # [B, max_new_tokens]; positions >= num_tokens hold the pad id
    num_tokens: jax.Array  # [B] int32, EOS included when produced
    stats: Any = None


@struct.dataclass
class OutputBuffer:
    """Generated tokens of every row; a row is done after EOS or `max_new_tokens` tokens."""

    tokens: jax.Array  # [B, N]
    num_tokens: jax.Array  # [B]
    done: jax.Array  # [B] bool

    @classmethod
    def init(cls, batch: int, max_new_tokens: int, pad_id: int) -> OutputBuffer:
        return cls(tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
                   num_tokens=jnp.zeros((batch,), jnp.int32), done=jnp.zeros((batch,), bool))

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]

    def commit(self, new_tokens: jax.Array, counts: jax.Array, eos_token_id: int | None) -> OutputBuffer:
        """Append `new_tokens[b, :counts[b]]` to each unfinished row, stopping at EOS and capacity."""
        chex.assert_rank(new_tokens, 2)
        batch, width = new_tokens.shape
        offsets = jnp.arange(width)[None, :]
        valid = (offsets < counts[:, None]) & ~self.done[:, None]
        if eos_token_id is not None:
            is_eos = valid & (new_tokens == eos_token_id)
            first_eos = jnp.min(jnp.where(is_eos, offsets, width), axis=1)
            valid &= offsets <= first_eos[:, None]
            hit_eos = first_eos < width
        else:
            hit_eos = jnp.zeros((batch,), bool)
        positions = self.num_tokens[:, None] + offsets
        valid &= positions < self.capacity
        rows = jnp.broadcast_to(jnp.arange(batch)[:, None], positions.shape)
        tokens = self.tokens.at[rows, jnp.where(valid, positions, self.capacity)].set(new_tokens, mode="drop")
        num_tokens = self.num_tokens + jnp.sum(valid, axis=1)
        done = self.done | hit_eos | (num_tokens >= self.capacity)
        return OutputBuffer(tokens=tokens, num_tokens=num_tokens, done=done)


def validate_request(vocab_size: int, prompt_tokens, prompt_lengths, *, max_new_tokens: int,
                     cache_size: int, max_positions: int | None, sampling: SamplingParams,
                     eos_token_id: int | None, headroom: int = 0) -> SamplingParams:
    """Check shapes, lengths, ids and sampling parameters; raise ValueError naming the fix.

    Value checks run only on concrete arrays: inside a caller's `jax.jit` they are skipped.
    """
    sampling = sampling.validate(vocab_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if eos_token_id is not None and not 0 <= int(eos_token_id) < vocab_size:
        raise ValueError(f"eos_token_id={eos_token_id} is outside the vocabulary [0, {vocab_size})")
    if np.ndim(prompt_tokens) != 2 or np.ndim(prompt_lengths) != 1:
        raise ValueError("prompt_tokens must be [batch, prompt_len] and prompt_lengths [batch]; got shapes "
                         f"{np.shape(prompt_tokens)} and {np.shape(prompt_lengths)}")
    batch, prompt_len = np.shape(prompt_tokens)
    if np.shape(prompt_lengths)[0] != batch:
        raise ValueError(
            f"prompt_lengths has {np.shape(prompt_lengths)[0]} rows but prompt_tokens has {batch}"
        )
    need = prompt_len + max_new_tokens + headroom
    spec = f" plus {headroom} speculative positions" if headroom else ""
    if max_positions is not None and need > max_positions:
        raise ValueError(
            f"the prompt ({prompt_len} tokens) plus max_new_tokens={max_new_tokens}{spec} exceeds the "
            "model's "
            f"{max_positions} learned positions; shorten the prompt or lower max_new_tokens"
        )
    if need > cache_size:
        raise ValueError(
            f"the prompt ({prompt_len} tokens) plus max_new_tokens={max_new_tokens}{spec} needs a cache of "
            f"{need} positions but cache_size={cache_size}; raise cache_size, shorten the prompt or lower "
            "max_new_tokens")
    if isinstance(prompt_tokens, jax.core.Tracer) or isinstance(prompt_lengths, jax.core.Tracer):
        return sampling
    lengths = np.asarray(prompt_lengths)
    if (lengths < 1).any() or (lengths > prompt_len).any():
        raise ValueError(
            f"prompt_lengths must be in [1, {prompt_len}] (the padded prompt width); got {lengths.tolist()}"
        )
    tokens = np.asarray(prompt_tokens)
    valid = np.arange(prompt_len)[None, :] < lengths[:, None]
    bad = valid & ((tokens < 0) | (tokens >= vocab_size))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"prompt token id {int(tokens[row, col])} (row {row}, position {col}) is outside the "
            f"vocabulary [0, {vocab_size}); check that the prompt was encoded with this model's tokenizer"
        )
    return sampling


def default_cache_size(prompt_len: int, max_new_tokens: int, headroom: int = 0) -> int:
    """Room for the prompt, the new tokens and `headroom` speculative positions, rounded up to 16."""
    need = prompt_len + max_new_tokens + headroom
    return -(-need // 16) * 16


def prefill(model: Model, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
            cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Run the right-padded prompts; return each row's last-position logits [B, V] and the cache.

    Padding positions are written to the cache too, but lie at or beyond `lengths` and are
    overwritten before any query can attend to them.
    """
    valid = jnp.arange(prompt_tokens.shape[1])[None, :] < prompt_lengths[:, None]
    tokens = jnp.where(valid, prompt_tokens, 0)
    x, cache = model.hidden(tokens, cache.with_lengths(jnp.zeros_like(prompt_lengths)))
    last = jnp.take_along_axis(x, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache.with_lengths(prompt_lengths)


@struct.dataclass
class ARState:
    """Everything plain decoding carries between steps (the stream's state)."""

    step: jax.Array  # tokens sampled so far (the next sample's key is fold_in(key, step))
    token: jax.Array  # [B] the last sampled token, not yet fed to the model
    cache: KVCache
    out: OutputBuffer
    key: jax.Array


def ar_init(model: Model, prompt_tokens: jax.Array, prompt_lengths: jax.Array, key: jax.Array, *,
            max_new_tokens: int, sampling: SamplingParams, eos_token_id: int | None, cache_size: int,
            pad_id: int) -> ARState:
    """Prefill and sample the first token (committed)."""
    batch = prompt_tokens.shape[0]
    prompt_lengths = prompt_lengths.astype(jnp.int32)
    logits, cache = prefill(model, prompt_tokens, prompt_lengths, model.init_cache(batch, cache_size))
    token, _ = sample_logits(jax.random.fold_in(key, 0), logits, sampling)
    out = OutputBuffer.init(batch, max_new_tokens, pad_id).commit(
        token[:, None], jnp.ones((batch,), jnp.int32), eos_token_id
    )
    return ARState(step=jnp.int32(1), token=token, cache=cache, out=out, key=key)


def ar_steps(model: Model, st: ARState, *, sampling: SamplingParams, eos_token_id: int | None,
             limit: jax.Array | None = None) -> ARState:
    """Single-token steps until every row is done, or at most `limit` more of them: the one-shot
    program and the stream run this same loop."""

    def more(carry):
        i, st = carry
        going = (st.step < st.out.capacity) & ~jnp.all(st.out.done)
        return going if limit is None else going & (i < limit)

    def body(carry):
        i, st = carry
        active = ~st.out.done
        logits, stepped = model.step(st.token[:, None], st.cache)
        cache = stepped.with_lengths(jnp.where(active, stepped.lengths, st.cache.lengths))
        token, _ = sample_logits(jax.random.fold_in(st.key, st.step), logits[:, -1], sampling)
        out = st.out.commit(token[:, None], active.astype(jnp.int32), eos_token_id)
        return i + 1, st.replace(step=st.step + 1, token=token, cache=cache, out=out)

    return jax.lax.while_loop(more, body, (jnp.int32(0), st))[1]


@partial(jax.jit, static_argnames=("max_new_tokens", "sampling", "eos_token_id", "cache_size", "pad_id"))
def _ar_generate(model: Model, prompt_tokens: jax.Array, prompt_lengths: jax.Array, key: jax.Array, *,
                 max_new_tokens: int, sampling: SamplingParams, eos_token_id: int | None,
                 cache_size: int, pad_id: int) -> GenerationOutput:
    """The one-shot program: prefill, then steps until every row is done."""
    st = ar_init(model, prompt_tokens, prompt_lengths, key, max_new_tokens=max_new_tokens, sampling=sampling,
                 eos_token_id=eos_token_id, cache_size=cache_size, pad_id=pad_id)
    st = ar_steps(model, st, sampling=sampling, eos_token_id=eos_token_id)
    return GenerationOutput(tokens=st.out.tokens, num_tokens=st.out.num_tokens)


def _ar_view(st: ARState) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What the stream reads after each call: copies (never donated) of the output buffer."""
    return jnp.copy(st.out.tokens), jnp.copy(st.out.num_tokens), jnp.copy(st.out.done)


@partial(jax.jit, static_argnames=("max_new_tokens", "sampling", "eos_token_id", "cache_size", "pad_id"))
def ar_start(model: Model, prompt_tokens: jax.Array, prompt_lengths: jax.Array, key: jax.Array, *,
             max_new_tokens: int, sampling: SamplingParams, eos_token_id: int | None, cache_size: int,
             pad_id: int):
    """The stream's first call: prefill and the first token (the state and its view)."""
    st = ar_init(model, prompt_tokens, prompt_lengths, key, max_new_tokens=max_new_tokens, sampling=sampling,
                 eos_token_id=eos_token_id, cache_size=cache_size, pad_id=pad_id)
    return st, _ar_view(st)


@partial(jax.jit, static_argnames=("sampling", "eos_token_id"), donate_argnames=("st",))
def ar_continue(model: Model, st: ARState, limit: jax.Array, *, sampling: SamplingParams,
                eos_token_id: int | None):
    """The stream's next call: at most `limit` (traced: no recompilation) more steps."""
    st = ar_steps(model, st, sampling=sampling, eos_token_id=eos_token_id, limit=limit)
    return st, _ar_view(st)


def prepare_ar(model: Model, prompt_tokens, prompt_lengths, *, max_new_tokens: int, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None,
               cache_size: int | None = None) -> dict[str, Any]:
    """Validate a request for plain decoding; the static arguments of its programs."""
    prompt_len = np.shape(prompt_tokens)[1] if np.ndim(prompt_tokens) == 2 else 0
    if cache_size is None:
        cache_size = default_cache_size(prompt_len, max_new_tokens if isinstance(max_new_tokens, int) else 0)
        cache_size = min(cache_size, _learned_positions(model) or cache_size)
    sampling = validate_request(
        model.vocab_size, prompt_tokens, prompt_lengths, max_new_tokens=max_new_tokens,
        cache_size=cache_size, max_positions=_learned_positions(model),
        sampling=SamplingParams(temperature, top_k, top_p), eos_token_id=eos_token_id)
    return dict(max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=eos_token_id,
                cache_size=cache_size, pad_id=eos_token_id if eos_token_id is not None else 0)


def ar_generate(model: Model, prompt_tokens, prompt_lengths, key: jax.Array, *, max_new_tokens: int,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                eos_token_id: int | None = None, cache_size: int | None = None) -> GenerationOutput:
    """Generate up to `max_new_tokens` per row from right-padded prompts, in one compiled program.

    Rows with different prompt lengths, and rows that hit `eos_token_id`, finish independently.
    Returns `tokens [B, max_new_tokens]` (pad = EOS id, or 0) and `num_tokens [B]`.
    """
    static = prepare_ar(model, prompt_tokens, prompt_lengths, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                        cache_size=cache_size)
    return _ar_generate(model, jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32),
                        key, **static)


def _learned_positions(model: Model) -> int | None:
    return model.config.max_position_embeddings if model.config.positions == "learned" else None
