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
from collections.abc import Callable, Sequence
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
from hsd_jax.decoding.drafter import Drafter, describe
from hsd_jax.decoding.sampling import SamplingParams, distribution, sample
from hsd_jax.decoding.schedule import Schedule
from hsd_jax.decoding.verify import check_rule, verify
from hsd_jax.models import Model

_PLAN_LOADER: Callable[..., Hierarchy] | None = None
MAX_BUFFER = 256  # the largest buffer target T_i (the planner searches 1..32)


def register_plan_loader(loader: Callable[..., Hierarchy]) -> None:
    """`planning` registers how a plan becomes a Hierarchy, so this module need not import it."""
    global _PLAN_LOADER
    _PLAN_LOADER = loader


# ------------------------------------------------------------------------------------ API


@jax.tree_util.register_pytree_node_class
class Hierarchy:
    """A chain of models M_0 < ... < M_K (target last), buffer targets T_0..T_{K-1} and the
    verification rule each level M_1..M_K uses. A pytree: weights are leaves, the rest static."""

    def __init__(self, models: Sequence[Drafter], buffers: Sequence[int] = (),
                 verifier: str | Sequence[str] = "tokenwise", *, shared_vocab_size: int | None = None,
                 allow_inexact: bool = False):
        if isinstance(models, (str, bytes)) or not isinstance(models, Sequence):
            raise TypeError(f"models must be a sequence of drafters (M_0 first, target last), got "
                            f"{type(models).__name__}")
        models = tuple(models)
        if not models:
            raise ValueError("a Hierarchy needs at least the target model")
        for i, m in enumerate(models):
            if not isinstance(m, Drafter):
                raise TypeError(f"models[{i}] is a {type(m).__name__}; expected hsd_jax.Model, NGramDrafter "
                                "or another hsd_jax.decoding.drafter.Drafter")
        if models[-1].init_state(1, 1) is None:
            raise ValueError(
                f"the target (the last model) must be a model with a KV cache, not {describe(models[-1])}; "
                "order models smallest (M_0) to target (M_K)"
            )
        sizes = [m.num_params for m in models]
        for i in range(len(models) - 1):
            if sizes[i] > sizes[-1]:
                raise ValueError(
                    f"models[{i}] has {sizes[i]:,} parameters, more than the target models[-1] "
                    f"({sizes[-1]:,}); order models smallest (M_0) to target (M_K), target last")
        depth = len(models) - 1
        if isinstance(buffers, (str, bytes)) or not isinstance(buffers, (Sequence, np.ndarray)):
            raise TypeError(f"buffers must be a sequence of integers (T_0..T_{{K-1}}), got {buffers!r}")
        buffers = tuple(buffers)
        if len(buffers) != depth:
            raise ValueError(
                f"{len(models)} models need {depth} buffer targets (T_0..T_{{K-1}}), got {len(buffers)}"
            )
        for i, t in enumerate(buffers):
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)) \
                    or not 1 <= t <= MAX_BUFFER:
                raise ValueError(f"buffer T_{i} must be an integer in [1, {MAX_BUFFER}], got {t!r}")
        schedule = Schedule.of(tuple(int(t) for t in buffers))
        if not isinstance(verifier, (str, Sequence)):
            raise TypeError(f"verifier must be a rule name or one per level, got {verifier!r}")
        verifiers = (verifier,) * depth if isinstance(verifier, str) else tuple(verifier)
        if len(verifiers) != depth:
            raise ValueError(
                f"give one verifier for all levels or one per level M_1..M_K ({depth}), got {len(verifiers)}"
            )
        verifiers = tuple(check_rule(v, allow_inexact) for v in verifiers)
        vocab_sizes = [m.vocab_size for m in models]
        if shared_vocab_size is None:
            if len(set(vocab_sizes)) > 1:
                raise ValueError(
                    f"models have different vocabulary sizes {vocab_sizes}. If they share one tokenizer "
                    "and differ only by padding, pass shared_vocab_size=<the tokenizer's size> to slice "
                    "every model's logits to it; otherwise they cannot draft for each other")
            shared_vocab_size = vocab_sizes[0]
        elif (isinstance(shared_vocab_size, (bool, np.bool_))
              or not isinstance(shared_vocab_size, (int, np.integer))
              or not 1 <= shared_vocab_size <= min(vocab_sizes)):
            raise ValueError(f"shared_vocab_size={shared_vocab_size} must be in [1, {min(vocab_sizes)}] "
                             f"(the smallest model vocabulary of {vocab_sizes})")
        self._set(models, schedule.buffers, verifiers, int(shared_vocab_size))

    def _set(self, models, buffers, verifiers, vocab_size):
        self.models, self.buffers, self.verifiers, self.vocab_size = models, buffers, verifiers, vocab_size
        self.schedule = Schedule(buffers)

    @classmethod
    def from_plan(cls, plan, **kwargs) -> Hierarchy:
        """The hierarchy of a plan (a `planning.Plan`, its dict, or a plan.json path); keyword
        arguments as `planning.hierarchy_from_plan` (dtype, shared_vocab_size). Relative sources
        resolve against the plan file's directory."""
        if _PLAN_LOADER is None:
            raise RuntimeError("no plan loader is registered: import hsd_jax (or hsd_jax.planning) first")
        return _PLAN_LOADER(plan, **kwargs)

    @property
    def depth(self) -> int:
        """K: the number of levels above M_0."""
        return len(self.models) - 1

    @property
    def target(self) -> Model:
        return self.models[-1]

    @property
    def capacities(self) -> tuple[int, ...]:
        """Buffer size of each level < K: T_i plus the largest overshoot, cap_i = T_i + cap_{i-1}."""
        return self.schedule.capacities

    def tree_flatten(self):
        return (self.models,), (self.buffers, self.verifiers, self.vocab_size)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj._set(children[0], *aux)
        return obj

    def __repr__(self) -> str:
        names = [describe(m) for m in self.models]
        return f"Hierarchy({' < '.join(names)}, buffers={self.buffers}, verifiers={self.verifiers})"


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
    probs: tuple  # per level < K: [B, cap_i, V] its own probabilities for those tokens
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


def _score(plan: _Plan, level: int, st: _State, first: jax.Array, count: int, window: int,
           rows: jax.Array) -> tuple[jax.Array, _State]:
    """M_level's processed distributions of the tokens at positions first..first+count-1.

    A model with a cache feeds `window` tokens from its cache length on (catch-up, then the
    queried tokens) in one forward pass, and keeps KV up to the last queried token's context.
    """
    state = st.caches[level]
    ends = first[:, None] + jnp.arange(count)[None, :]
    logits, advanced = plan.hierarchy.models[level].score(state, st.seq, ends, window)
    probs = distribution(logits[..., :plan.hierarchy.vocab_size], plan.sampling)
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
        st, key = st.next_key()
        token = sample(key, probs[:, 0])
        seq = st.seq.at[jnp.arange(batch), base + t].set(token, mode="drop")
        return st.replace(seq=seq, probs=_set_tuple(st.probs, 0, st.probs[0].at[:, t].set(probs[:, 0])))

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
    st, key = st.next_key()
    tau, next_token = verify(
        plan.hierarchy.verifiers[level - 1], key, drafts, draft_len, st.probs[level - 1], p
    )
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
        offsets = jnp.arange(p.shape[1])[None, :]
        keep = need[:, None] & (offsets <= tau[:, None])
        probs = _scatter_rows(st.probs[level], count[:, None] + offsets, p, keep)
        return st.replace(probs=_set_tuple(st.probs, level, probs),
                          counts=_set_tuple(st.counts, level, count + jnp.where(need, tau + 1, 0)))

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


def _generate(plan: _Plan, prompt: jax.Array, prompt_lengths: jax.Array, key: jax.Array,
              max_new_tokens: int, cache_size: int, pad_id: int) -> GenerationOutput:
    h = plan.hierarchy
    batch, prompt_width = prompt.shape
    depth = h.depth
    seq = jnp.zeros((batch, cache_size), jnp.int32).at[:, :prompt_width].set(prompt)
    zeros = jnp.zeros((batch,), jnp.int32)
    st = _State(
        seq=seq,
        caches=tuple(_prefill(m, prompt, prompt_lengths, cache_size) for m in h.models),
        counts=(zeros,) * depth,
        probs=tuple(jnp.zeros((batch, cap, h.vocab_size), jnp.float32) for cap in h.capacities),
        committed=prompt_lengths, out=OutputBuffer.init(batch, max_new_tokens, pad_id), key=key,
        forward_passes=jnp.zeros((batch, depth + 1), jnp.int32),
        proposed=jnp.zeros((batch, depth), jnp.int32), accepted=jnp.zeros((batch, depth), jnp.int32),
        rounds=zeros)
    st = plan.loops.while_loop(lambda s: ~jnp.all(s.out.done), partial(_round, plan), st)
    stats = HSDStats(forward_passes=st.forward_passes, proposed=st.proposed, accepted=st.accepted,
                     target_rounds=st.rounds,
                     tokens_per_target_call=st.out.num_tokens / jnp.maximum(st.rounds, 1))
    return GenerationOutput(tokens=st.out.tokens, num_tokens=st.out.num_tokens, stats=stats)


_STATIC = ("max_new_tokens", "sampling", "eos_token_id", "cache_size", "pad_id", "trace")


def _run(hierarchy: Hierarchy, prompt, prompt_lengths, key, *, max_new_tokens, sampling, eos_token_id,
         cache_size, pad_id, trace: bool) -> GenerationOutput:
    plan = _Plan(hierarchy, sampling, eos_token_id, _COMPILED if trace else _PYTHON)
    return _generate(plan, prompt, prompt_lengths, key, max_new_tokens, cache_size, pad_id)


_run_jit = jax.jit(_run, static_argnames=_STATIC)


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
        batch = out.num_tokens.shape[0]
        empty = jnp.zeros((batch, 0), jnp.int32)
        rounds = out.num_tokens
        return out.replace(stats=HSDStats(forward_passes=rounds[:, None], proposed=empty, accepted=empty,
                                          target_rounds=rounds, tokens_per_target_call=jnp.ones(batch)))
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
    run = _run_jit if trace else _run
    return run(hierarchy, jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32), key,
               max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=eos_token_id,
               cache_size=cache_size, pad_id=eos_token_id if eos_token_id is not None else 0, trace=trace)
