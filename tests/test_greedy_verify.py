"""At temperature 0, HSD passes argmax tokens between levels instead of [.., V] laws. This checks
that shortcut against the exact outcome laws of every lossless rule on one-hot q and p: τ and the
next token are point masses at what `verify_greedy` returns."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsd_jax.decoding.verify import LOSSLESS_RULES, outcome, verify_greedy

VOCAB = 3


def _cases(width: int):
    """Every draft of `width` tokens, draft length and verifier argmax sequence over 3 tokens."""
    for drafts in itertools.product(range(VOCAB), repeat=width):
        for predicted in itertools.product(range(VOCAB), repeat=width + 1):
            for length in range(width + 1):
                yield drafts, length, predicted


@pytest.mark.parametrize("rule", LOSSLESS_RULES)
def test_verify_greedy_is_every_lossless_rule_at_temperature_0(rule):
    cases = list(_cases(3))
    drafts = jnp.asarray([c[0] for c in cases], jnp.int32)
    lengths = jnp.asarray([c[1] for c in cases], jnp.int32)
    predicted = jnp.asarray([c[2] for c in cases], jnp.int32)
    q = jax.nn.one_hot(drafts, VOCAB)  # a greedy drafter's law is one-hot on its own draft
    p = jax.nn.one_hot(predicted, VOCAB)
    tau_probs, next_dists = outcome(rule, drafts, lengths, q, p)
    tau, token = verify_greedy(drafts, lengths, predicted)
    tau, token = np.asarray(tau), np.asarray(token)
    rows = np.arange(len(cases))
    np.testing.assert_allclose(np.asarray(tau_probs)[rows, tau], 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(next_dists)[rows, tau, token], 1.0, atol=1e-6)
    # and τ is the length of the agreeing prefix, capped by the draft length
    for i, (d, n, pred) in enumerate(cases):
        expected = next((j for j in range(n) if d[j] != pred[j]), n)
        assert tau[i] == expected and token[i] == pred[expected]
