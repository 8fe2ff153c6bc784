"""Verification rules: one verifier call over one draft path, vectorised over batch and draft length.

Every rule is written as its exact outcome law: given the drafts x_1..x_γ (γ may differ per row),
their draft distributions q_1..q_γ and the verifier's distributions p_1..p_{γ+1}, a rule gives
  * `tau_probs[b, t]` = P(exactly t drafts are accepted), t = 0..G, and
  * the weights w_t of its residuals: after a rejection at offset t < γ the next token is drawn
    from norm((w_t p_{t+1} - q_{t+1})^+) (tokenwise: w = 1), after τ = γ from the bonus p_{γ+1}.
`outcome` forms these laws (`next_dists[b, t]`) for tests to enumerate; `verify` draws τ, then
the token from row τ's residual alone. Drawing τ from its law is equivalent in distribution to
the rules' sequential coin flips.

Array layout: q[:, i] and p[:, i] are the distributions of the token at draft offset i
(0-based), p[:, γ] is the bonus distribution. Offsets >= γ of q, and > γ of p, are ignored.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from hsd_jax.decoding.sampling import sample, total

LOSSLESS_RULES = ("tokenwise", "block")
INEXACT_RULES = ("zhou",)
RULES = LOSSLESS_RULES + INEXACT_RULES
EMPTY = 1e-12  # a residual with no more mass than this is numerically empty: p is drawn instead


class Outcome(NamedTuple):
    tau_probs: jax.Array  # [B, G+1]
    next_dists: jax.Array  # [B, G+1, V]


class _Law(NamedTuple):
    """A rule's outcome before the V-sized laws are formed: P(τ = t) [B, G+1] and the weights w
    [B, G] of its residuals (p_{t+1} w_t - q_{t+1})^+, the law of the token after a rejection at
    offset t (tokenwise: w = 1)."""

    tau_probs: jax.Array
    weights: jax.Array


class Verdict(NamedTuple):
    num_accepted: jax.Array  # [B] int32, τ
    next_token: jax.Array  # [B] int32


def check_rule(rule: str, allow_inexact: bool = False) -> str:
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"unknown verifier {rule!r}; choose one of {', '.join(RULES)}")
    if rule in INEXACT_RULES and not allow_inexact:
        raise ValueError(
            f"verifier {rule!r} is not lossless (its exact-enumeration test measures a bias; see the "
            "README, 'Verification rules'); pass allow_inexact=True (--allow-inexact) to use it anyway")
    return rule


def _residuals(weights, q, p) -> jax.Array:
    """(w_t p_{t+1} - q_{t+1})^+ at every draft offset t < G (0-based arrays: p[:, t], q[:, t]):
    [B, G, V]."""
    return jnp.maximum(weights[..., None] * p[:, :-1] - q, 0.0)


def _draft_ratio_terms(draft_tokens, draft_len, q, p):
    """p_i(x_i), q_i(x_i) at each draft offset, and the mask of offsets < γ."""
    width = draft_tokens.shape[1]
    in_draft = jnp.arange(width)[None, :] < draft_len[:, None]
    p_x = jnp.take_along_axis(p[:, :width], draft_tokens[..., None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(q, draft_tokens[..., None], axis=-1)[..., 0]
    return p_x, q_x, in_draft


def tokenwise(draft_tokens, draft_len, q, p, kernel=False) -> _Law:
    """Leviathan et al. 2023 / Chen et al. 2023: accept x_i w.p. min(1, p_i(x_i)/q_i(x_i));
    at the first rejection resample from norm((p_i - q_i)^+). (No V-sized sums: `kernel` unused.)"""
    p_x, q_x, in_draft = _draft_ratio_terms(draft_tokens, draft_len, q, p)
    accept = jnp.where(in_draft, jnp.minimum(1.0, p_x / jnp.where(in_draft, q_x, 1.0)), 0.0)
    accept = jnp.concatenate([accept, jnp.zeros_like(accept[:, :1])], axis=1)  # [B, G+1]
    survive = jnp.cumprod(jnp.concatenate([jnp.ones_like(accept[:, :1]), accept[:, :-1]], axis=1), axis=1)
    return _Law(survive * (1.0 - accept), jnp.ones_like(q_x))


def _block_weights(draft_tokens, draft_len, q, p):
    """w_0 = 1, w_i = min(1, w_{i-1} p_i(x_i)/q_i(x_i)) = R_i / max(1, max_{j<=i} R_j) (Sun et al. 2024),
    computed in log space. Also returns log R_i."""
    p_x, q_x, in_draft = _draft_ratio_terms(draft_tokens, draft_len, q, p)
    log_ratio = jnp.where(in_draft, jnp.log(p_x) - jnp.log(jnp.where(in_draft, q_x, 1.0)), 0.0)
    log_r = jnp.concatenate([jnp.zeros_like(log_ratio[:, :1]), jnp.cumsum(log_ratio, axis=1)], axis=1)
    log_w = log_r - jnp.maximum(0.0, jax.lax.cummax(log_r, axis=1))
    return jnp.minimum(1.0, jnp.exp(log_w)), log_r  # exp may round above 1


def _block_outcome(w, final_accept, draft_len, q, p, kernel) -> _Law:
    """τ = the largest i with η_i ~ Bern(h_i) = 1, where for i < γ
    h_i = Σ(w_i p_{i+1} - q_{i+1})^+ / [Σ(w_i p_{i+1} - q_{i+1})^+ + 1 - w_i], h_γ = `final_accept`,
    h_0 := 1; the next token's law is norm((w_τ p_{τ+1} - q_{τ+1})^+), or p_{γ+1} if τ = γ: its
    weights are w_0..w_{G-1}."""
    width = q.shape[1]
    offsets = jnp.arange(width + 1)[None, :]
    mass = total(_residuals(w[:, :-1], q, p), kernel=kernel)  # [B, G]
    denominator = mass + 1.0 - w[:, :-1]
    h = jnp.clip(
        jnp.where(denominator > 0, mass / jnp.where(denominator > 0, denominator, 1.0), 0.0), 0.0, 1.0
    )
    h = jnp.concatenate([h, jnp.zeros_like(h[:, :1])], axis=1)
    h = jnp.where(
        offsets == draft_len[:, None], final_accept, jnp.where(offsets < draft_len[:, None], h, 0.0)
    )
    h = h.at[:, 0].set(1.0)
    # P(τ = t) = h_t Π_{j > t} (1 - h_j)
    keep_after = jnp.flip(jnp.cumprod(jnp.flip(1.0 - h, axis=1), axis=1), axis=1)
    none_after = jnp.concatenate([keep_after[:, 1:], jnp.ones_like(h[:, :1])], axis=1)
    return _Law(h * none_after, w[:, :-1])


def block(draft_tokens, draft_len, q, p, kernel=False) -> _Law:
    """Block verification (Sun, Mendlovic, Leviathan, Aharoni, Beirami, Ro, Suresh; ICLR 2025)."""
    w, _ = _block_weights(draft_tokens, draft_len, q, p)
    final = jnp.take_along_axis(w, draft_len[:, None], axis=1)
    return _block_outcome(w, final, draft_len, q, p, kernel)


def zhou(draft_tokens, draft_len, q, p, kernel=False) -> _Law:
    """Zhou et al. (arXiv 2601.05724) as released: block verification whose last stop
    probability is min(1, R_γ) instead of w_γ. Not lossless: see tests/test_exactness.py."""
    w, log_r = _block_weights(draft_tokens, draft_len, q, p)
    final = jnp.minimum(1.0, jnp.exp(jnp.take_along_axis(log_r, draft_len[:, None], axis=1)))
    return _block_outcome(w, final, draft_len, q, p, kernel)


_OUTCOMES = {"tokenwise": tokenwise, "block": block, "zhou": zhou}


def _law(rule, draft_tokens, draft_len, q, p, kernel) -> tuple[_Law, jax.Array, jax.Array]:
    batch, width = draft_tokens.shape
    chex.assert_shape(draft_len, (batch,))
    chex.assert_shape(q, (batch, width, None))
    chex.assert_shape(p, (batch, width + 1, q.shape[-1]))
    chex.assert_type([draft_tokens, draft_len], jnp.int32)
    q, p = q.astype(jnp.float32), p.astype(jnp.float32)
    return _OUTCOMES[rule](draft_tokens, draft_len, q, p, kernel), q, p


def outcome(rule: str, draft_tokens, draft_len, q, p) -> Outcome:
    """The exact law of (τ, next token) under `rule`. Shapes: draft_tokens [B,G], draft_len [B],
    q [B,G,V], p [B,G+1,V]. The next token's law after τ = t < γ is the normalised residual
    (p_{t+1} w_t - q_{t+1})^+ (p_{t+1} itself where that is numerically empty), after τ = γ p_{γ+1}."""
    law, q, p = _law(rule, draft_tokens, draft_len, q, p, False)
    residual = _residuals(law.weights, q, p)
    width = residual.shape[1]
    use_residual = (jnp.arange(width + 1)[None, :] < draft_len[:, None])[..., None]
    padded = jnp.concatenate([residual, jnp.zeros_like(residual[:, :1])], axis=1)
    mass = jnp.sum(padded, axis=-1, keepdims=True)
    normalised = padded / jnp.where(mass > EMPTY, mass, 1.0)
    return Outcome(law.tau_probs, jnp.where(use_residual & (mass > EMPTY), normalised, p))


def verify_greedy(draft_tokens, draft_len, predicted) -> Verdict:
    """Every lossless rule at temperature 0, without V-sized laws. With one-hot q and p, x_i is
    accepted iff it is the verifier's argmax (p_i(x_i) = 1 = q_i(x_i)), and after the first
    rejection both the residual (p - q)^+ and the bonus are one-hot on the verifier's argmax.
    `predicted` [B, G+1] holds the verifier's argmax at each draft offset and the one after."""
    width = draft_tokens.shape[1]
    chex.assert_shape(predicted, (draft_tokens.shape[0], width + 1))
    in_draft = jnp.arange(width)[None, :] < draft_len[:, None]
    agree = (draft_tokens == predicted[:, :width]) & in_draft
    tau = jnp.sum(jnp.cumprod(agree.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    return Verdict(num_accepted=tau, next_token=jnp.take_along_axis(predicted, tau[:, None], axis=1)[:, 0])


def verify(rule: str, key: jax.Array, draft_tokens, draft_len, q, p, *, kernel: bool = False) -> Verdict:
    """Accept a prefix of each row's drafts and draw the next token from `outcome`'s law: τ first,
    then the token from row τ's residual alone (unnormalised: `sample` scales its uniforms by the
    row's mass), so only one V-sized law is formed. With `kernel` (`sampling.on_kernel`) the sums
    and draws run on our CPU kernel."""
    law, q, p = _law(rule, draft_tokens, draft_len, q, p, kernel)
    tau_key, token_key = jax.random.split(key)
    tau = sample(tau_key, law.tau_probs, kernel=kernel)
    row = jnp.minimum(tau, q.shape[1] - 1)[:, None, None]
    weight = jnp.take_along_axis(law.weights, row[..., 0], axis=1)
    after = jnp.take_along_axis(p, tau[:, None, None], axis=1)[:, 0]  # p_{τ+1}
    residual = jnp.maximum(weight * after - jnp.take_along_axis(q, row, axis=1)[:, 0], 0.0)
    use_residual = (tau < draft_len) & (total(residual, kernel=kernel) > EMPTY)
    chosen = jnp.where(use_residual[:, None], residual, after)
    return Verdict(num_accepted=tau, next_token=sample(token_key, chosen, kernel=kernel))
