"""The sampler draws from the law it is given, with XLA's ops and on our CPU kernel: chi-square over
a vocabulary spanning several 256-token blocks, and tokens with zero (or negative round-off)
probability are never drawn."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from hsd_jax.decoding.sampling import sample
from hsd_jax.models import cpu_kernel

KERNEL = [False, pytest.param(True, marks=pytest.mark.skipif(
    not cpu_kernel.rows_available(), reason=f"no CPU kernel here: {cpu_kernel.build_error()}"))]
CHUNK = 20_000  # rows per call: each row is one independent draw


@functools.cache
def _sampler(kernel: bool):
    return jax.jit(lambda key, probs: sample(key, jnp.broadcast_to(probs, (CHUNK, probs.shape[-1])),
                                             kernel=kernel))


def _draw(probs: np.ndarray, n: int, seed: int, kernel: bool) -> np.ndarray:
    keys = jax.random.split(jax.random.PRNGKey(seed), -(-n // CHUNK))
    probs = jnp.asarray(probs, jnp.float32)
    return np.concatenate([np.asarray(_sampler(kernel)(key, probs)) for key in keys])[:n]


@pytest.mark.parametrize("kernel", KERNEL)
def test_sample_follows_the_law_across_blocks(kernel):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(700))
    tokens = _draw(probs, 300_000, seed=1, kernel=kernel)
    observed = np.bincount(tokens, minlength=probs.size)
    assert stats.chisquare(observed, probs * tokens.size).pvalue > 1e-3


@pytest.mark.parametrize("kernel", KERNEL)
def test_sample_never_draws_zero_or_negative_mass(kernel):
    probs = np.zeros(600)
    probs[[3, 299, 599]] = [0.5, 0.25, 0.25]
    probs[[0, 257, 598]] = -1e-9  # round-off below zero
    tokens = _draw(probs, 20_000, seed=2, kernel=kernel)
    assert set(np.unique(tokens)) == {3, 299, 599}
    freq = np.bincount(tokens, minlength=600)[[3, 299, 599]] / tokens.size
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.25], atol=0.02)


@pytest.mark.parametrize("kernel", KERNEL)
def test_a_one_hot_law_is_drawn_every_time(kernel):
    for hot in (0, 255, 256, 511):
        probs = np.zeros(512)
        probs[hot] = 1.0
        assert set(_draw(probs, 500, seed=hot, kernel=kernel)) == {hot}
