"""Hierarchical Speculative Decoding (Globerson, Kaplan, Mansour, Mohri, Schuster; arXiv 2510.19705).

Models M_0 < M_1 < ... < M_K = target. Only M_0 generates token by token. Level i (0 < i < K)
fills a buffer of at least T_i tokens by asking level i-1 for a batch, conditioned on what it
already holds, and verifying it in one forward pass; it keeps the accepted prefix and the
correction (or, when all are accepted, a bonus token) and reports them with *its own*
probabilities. The target verifies one batch of level K-1 per round and commits the result.

The recursion is unrolled at trace time into one `while_loop` per level over fixed-shape,
masked state, so the whole generation is one compiled program. Per row:
  * `seq[b]` holds the prompt, the committed tokens and, after `committed[b]`, the stacked
    tentative buffers of levels K-1, K-2, ..., 0;
  * every model has its own KV cache; its `lengths[b]` is always at most its context end - 1,
    so the token before its next query is always fed again (the "catch-up" window also feeds
    corrections and bonus tokens that verifiers above it emitted, which it has no KV for);
  * rejection rolls every model at or below the verifier back by lowering `lengths`.
Rows that need no work at some level ride along with masks: their writes land beyond their
valid cache entries or their live buffers, and their lengths, counts and stats are left alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from hsd_jax.decoding.ar import (
    GenerationOutput,
    OutputBuffer,
    ar_generate,
    check_memory,
    context_length,
    default_cache_size,
    positive_int,
    validate_request,
)
from hsd_jax.decoding.drafter import Drafter
from hsd_jax.decoding.hierarchy import MAX_BUFFER, Hierarchy, register_plan_loader
from hsd_jax.decoding.sampling import SamplingParams, argmax, distribution, on_kernel, sample
from hsd_jax.decoding.schedule import Schedule
from hsd_jax.decoding.verify import verify, verify_greedy

__all__ = [
    "MAX_BUFFER",
    "HSDStats",
    "Hierarchy",
    "ar_stats",
    "hsd_continue",
    "hsd_generate",
    "hsd_output",
    "hsd_start",
    "prepare_hsd",
    "register_plan_loader",
]


@struct.dataclass
class HSDStats:
    forward_passes: jax.Array  # [B, K+1]: drafting steps of M_0, verification passes of M_1..M_K
    proposed: jax.Array  # [B, K]: tokens level i handed up to level i+1 for verification
    accepted: jax.Array  # [B, K]: of those, accepted by level i+1
    target_rounds: jax.Array  # [B]: target verification passes
    tokens_per_target_call: jax.Array  # [B]: committed tokens / target rounds


# ------------------------------------------------------------------------------ the state


@struct.dataclass
class _State:
    seq: jax.Array  # [B, S]
    caches: tuple  # one drafter state per level: a KVCache, or None for a stateless drafter
    counts: tuple  # per level < K: [B] tokens in its current buffer
    probs: tuple  # per level < K: [B, cap_i, V] its own probabilities for those tokens (None: greedy)
    committed: jax.Array  # [B] committed context length (prompt included)
    out: OutputBuffer
    key: jax.Array
    forward_passes: jax.Array
    proposed: jax.Array
    accepted: jax.Array
    rounds: jax.Array

    def next_key(self) -> tuple[_State, jax.Array]:
        key, sub = jax.random.split(self.key)
        return self.replace(key=key), sub


class _Loops(NamedTuple):
    while_loop: Callable
    fori_loop: Callable


def _py_while(cond, body, state):
    while bool(cond(state)):
        state = body(state)
    return state


def _py_fori(lower, upper, body, state):
    for i in range(lower, upper):
        state = body(i, state)
    return state


_COMPILED = _Loops(jax.lax.while_loop, jax.lax.fori_loop)
_PYTHON = _Loops(_py_while, _py_fori)


def _set_tuple(items: tuple, index: int, value) -> tuple:
    return items[:index] + (value,) + items[index + 1:]


def _gather(seq: jax.Array, positions: jax.Array) -> jax.Array:
    return jnp.take_along_axis(seq, jnp.clip(positions, 0, seq.shape[1] - 1), axis=1)


def _scatter_rows(array: jax.Array, positions: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
    """array[b, positions[b, c]] = values[b, c] (trailing axes included) where mask[b, c]; other
    writes, and positions past the end, are dropped."""
    rows = jnp.broadcast_to(jnp.arange(array.shape[0])[:, None], positions.shape)
    return array.at[rows, jnp.where(mask, positions, array.shape[1])].set(values, mode="drop")


# -------------------------------------------------------------------------- the recursion


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Trace-time constants of one generation call."""

    hierarchy: Hierarchy
    sampling: SamplingParams
    eos_token_id: int | None
    loops: _Loops

    @property
    def depth(self) -> int:
        return self.hierarchy.depth

    @property
    def schedule(self) -> Schedule:
        return self.hierarchy.schedule

    @property
    def greedy(self) -> bool:
        """At temperature 0 every law is one-hot: levels pass argmax tokens instead of [.., V] laws."""
        return self.sampling.greedy

    @property
    def on_kernel(self) -> bool:
        """Whether passes over the vocabulary run on our CPU kernel (`sampling.on_kernel`)."""
        return on_kernel(self.hierarchy.models)


def _score(plan: _Plan, level: int, st: _State, first: jax.Array, count: int, window: int,
           rows: jax.Array) -> tuple[jax.Array, _State]:
    """M_level's processed distributions of the tokens at positions first..first+count-1 (greedy:
    their argmax tokens [B, count]).

    A model with a cache feeds `window` tokens from its cache length on (catch-up, then the
    queried tokens) in one forward pass, and keeps KV up to the last queried token's context.
    """
    state = st.caches[level]
    ends = first[:, None] + jnp.arange(count)[None, :]
    logits, advanced = plan.hierarchy.models[level].score(state, st.seq, ends, window)
    logits = logits[..., :plan.hierarchy.vocab_size]
    if plan.greedy:
        probs = argmax(logits, kernel=plan.on_kernel)
    else:
        probs = distribution(logits, plan.sampling, kernel=plan.on_kernel)
    if state is None:
        return probs, st
    advanced = advanced.with_lengths(jnp.where(rows, first + count - 1, state.lengths))
    return probs, st.replace(caches=_set_tuple(st.caches, level, advanced))


def _draft(plan: _Plan, st: _State, base: jax.Array, rows: jax.Array) -> _State:
    """Level 0: M_0 proposes T_0 tokens one at a time at positions base, base+1, ..."""
    steps = plan.hierarchy.buffers[0]
    batch = base.shape[0]

    def draft_one(t, st, window):
        probs, st = _score(plan, 0, st, base + t, 1, window, rows)
        if plan.greedy:
            token = probs[:, 0]
        else:
            st, key = st.next_key()
            token = sample(key, probs[:, 0], kernel=plan.on_kernel)
            st = st.replace(probs=_set_tuple(st.probs, 0, st.probs[0].at[:, t].set(probs[:, 0])))
        return st.replace(seq=st.seq.at[jnp.arange(batch), base + t].set(token, mode="drop"))

    st = draft_one(0, st, plan.schedule.draft_widths()[0])
    st = plan.loops.fori_loop(1, steps, lambda t, s: draft_one(t, s, 1), st)
    return st.replace(counts=_set_tuple(st.counts, 0, jnp.full((batch,), steps, jnp.int32)),
                      forward_passes=st.forward_passes.at[:, 0].add(steps * rows))


def _verify(plan: _Plan, level: int, st: _State, draft_base: jax.Array,
            rows: jax.Array) -> tuple[_State, jax.Array, jax.Array]:
    """M_level verifies level-1's buffer (at positions draft_base..) in one forward pass.

    Writes the correction/bonus token into `seq`, rolls back M_level and every model below it,
    and returns (state, τ, M_level's distributions at the draft positions and the one after).
    """
    schedule = plan.schedule
    width = schedule.capacities[level - 1]
    draft_len = st.counts[level - 1]
    drafts = _gather(st.seq, draft_base[:, None] + jnp.arange(width)[None, :])
    p, st = _score(plan, level, st, draft_base, schedule.scored(level), schedule.verify_width(level), rows)
    if plan.greedy:
        tau, next_token = verify_greedy(drafts, draft_len, p)
    else:
        st, key = st.next_key()
        tau, next_token = verify(plan.hierarchy.verifiers[level - 1], key, drafts, draft_len,
                                 st.probs[level - 1], p, kernel=plan.on_kernel)
    accepted_end = draft_base + tau
    seq = _scatter_rows(st.seq, accepted_end[:, None], next_token[:, None], rows[:, None])
    caches = list(st.caches)
    for lower in range(level + 1):
        if caches[lower] is not None:
            lengths = caches[lower].lengths
            rolled = accepted_end if lower == level else jnp.minimum(lengths, accepted_end)
            caches[lower] = caches[lower].with_lengths(jnp.where(rows, rolled, lengths))
    live = rows.astype(jnp.int32)
    st = st.replace(
        seq=seq, caches=tuple(caches),
        forward_passes=st.forward_passes.at[:, level].add(live),
        proposed=st.proposed.at[:, level - 1].add(draft_len * live),
        accepted=st.accepted.at[:, level - 1].add(tau * live))
    return st, tau, p


def _fill(plan: _Plan, level: int, st: _State, base: jax.Array, rows: jax.Array) -> _State:
    """Level `level` < K collects at least T_level tokens at positions base.. for `rows`."""
    if level == 0:
        return _draft(plan, st, base, rows)
    target = plan.hierarchy.buffers[level]
    st = st.replace(counts=_set_tuple(st.counts, level, jnp.zeros_like(base)))

    def needs_more(st):
        return rows & (st.counts[level] < target)

    def body(st):
        need = needs_more(st)
        count = st.counts[level]
        draft_base = base + count
        st = _fill(plan, level - 1, st, draft_base, need)
        st, tau, p = _verify(plan, level, st, draft_base, need)
        if not plan.greedy:
            offsets = jnp.arange(p.shape[1])[None, :]
            keep = need[:, None] & (offsets <= tau[:, None])
            probs = _scatter_rows(st.probs[level], count[:, None] + offsets, p, keep)
            st = st.replace(probs=_set_tuple(st.probs, level, probs))
        return st.replace(counts=_set_tuple(st.counts, level, count + jnp.where(need, tau + 1, 0)))

    return plan.loops.while_loop(lambda s: jnp.any(needs_more(s)), body, st)


def _round(plan: _Plan, st: _State) -> _State:
    """One target round: level K-1 fills its buffer, the target verifies and commits."""
    rows = ~st.out.done
    top = plan.depth
    st = _fill(plan, top - 1, st, st.committed, rows)
    st, tau, _ = _verify(plan, top, st, st.committed, rows)
    emitted = _gather(st.seq, st.committed[:, None] + jnp.arange(plan.schedule.committed_width())[None, :])
    counts = jnp.where(rows, tau + 1, 0)
    return st.replace(out=st.out.commit(emitted, counts, plan.eos_token_id),
                      committed=st.committed + counts, rounds=st.rounds + rows)


def _prefill(model: Drafter, prompt: jax.Array, prompt_lengths: jax.Array, cache_size: int) -> Any:
    """Cache the prompt, leaving its last token un-cached (every model's invariant)."""
    state = model.init_state(prompt.shape[0], cache_size)
    if state is None:
        return None
    valid = jnp.arange(prompt.shape[1])[None, :] < prompt_lengths[:, None]
    width = prompt.shape[1]
    _, state = model.score(state, jnp.where(valid, prompt, 0), jnp.full((prompt.shape[0], 1), width), width)
    return state.with_lengths(prompt_lengths - 1)


def _init(plan: _Plan, prompt: jax.Array, prompt_lengths: jax.Array, key: jax.Array,
          max_new_tokens: int, cache_size: int, pad_id: int) -> _State:
    """The state after prefill: every model has cached its prompt; nothing is committed yet."""
    h = plan.hierarchy
    batch, prompt_width = prompt.shape
    depth = h.depth
    seq = jnp.zeros((batch, cache_size), jnp.int32).at[:, :prompt_width].set(prompt)
    zeros = jnp.zeros((batch,), jnp.int32)
    return _State(
        seq=seq,
        caches=tuple(_prefill(m, prompt, prompt_lengths, cache_size) for m in h.models),
        counts=(zeros,) * depth,
        probs=tuple(None if plan.greedy else jnp.zeros((batch, cap, h.vocab_size), jnp.float32)
                    for cap in h.capacities),
        committed=prompt_lengths, out=OutputBuffer.init(batch, max_new_tokens, pad_id), key=key,
        forward_passes=jnp.zeros((batch, depth + 1), jnp.int32),
        proposed=jnp.zeros((batch, depth), jnp.int32), accepted=jnp.zeros((batch, depth), jnp.int32),
        rounds=zeros)


def _rounds(plan: _Plan, st: _State, limit: jax.Array | None = None) -> _State:
    """Target rounds until every row is done, or at most `limit` more of them (the stream's chunk):
    the one-shot program and the stream run this same loop over the same `_round`."""
    step = partial(_round, plan)
    if limit is None:
        return plan.loops.while_loop(lambda s: ~jnp.all(s.out.done), step, st)

    def body(carry):
        i, s = carry
        return i + 1, step(s)

    def more(carry):
        return (carry[0] < limit) & ~jnp.all(carry[1].out.done)

    _, st = plan.loops.while_loop(more, body, (jnp.int32(0), st))
    return st


def hsd_output(st: _State) -> GenerationOutput:
    stats = HSDStats(forward_passes=st.forward_passes, proposed=st.proposed, accepted=st.accepted,
                     target_rounds=st.rounds,
                     tokens_per_target_call=st.out.num_tokens / jnp.maximum(st.rounds, 1))
    return GenerationOutput(tokens=st.out.tokens, num_tokens=st.out.num_tokens, stats=stats)


_STATIC = ("max_new_tokens", "sampling", "eos_token_id", "cache_size", "pad_id", "trace")


def _run(hierarchy: Hierarchy, prompt, prompt_lengths, key, *, max_new_tokens, sampling, eos_token_id,
         cache_size, pad_id, trace: bool) -> GenerationOutput:
    """The one-shot program: prefill, then target rounds until every row is done."""
    plan = _Plan(hierarchy, sampling, eos_token_id, _COMPILED if trace else _PYTHON)
    st = _init(plan, prompt, prompt_lengths, key, max_new_tokens, cache_size, pad_id)
    return hsd_output(_rounds(plan, st))


_run_jit = jax.jit(_run, static_argnames=_STATIC)


def _view(st: _State) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What the stream reads after each call: copies (never donated) of the output buffer."""
    return jnp.copy(st.out.tokens), jnp.copy(st.out.num_tokens), jnp.copy(st.out.done)


@partial(jax.jit, static_argnames=_STATIC[:-1])
def hsd_start(hierarchy: Hierarchy, prompt, prompt_lengths, key, *, max_new_tokens, sampling, eos_token_id,
           cache_size, pad_id):
    """The stream's first call: prefill only (the state and its view)."""
    plan = _Plan(hierarchy, sampling, eos_token_id, _COMPILED)
    st = _init(plan, prompt, prompt_lengths, key, max_new_tokens, cache_size, pad_id)
    return st, _view(st)


@partial(jax.jit, static_argnames=("sampling", "eos_token_id"), donate_argnames=("st",))
def hsd_continue(hierarchy: Hierarchy, st: _State, limit: jax.Array, *, sampling, eos_token_id):
    """The stream's next call: at most `limit` (a traced int: no recompilation) more target rounds."""
    st = _rounds(_Plan(hierarchy, sampling, eos_token_id, _COMPILED), st, limit)
    return st, _view(st)


def prepare_hsd(hierarchy: Hierarchy, prompt_tokens, prompt_lengths, *, max_new_tokens: int,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                eos_token_id: int | None = None, cache_size: int | None = None) -> dict[str, Any]:
    """Validate a request for a hierarchy of depth >= 1; the static arguments of its programs."""
    max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
    prompt_width = np.shape(prompt_tokens)[1] if np.ndim(prompt_tokens) == 2 else 0
    headroom = sum(hierarchy.capacities) + hierarchy.depth + 2
    if cache_size is None:
        cache_size = default_cache_size(prompt_width, max_new_tokens, headroom)
    else:
        cache_size = positive_int("cache_size", cache_size)
    sampling = validate_request(
        hierarchy.vocab_size, prompt_tokens, prompt_lengths, max_new_tokens=max_new_tokens,
        cache_size=cache_size, max_positions=context_length(hierarchy.models),
        sampling=SamplingParams(temperature, top_k, top_p), eos_token_id=eos_token_id, headroom=headroom)
    check_memory(hierarchy.models, np.shape(prompt_tokens)[0], cache_size, hierarchy.vocab_size,
                 sum(hierarchy.capacities))
    eos_token_id = None if eos_token_id is None else int(eos_token_id)
    return dict(max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=eos_token_id,
                cache_size=cache_size, pad_id=eos_token_id if eos_token_id is not None else 0)


def ar_stats(num_tokens: jax.Array) -> HSDStats:
    """The stats of plain AR seen as a depth-0 hierarchy: one target pass per token."""
    batch = num_tokens.shape[0]
    empty = jnp.zeros((batch, 0), jnp.int32)
    return HSDStats(forward_passes=num_tokens[:, None], proposed=empty, accepted=empty,
                    target_rounds=num_tokens, tokens_per_target_call=jnp.ones(batch))


def hsd_generate(hierarchy: Hierarchy, prompt_tokens, prompt_lengths, key: jax.Array, *,
                 max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | None = None, cache_size: int | None = None,
                 trace: bool = True) -> GenerationOutput:
    """Generate with the hierarchy; the output law is exactly the target's (greedy: token-identical).

    Same arguments and output as `ar_generate`, plus `stats` (an `HSDStats`). `trace=False` runs
    the same recursion with Python loops, eagerly and slowly: a debugging reference.
    """
    if not isinstance(hierarchy, Hierarchy):
        raise TypeError(f"expected an hsd_jax.Hierarchy, got {type(hierarchy).__name__}")
    if hierarchy.depth == 0:
        out = ar_generate(hierarchy.target, prompt_tokens, prompt_lengths, key, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                          cache_size=cache_size)
        return out.replace(stats=ar_stats(out.num_tokens))
    static = prepare_hsd(hierarchy, prompt_tokens, prompt_lengths, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                         cache_size=cache_size)
    run = _run_jit if trace else _run
    return run(hierarchy, jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32), key,
               trace=trace, **static)
