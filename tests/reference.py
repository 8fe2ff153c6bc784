"""Check an hsd-jax model against its transformers original, through the KV cache."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

from hsd_jax.models import Model, forward
from hsd_jax.models.cache import KVCache


@functools.cache
def _jitted_forward():
    return jax.jit(forward, static_argnums=(1, 4))


def _step(model: Model, tokens: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
    logits, cache = _jitted_forward()(
        model.params, model.config, jnp.asarray(tokens, jnp.int32), cache, model.layout
    )
    return np.asarray(logits), cache


def torch_logits(torch_model: torch.nn.Module, sequence: list[int]) -> np.ndarray:
    """float32 logits [T, V] of one sequence, run without any cache."""
    with torch.no_grad():
        return torch_model(torch.tensor([sequence])).logits[0].float().numpy()


def compare_with_torch(model: Model, torch_model: torch.nn.Module, prompts: list[list[int]],
                       vocab: int, seed: int = 0, cache_size: int = 64) -> float:
    """Max abs logit difference over a right-padded prefill of `prompts`, steps of T=1 and T=4 at
    each row's own offset, and a per-row rollback followed by T=4 new tokens.

    The reference for every row is torch on that row's sequence alone, without a cache. As the
    model is causal, one torch run over a row's longest sequence before the rollback and one
    after it cover every position that was checked.
    """
    rng = np.random.default_rng(seed)
    seqs = [list(map(int, p)) for p in prompts]
    batch, lengths = len(seqs), np.array([len(s) for s in seqs])
    checks: list[tuple[int, list[int], np.ndarray]] = []  # (row, its sequence, our last logits)

    prefill = np.zeros((batch, lengths.max()), np.int32)
    for b, s in enumerate(seqs):
        prefill[b, :len(s)] = s
    logits, cache = _step(model, prefill, model.init_cache(batch, cache_size))
    checks += [(b, list(seqs[b]), logits[b, :n]) for b, n in enumerate(lengths)]
    cache = cache.with_lengths(jnp.asarray(lengths))  # forget the padding

    def extend(new_tokens: np.ndarray, cache: KVCache) -> KVCache:
        logits, cache = _step(model, new_tokens, cache)
        for b in range(batch):
            seqs[b] += [int(t) for t in new_tokens[b]]
            checks.append((b, list(seqs[b]), logits[b]))
        return cache

    for steps in (1, 4):
        cache = extend(rng.integers(0, vocab, (batch, steps)), cache)
    before_rollback = [list(s) for s in seqs]
    back = (np.arange(batch) % 3) + 1  # roll rows back by different amounts
    seqs = [s[:len(s) - k] for s, k in zip(seqs, back)]
    cache = cache.with_lengths(cache.lengths - jnp.asarray(back, jnp.int32))
    cache = extend(rng.integers(0, vocab, (batch, 4)), cache)
    assert np.array_equal(np.asarray(cache.lengths), [len(s) for s in seqs])

    references = {}
    worst = 0.0
    for b, seq, ours in checks:
        full = next(s for s in (before_rollback[b], seqs[b]) if s[:len(seq)] == seq)
        if tuple(full) not in references:
            references[tuple(full)] = torch_logits(torch_model, full)
        ref = references[tuple(full)][len(seq) - len(ours):len(seq)]
        worst = max(worst, float(np.abs(ours - ref).max()))
    return worst
