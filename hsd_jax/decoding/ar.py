"""Autoregressive generation: prefill, then one `lax.while_loop` of single-token steps (`ar_steps`,
shared by the one-shot program and the stream).

Shared with `hsd.py`: input validation, prefill and the output buffer in which every row
commits tokens at its own pace and finishes at EOS or `max_new_tokens`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from hsd_jax.decoding.sampling import SamplingParams, on_kernel, sample_logits
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


def positive_int(name: str, value: Any) -> int:
    """`value` as a Python int >= 1 (numpy integers accepted); a ValueError naming `name` otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_ids(name: str, array: Any) -> None:
    dtype = getattr(array, "dtype", None)
    if dtype is None:
        dtype = np.asarray(array).dtype
    if not (jnp.issubdtype(dtype, jnp.integer) and dtype != jnp.bool_):
        raise TypeError(f"{name} must hold integers (token ids / lengths), got dtype {dtype}; "
                        "convert with np.asarray(..., np.int32) after checking the values")


def context_length(models: Sequence[Any]) -> int | None:
    """The smallest context length (`max_position_embeddings`) of the models that have one."""
    configs = [getattr(m, "config", None) for m in models]
    lengths = [c.max_position_embeddings for c in configs if hasattr(c, "max_position_embeddings")]
    return min(lengths) if lengths else None


def validate_request(vocab_size: int, prompt_tokens, prompt_lengths, *, max_new_tokens: int,
                     cache_size: int, max_positions: int | None, sampling: SamplingParams,
                     eos_token_id: int | None, headroom: int = 0) -> SamplingParams:
    """Check shapes, dtypes, lengths, ids and sampling parameters; raise ValueError (TypeError for a
    non-integer dtype) naming the fix. `max_positions` is the models' context length.

    Value checks run only on concrete arrays: inside a caller's `jax.jit` they are skipped.
    """
    sampling = sampling.validate(vocab_size)
    positive_int("max_new_tokens", max_new_tokens)
    if eos_token_id is not None:
        if isinstance(eos_token_id, (bool, np.bool_)) or not isinstance(eos_token_id, (int, np.integer)):
            raise TypeError(f"eos_token_id must be an integer token id or None, got {eos_token_id!r}")
        if not 0 <= int(eos_token_id) < vocab_size:
            raise ValueError(f"eos_token_id={eos_token_id} is outside the vocabulary [0, {vocab_size})")
    if np.ndim(prompt_tokens) != 2 or np.ndim(prompt_lengths) != 1:
        raise ValueError("prompt_tokens must be [batch, prompt_len] and prompt_lengths [batch]; got shapes "
                         f"{np.shape(prompt_tokens)} and {np.shape(prompt_lengths)}")
    _check_ids("prompt_tokens", prompt_tokens)
    _check_ids("prompt_lengths", prompt_lengths)
    batch, prompt_len = np.shape(prompt_tokens)
    if batch == 0 or prompt_len == 0:
        raise ValueError(f"the prompt is empty (prompt_tokens has shape {np.shape(prompt_tokens)}); every "
                         "row needs at least one token")
    if np.shape(prompt_lengths)[0] != batch:
        raise ValueError(
            f"prompt_lengths has {np.shape(prompt_lengths)[0]} rows but prompt_tokens has {batch}"
        )
    need = prompt_len + max_new_tokens + headroom
    spec = f" plus {headroom} speculative positions" if headroom else ""
    if max_positions is not None and need > max_positions:
        raise ValueError(
            f"the prompt ({prompt_len} tokens) plus max_new_tokens={max_new_tokens}{spec} needs {need} "
            f"positions, more than the model's context length of {max_positions} positions "
            "(max_position_embeddings); shorten the prompt or lower max_new_tokens"
            + (" or the buffers" if headroom else ""))
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


MEMORY_CHECK_BYTES = 256 << 20  # requests estimated below this skip the (cheap) memory look-up


def available_memory_bytes() -> int | None:
    """Memory a request may still use: free device memory on an accelerator, else the host's
    MemAvailable (/proc/meminfo) or free pages (sysconf); None when unknown."""
    if jax.default_backend() != "cpu":
        try:
            stats = [d.memory_stats() or {} for d in jax.local_devices()]
            free = [s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats if "bytes_limit" in s]
            if free:
                return sum(free)
        except Exception:  # memory_stats is optional on some backends
            pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(models: Sequence[Any], batch: int, cache_size: int, vocab_size: int,
                 buffer_positions: int = 0) -> int:
    """Estimate the bytes a generation allocates beyond the weights (every model's KV cache, the
    probability buffers and the output) and refuse, before allocating, a request that cannot fit."""
    total = 0
    for m in models:
        config = getattr(m, "config", None)
        if config is None or not hasattr(config, "num_kv_heads"):
            continue
        itemsize = np.dtype(getattr(m, "dtype", np.float32)).itemsize
        total += 2 * config.num_layers * batch * cache_size * config.num_kv_heads * config.head_dim * itemsize
    total += batch * (buffer_positions + 2) * vocab_size * 4 + 2 * batch * cache_size * 4
    if total > MEMORY_CHECK_BYTES:
        available = available_memory_bytes()
        if available is not None and total > available:
            raise ValueError(
                f"this request needs about {total / 2**30:.1f} GiB for KV caches and buffers (batch {batch}, "
                f"{cache_size} positions) but only {available / 2**30:.1f} GiB is available; lower "
                "max_new_tokens, the batch or the buffers")
    return total


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
    token, _ = sample_logits(jax.random.fold_in(key, 0), logits, sampling, kernel=on_kernel([model]))
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
        token, _ = sample_logits(jax.random.fold_in(st.key, st.step), logits[:, -1], sampling,
                                 kernel=on_kernel([model]))
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
    max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
    prompt_len = np.shape(prompt_tokens)[1] if np.ndim(prompt_tokens) == 2 else 0
    context = context_length([model])
    if cache_size is None:
        cache_size = default_cache_size(prompt_len, max_new_tokens)
        cache_size = min(cache_size, context or cache_size)
    else:
        cache_size = positive_int("cache_size", cache_size)
    sampling = validate_request(
        model.vocab_size, prompt_tokens, prompt_lengths, max_new_tokens=max_new_tokens,
        cache_size=cache_size, max_positions=context,
        sampling=SamplingParams(temperature, top_k, top_p), eos_token_id=eos_token_id)
    check_memory([model], np.shape(prompt_tokens)[0], cache_size, model.vocab_size)
    eos_token_id = None if eos_token_id is None else int(eos_token_id)
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
