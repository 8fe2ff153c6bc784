"""The sampler draws from the law it is given: chi-square over a vocabulary spanning several
256-token blocks, and tokens with zero (or negative round-off) probability are never drawn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from hsd_jax.decoding.sampling import sample


def _draw(probs: np.ndarray, n: int, seed: int) -> np.ndarray:
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return np.asarray(jax.jit(jax.vmap(lambda k: sample(k, jnp.asarray(probs, jnp.float32))))(keys))


def test_sample_follows_the_law_across_blocks():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(700))
    tokens = _draw(probs, 300_000, seed=1)
    observed = np.bincount(tokens, minlength=probs.size)
    assert stats.chisquare(observed, probs * tokens.size).pvalue > 1e-3


def test_sample_never_draws_zero_or_negative_mass():
    probs = np.zeros(600)
    probs[[3, 299, 599]] = [0.5, 0.25, 0.25]
    probs[[0, 257, 598]] = -1e-9  # round-off below zero
    tokens = _draw(probs, 20_000, seed=2)
    assert set(np.unique(tokens)) == {3, 299, 599}
    freq = np.bincount(tokens, minlength=600)[[3, 299, 599]] / tokens.size
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.25], atol=0.02)


def test_a_one_hot_law_is_drawn_every_time():
    for hot in (0, 255, 256, 511):
        probs = np.zeros(512)
        probs[hot] = 1.0
        assert set(_draw(probs, 500, seed=hot)) == {hot}
