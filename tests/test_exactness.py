"""Losslessness: every verifier offered as lossless, and `hsd_generate` built on them, samples
exactly the target's law.

1. Rule level, exact (no sampling): `verify.outcome` gives the law of (τ, next token) for one
   verification; enumerating the drafts x ~ q gives the exact law of what one verify step emits,
   x_1..x_τ, y. The criterion (research.md §2): that emitted prefix, continued by sampling from the
   target p until it has length γ+1, must have p's sequence law of length γ+1. Tokenwise and block
   meet it to float32 round-off; Zhou et al.'s rule does not (for γ >= 2).
2. End to end, statistical: one `hsd_generate` call over many identical prompt rows; the empirical
   law of the 3 generated tokens is chi-square tested against the target law computed by
   enumeration with the target model alone.
3. The chi-square harness has the power it claims: a sampler with a 1% bias is rejected.
"""

from __future__ import annotations

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import tiny_config
from scipy import stats

from hsd_jax.decoding.hsd import Hierarchy, hsd_generate
from hsd_jax.decoding.ngram import NGramDrafter
from hsd_jax.decoding.sampling import SamplingParams, distribution
from hsd_jax.decoding.verify import LOSSLESS_RULES, RULES, outcome, verify
from hsd_jax.models import Model, cpu_kernel, forward, init_params

# =============================================================================================
# 1. Rule level: exact enumeration
# =============================================================================================


_jit_outcome = jax.jit(outcome, static_argnums=0)


def _outcome(rule, drafts, draft_len, q, p):
    """`outcome` as float64 numpy; rows are padded to a multiple of 128 (copies of row 0) so that
    few shapes are compiled."""
    n = len(drafts)
    pad = (lambda a: np.concatenate([a, np.repeat(a[:1], -n % 128, axis=0)]))
    tau, nxt = _jit_outcome(rule, jnp.asarray(pad(drafts), jnp.int32), jnp.asarray(pad(draft_len), jnp.int32),
                            jnp.asarray(pad(q), jnp.float32), jnp.asarray(pad(p), jnp.float32))
    return np.asarray(tau, np.float64)[:n], np.asarray(nxt, np.float64)[:n]


# --- the toy of research.md §2: binary vocabulary, A = 0, B = 1, γ = 2 -------------------------
TOY_P = np.array([1 / 3, 2 / 3])
TOY_Q = np.array([2 / 3, 1 / 3])
TOY_DRAFTS = np.array(list(itertools.product(range(2), repeat=2)), np.int32)  # AA, AB, BA, BB
TOY_WEIGHTS = np.prod(TOY_Q[TOY_DRAFTS], axis=1)  # q-probability of each draft


def _toy(rule):
    n = len(TOY_DRAFTS)
    return _outcome(rule, TOY_DRAFTS, np.full(n, 2), np.tile(TOY_Q, (n, 2, 1)), np.tile(TOY_P, (n, 3, 1)))


def _toy_two_token_law(rule) -> np.ndarray:
    """Law [2, 2] of the first two output tokens: the emitted x_1..x_τ, y, continued from p."""
    tau, nxt = _toy(rule)
    law = np.zeros((2, 2))
    for b, x in enumerate(TOY_DRAFTS):
        law[x[0], x[1]] += TOY_WEIGHTS[b] * tau[b, 2]  # τ = 2: both drafts kept, y is the 3rd token
        law[x[0]] += TOY_WEIGHTS[b] * tau[b, 1] * nxt[b, 1]  # τ = 1: (x_1, y)
        law += TOY_WEIGHTS[b] * tau[b, 0] * nxt[b, 0][:, None] * TOY_P[None, :]  # τ = 0: (y, p)
    return law


@pytest.mark.parametrize("rule,expected", [("tokenwise", 10 / 9), ("block", 11 / 9)])
def test_toy_expected_accepted_drafts(rule, expected):
    tau, _ = _toy(rule)
    np.testing.assert_allclose(tau.sum(axis=1), 1.0, atol=1e-6)
    accepted = float(np.sum(TOY_WEIGHTS[:, None] * tau * np.arange(3)))
    assert abs(accepted - expected) < 1e-6, (rule, accepted * 9, "/ 9")


def test_toy_two_token_law():
    target = np.outer(TOY_P, TOY_P)  # AA 1/9, AB 2/9, BA 2/9, BB 4/9
    for rule in LOSSLESS_RULES:
        np.testing.assert_allclose(_toy_two_token_law(rule), target, atol=1e-6, err_msg=rule)
    # Zhou et al. (final acceptance min(1, R_γ) instead of w_γ) on the toy, measured here:
    #   law of the first two tokens AA 1/9, AB 2/9, BA 1/3 (target 2/9), BB 1/3 (target 4/9);
    #   expected accepted drafts 12/9 (tokenwise 10/9, block 11/9): it "accepts more" by being biased.
    zhou = _toy_two_token_law("zhou")
    np.testing.assert_allclose(zhou, [[1 / 9, 2 / 9], [1 / 3, 1 / 3]], atol=1e-6)
    tau, _ = _toy("zhou")
    assert abs(np.sum(TOY_WEIGHTS[:, None] * tau * np.arange(3)) - 12 / 9) < 1e-6


# --- random context-dependent p and q ---------------------------------------------------------


def _random_tables(rng: np.random.Generator, vocab: int, depth: int, sparse: bool) -> dict:
    """A next-token distribution for every prefix of length 0..depth (a context-dependent model).
    `sparse`: about a third of the distributions get a zero entry (as top-k / top-p produce), so
    drafts the target cannot emit, and targets the draft never proposes, both occur."""
    table = {}
    for length in range(depth + 1):
        for prefix in itertools.product(range(vocab), repeat=length):
            d = rng.dirichlet(np.full(vocab, 0.7))
            if sparse and rng.random() < 0.35:
                d[rng.integers(vocab)] = 0.0
                d = d / d.sum() if d.sum() > 0 else np.full(vocab, 1.0 / vocab)
            table[prefix] = d
    return table


def _seq_prob(table: dict, seq: tuple, start: tuple = ()) -> float:
    """P(seq | start) under a table model."""
    prob, context = 1.0, tuple(start)
    for token in seq:
        prob *= table[context][token]
        context += (token,)
    return prob


def _one_step_laws(rule, p_tab, q_tab, vocab, width, rng):
    """For every draft length L = 0..width, rows padded to `width` with garbage, all in ONE batch:
    returns {L: (emitted law continued from p to length L+1, p's law of length L+1)}, plus the
    raw outcome for invariant checks."""
    rows = []  # (L, draft tuple, q-weight)
    for length in range(width + 1):
        for x in itertools.product(range(vocab), repeat=length):
            weight = _seq_prob(q_tab, x)
            if weight > 0:  # drafts outside q's support are never proposed
                rows.append((length, x, weight))
    n = len(rows)
    drafts = rng.integers(vocab, size=(n, width))  # garbage beyond L
    q = rng.dirichlet(np.ones(vocab), size=(n, width))
    p = rng.dirichlet(np.ones(vocab), size=(n, width + 1))
    lengths = np.array([r[0] for r in rows])
    for b, (length, x, _) in enumerate(rows):
        drafts[b, :length] = x
        for i in range(length):
            q[b, i] = q_tab[x[:i]]
        for i in range(length + 1):
            p[b, i] = p_tab[x[:i]]
    tau, nxt = _outcome(rule, drafts, lengths, q, p)

    laws = {}
    for length in range(width + 1):
        shape = (vocab,) * (length + 1)
        emitted, target = np.zeros(shape), np.zeros(shape)
        for seq in itertools.product(range(vocab), repeat=length + 1):
            target[seq] = _seq_prob(p_tab, seq)
        for b, (row_len, x, weight) in enumerate(rows):
            if row_len != length:
                continue
            for t in range(length + 1):
                for y in range(vocab):
                    head = x[:t] + (y,)
                    mass = weight * tau[b, t] * nxt[b, t, y]
                    if mass == 0:
                        continue
                    for tail in itertools.product(range(vocab), repeat=length - t):
                        emitted[head + tail] += mass * _seq_prob(p_tab, tail, head)
        laws[length] = (emitted, target)
    return laws, (lengths, tau, nxt)


RANDOM_CASES = [
    (v, g, seed, sparse) for v in (3, 4) for g in (1, 2, 3) for seed in (0, 1) for sparse in (False, True)
]


@pytest.mark.parametrize("rule", RULES)
def test_one_verification_emits_the_target_law(rule):
    worst = {}  # (V, γ) -> largest |emitted - target| over seeds, draft lengths and cells
    for vocab, width, seed, sparse in RANDOM_CASES:
        rng = np.random.default_rng([vocab, width, seed, sparse])
        p_tab = _random_tables(rng, vocab, width, sparse)
        q_tab = _random_tables(rng, vocab, width, sparse)
        laws, (lengths, tau, nxt) = _one_step_laws(rule, p_tab, q_tab, vocab, width, rng)
        # invariants of the outcome itself
        assert np.isfinite(tau).all() and np.isfinite(nxt).all()
        assert (tau >= -1e-7).all() and (nxt >= -1e-7).all()
        np.testing.assert_allclose(tau.sum(axis=1), 1.0, atol=1e-6)
        assert np.all(tau[np.arange(width + 1)[None, :] > lengths[:, None]] < 1e-7), "τ beyond the draft"
        used = np.arange(width + 1)[None, :] <= lengths[:, None]
        np.testing.assert_allclose(nxt.sum(axis=-1)[used], 1.0, atol=1e-5)
        for length, (emitted, target) in laws.items():
            np.testing.assert_allclose(emitted.sum(), 1.0, atol=1e-5)
            diff = float(np.abs(emitted - target).max())
            key = (vocab, length)
            worst[key] = max(worst.get(key, 0.0), diff)
            if rule in LOSSLESS_RULES or length <= 1:
                # Zhou's rule equals block verification when γ <= 1 (min(1, R_1) = w_1)
                assert diff < 1e-6, (rule, vocab, width, seed, sparse, length, diff)
    if rule == "zhou":
        # measured: the emitted law misses the target by up to 0.018-0.044 per sequence for γ = 2, 3
        # (lossless rules: <= 6e-8 everywhere)
        for (vocab, length), diff in worst.items():
            if length >= 2:
                assert diff > 1e-2, (vocab, length, diff)


@pytest.mark.parametrize("rule", RULES)
def test_greedy_accepts_the_argmax_matching_prefix(rule):
    """One-hot p and q (temperature 0): τ = the longest prefix on which q's argmax equals p's,
    and the next token is p's argmax after it, with probability one."""
    vocab, width = 4, 3
    rng = np.random.default_rng(7)
    drafts, lengths, q, p, expect_tau, expect_next = [], [], [], [], [], []
    for _ in range(64):
        length = int(rng.integers(0, width + 1))
        x, qs, ps = [], np.zeros((width, vocab)), np.zeros((width + 1, vocab))
        match = None
        for i in range(width + 1):
            best = int(rng.integers(vocab))
            ps[i, best] = 1.0
            if i < length:
                proposal = best if rng.random() < 0.6 else int((best + rng.integers(1, vocab)) % vocab)
                qs[i, proposal] = 1.0
                x.append(proposal)
                if match is None and proposal != best:
                    match = (i, best)
            elif match is None:
                match = (i, best)
        x += list(rng.integers(vocab, size=width - len(x)))  # garbage padding
        qs[length:] = rng.dirichlet(np.ones(vocab), size=width - length)
        drafts.append(x), lengths.append(length), q.append(qs), p.append(ps)
        expect_tau.append(match[0]), expect_next.append(match[1])
    tau, nxt = _outcome(rule, np.array(drafts), np.array(lengths), np.array(q), np.array(p))
    rows = np.arange(len(drafts))
    np.testing.assert_allclose(tau, np.eye(width + 1)[expect_tau], atol=1e-6)
    np.testing.assert_allclose(nxt[rows, expect_tau], np.eye(vocab)[expect_next], atol=1e-6)


KERNEL = [False, pytest.param(True, marks=pytest.mark.skipif(
    not cpu_kernel.rows_available(), reason=f"no CPU kernel here: {cpu_kernel.build_error()}"))]


@pytest.mark.parametrize("kernel", KERNEL)
@pytest.mark.parametrize("rule", RULES)
def test_verify_draws_from_the_outcome_law(rule, kernel):
    """`verify` draws τ, then the token from row τ's residual alone (unnormalised, on our CPU
    kernel or XLA's ops): over 100k rows per case the joint (τ, token) counts fit `outcome`'s
    exact law (chi-square at ALPHA; a cell outside its support fails outright), for every rule,
    lossless or not. p is half q, the drafts q's favourites, so block weights fall to ~0.5 and
    every τ is likely (drawing block's residuals with w = 1 is 0.027 off in total variation and
    fails). Cases: full drafts; a one-token draft whose later offsets hold zeros in q (as unused
    buffer rows do: an unmasked ratio there would be infinite) and garbage tokens; and p = q at
    the first offset (block's residual there is empty after a rejection, so p is drawn)."""
    rows, vocab, width = 100_000, 5, 3
    rng = np.random.default_rng(3)
    for case, length in enumerate((3, 1, 2)):
        q = rng.dirichlet(np.ones(vocab), size=width)
        p = 0.5 * np.concatenate([q, q[:1]]) + 0.5 * rng.dirichlet(np.ones(vocab), size=width + 1)
        if case == 2:
            p[0] = q[0]
        drafts = np.argmax(q, axis=-1)
        q[length:] = 0.0
        drafts[length:] = rng.integers(vocab, size=width - length)
        one = (jnp.asarray(drafts[None], jnp.int32), jnp.full((1,), length, jnp.int32),
               jnp.asarray(q[None], jnp.float32), jnp.asarray(p[None], jnp.float32))
        tau_probs, next_dists = (np.asarray(a, np.float64)[0] for a in outcome(rule, *one))
        law = (tau_probs[:, None] * next_dists).ravel()
        law /= law.sum()
        batch = [jnp.repeat(a, rows, axis=0) for a in one]
        draw = jax.jit(lambda key, *a: verify(rule, key, *a, kernel=kernel))
        verdict = draw(jax.random.PRNGKey(case), *batch)
        counts = np.bincount(np.asarray(verdict.num_accepted) * vocab + np.asarray(verdict.next_token),
                             minlength=law.size)
        pvalue, _, _ = chi_square(counts, law)
        assert pvalue > ALPHA, (case, pvalue, counts, law)


# =============================================================================================
# 2. + 3. End to end: chi-square tests of hsd_generate against the exact target law
# =============================================================================================

VOCAB = 4
NEW = 3  # generated tokens: VOCAB ** NEW = 64 cells
PROMPT = np.array([1, 2, 3], np.int32)
ROWS = 200_000
ALPHA = 1e-3  # the exactness tests fail below this p-value
BIAS = 0.01
MIN_EXPECTED = 5.0

# Power (asserted by `_power` in every end-to-end test, and checked empirically by
# test_harness_rejects_a_biased_sampler): a sampler that moves an absolute 1% of probability from
# cell i to cell j shifts Pearson's statistic to a noncentral chi-square with
# λ = N·0.01²·(1/π_i + 1/π_j). The hardest pair to catch is the two likeliest cells. At N = 200k:
#   * temperature 1 (64 cells, 7 rare ones pooled, df = 57): π = 0.294, 0.176, λ = 182,
#     critical value chi2.isf(0.001, 57) = 95.8, power = P(ncx2(57, 182) > 95.8) = 1 - 5e-10;
#   * top_k = 3 (27 cells, df = 26): π = 0.303, 0.202, λ = 165, critical 54.1, power = 1 - 6e-12;
#   * top_k = 2 (8 cells, df = 7): π = 0.345, 0.259, λ = 135, critical 24.3, power = 1 - 7e-13.
# Even the least favourable law possible (two cells of 1/2: λ = 80) would be caught with power
# 0.984 at df = 57. N = 100k would still give power 0.99 for the temperature-1 law; 200k keeps a
# margin and each case under ~25 s on 2 CPU cores.

MODEL_CONFIG = tiny_config(vocab=VOCAB, layers=1, hidden=16, num_heads=2, num_kv_heads=1, head_dim=8,
                           intermediate_size=16)


@pytest.fixture(scope="module")
def models() -> dict[str, Model]:
    """The target and two drafts that are perturbed copies of it: M_0 is accepted by the target
    about half the time, M_1 about 80% (measured below through HSDStats), so acceptances,
    rejections, corrections, bonus tokens and overshoot all happen often."""
    params = init_params(MODEL_CONFIG, jax.random.PRNGKey(0), scale=0.5)

    def perturbed(seed, eps):
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
        noisy = [x + eps * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
        return Model(jax.tree.unflatten(tree, noisy), MODEL_CONFIG)

    return {"target": Model(params, MODEL_CONFIG), "m0": perturbed(1, 0.06), "m1": perturbed(2, 0.03)}


SEQUENCES = np.array(list(itertools.product(range(VOCAB), repeat=NEW)), np.int32)  # cell order


def exact_target_law(target: Model, sampling: SamplingParams) -> np.ndarray:
    """P(the 3 generated tokens = SEQUENCES[c]) under plain sampling from the target: one
    cache-free forward over PROMPT + every full sequence gives every prefix's next-token law."""
    tokens = np.concatenate([np.tile(PROMPT, (len(SEQUENCES), 1)), SEQUENCES], axis=1)
    logits, _ = forward(target.params, target.config, jnp.asarray(tokens),
                        target.init_cache(len(SEQUENCES), tokens.shape[1]))
    dists = np.asarray(distribution(logits, sampling), np.float64)
    rows = np.arange(len(SEQUENCES))
    law = np.ones(len(SEQUENCES))
    for i in range(NEW):
        law *= dists[rows, len(PROMPT) - 1 + i, SEQUENCES[:, i]]
    return law / law.sum()


@pytest.fixture(scope="module")
def laws(models):
    cache = {}

    def get(top_k: int) -> np.ndarray:
        if top_k not in cache:
            cache[top_k] = exact_target_law(models["target"], SamplingParams(1.0, top_k, 1.0))
        return cache[top_k]

    return get


def _groups(law: np.ndarray, rows: int) -> list[np.ndarray]:
    """Cells to test: every cell with expected count >= MIN_EXPECTED on its own, the rest pooled
    (smallest first) into one cell whose expected count is >= MIN_EXPECTED. Zero-probability cells
    are left out here and checked separately (any count there is an outright failure)."""
    order = [c for c in np.argsort(law) if law[c] > 0]
    small = [c for c in order if law[c] * rows < MIN_EXPECTED]
    big = [c for c in order if law[c] * rows >= MIN_EXPECTED]
    if small:
        while law[small].sum() * rows < MIN_EXPECTED and big:
            small.append(big.pop(0))
        return [np.array(small)] + [np.array([c]) for c in big]
    return [np.array([c]) for c in big]


def chi_square(counts: np.ndarray, law: np.ndarray) -> tuple[float, float, int]:
    """(p-value, statistic, degrees of freedom) of counts against the exact law."""
    rows = int(counts.sum())
    if counts[law == 0].sum() > 0:
        return 0.0, float("inf"), 0
    groups = _groups(law, rows)
    observed = np.array([counts[g].sum() for g in groups], np.float64)
    expected = np.array([law[g].sum() for g in groups]) * rows
    expected *= observed.sum() / expected.sum()
    result = stats.chisquare(observed, expected)
    return float(result.pvalue), float(result.statistic), len(groups) - 1


def _power(law: np.ndarray, rows: int) -> float:
    """Power at ALPHA against the hardest 1% bias: BIAS moved between the two likeliest cells."""
    groups = _groups(law, rows)
    grouped = np.sort([law[g].sum() for g in groups])[::-1]
    noncentrality = rows * BIAS ** 2 * (1 / grouped[0] + 1 / grouped[1])
    df = len(groups) - 1
    return float(stats.ncx2.sf(stats.chi2.isf(ALPHA, df), df, noncentrality))


def _cells(tokens: np.ndarray) -> np.ndarray:
    """The index in SEQUENCES of each row's tokens."""
    return (tokens * VOCAB ** np.arange(NEW - 1, -1, -1)).sum(axis=1)


def _counts(tokens: np.ndarray) -> np.ndarray:
    return np.bincount(_cells(tokens), minlength=VOCAB ** NEW)


def _hierarchy(models, spec, buffers, verifier, allow_inexact=False) -> Hierarchy:
    chain = [NGramDrafter(2, VOCAB) if s == "ngram" else models[s] for s in spec]
    return Hierarchy(chain, buffers, verifier, allow_inexact=allow_inexact)


def _run_case(models, laws, spec, buffers, verifier, top_k, seed, allow_inexact=False):
    law = laws(top_k)
    assert _power(law, ROWS) >= 0.99
    hierarchy = _hierarchy(models, spec, buffers, verifier, allow_inexact)
    start = time.perf_counter()
    out = hsd_generate(hierarchy, np.tile(PROMPT, (ROWS, 1)), np.full(ROWS, len(PROMPT), np.int32),
                       jax.random.PRNGKey(seed), max_new_tokens=NEW, temperature=1.0, top_k=top_k)
    tokens = np.asarray(out.tokens)
    seconds = time.perf_counter() - start
    np.testing.assert_array_equal(np.asarray(out.num_tokens), NEW)
    counts = _counts(tokens)
    pvalue, statistic, df = chi_square(counts, law)
    accepted = np.asarray(out.stats.accepted).sum(axis=0)
    proposed = np.asarray(out.stats.proposed).sum(axis=0)
    print(f"\n{spec} T={buffers} {verifier} top_k={top_k}: p={pvalue:.4g} chi2={statistic:.1f} df={df} "
          f"acceptance={np.round(accepted / proposed, 3).tolist()} "
          f"target_rounds={float(np.mean(np.asarray(out.stats.target_rounds))):.3f} ({seconds:.1f}s)")
    return pvalue, accepted / proposed, counts, law


E2E_CASES = [  # (chain, buffers T_0.., verifier(s), top_k, seed)
    (("m0", "target"), (2,), "tokenwise", 0, 1),
    (("m0", "target"), (3,), "block", 0, 2),
    (("m0", "m1", "target"), (1, 2), "tokenwise", 0, 3),
    (("m0", "m1", "target"), (2, 1), "block", 0, 4),
    (("m0", "target"), (2,), "tokenwise", 2, 5),
    (("m0", "target"), (2,), "block", 3, 6),
    (("m0", "m1", "target"), (2, 2), "tokenwise", 3, 7),
    (("m0", "m1", "target"), (1, 3), "block", 2, 8),
    (("ngram", "m1", "target"), (2, 2), ("block", "tokenwise"), 0, 9),
    (("ngram", "target"), (3,), "tokenwise", 2, 10),
]


@pytest.mark.parametrize("spec,buffers,verifier,top_k,seed", E2E_CASES,
                         ids=[f"{'-'.join(c[0])}-T{c[1]}-{c[2]}-k{c[3]}" for c in E2E_CASES])
def test_hsd_samples_the_target_law(models, laws, spec, buffers, verifier, top_k, seed):
    pvalue, acceptance, _, _ = _run_case(models, laws, spec, buffers, verifier, top_k, seed)
    # the case exercises both branches at every level (the n-gram drafter's acceptance is ~9%
    # here, which over 200k rows is still tens of thousands of accepted drafts)
    assert np.all(acceptance > 0.05) and np.all(acceptance < 0.97), acceptance
    assert pvalue > ALPHA, f"HSD output law differs from the target's: p = {pvalue:.3g}"


def test_hsd_with_eos_samples_the_target_law(models, laws):
    """With an EOS id (3: the first/second/third token is EOS with probability 0.14/0.07/0.39),
    rows finish after different rounds and ride along masked; their output, padded with the EOS
    id after EOS, must have the law of the target's sequences stopped at EOS."""
    eos = 3
    full = laws(0)
    stopped = SEQUENCES.copy()
    for i in range(NEW):
        stopped[np.any(SEQUENCES[:, :i] == eos, axis=1), i] = eos
    law = np.bincount(_cells(stopped), weights=full, minlength=VOCAB ** NEW)
    assert _power(law, ROWS) >= 0.99
    hierarchy = _hierarchy(models, ("m0", "m1", "target"), (2, 2), "block")
    out = hsd_generate(hierarchy, np.tile(PROMPT, (ROWS, 1)), np.full(ROWS, len(PROMPT), np.int32),
                       jax.random.PRNGKey(12), max_new_tokens=NEW, temperature=1.0, eos_token_id=eos)
    tokens, num = np.asarray(out.tokens), np.asarray(out.num_tokens)
    first_eos = np.argmax(np.concatenate([tokens == eos, np.ones((ROWS, 1), bool)], axis=1), axis=1)
    np.testing.assert_array_equal(num, np.minimum(first_eos + 1, NEW))
    pvalue, statistic, df = chi_square(_counts(tokens), law)
    print(f"\neos={eos} m0-m1-target T=(2, 2) block: p={pvalue:.4g} chi2={statistic:.1f} df={df}")
    assert pvalue > ALPHA, f"HSD output law with EOS differs from the target's: p = {pvalue:.3g}"


def test_zhou_rule_is_detectably_biased(models, laws):
    """The same harness catches the Zhou et al. rule (allow_inexact=True), K = 1, γ = 3."""
    pvalue, _, counts, law = _run_case(
        models, laws, ("m0", "target"), (3,), "zhou", 0, 11, allow_inexact=True
    )
    biggest = np.argsort(-np.abs(counts / ROWS - law))[:3]
    print("zhou largest deviations:", [(SEQUENCES[c].tolist(), round(float(law[c]), 4),
                                        round(float(counts[c] / ROWS), 4)) for c in biggest])
    assert pvalue < 1e-6, f"the biased Zhou rule passed the exactness test (p = {pvalue:.3g})"


# --- 3. the harness itself ---------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [0, 2, 3])
def test_harness_rejects_a_biased_sampler(laws, top_k):
    """A sampler whose law is exact except that 1% is moved between the two most likely cells
    (the hardest 1% bias to see) is rejected at ALPHA, for 20 of 20 seeds; the exact sampler is
    not, for a fixed seed."""
    law = laws(top_k)
    first, second = np.argsort(law)[::-1][:2]
    biased = law.copy()
    biased[first] -= BIAS
    biased[second] += BIAS
    for seed in range(20):
        rng = np.random.default_rng(seed)
        pvalue, _, _ = chi_square(rng.multinomial(ROWS, biased), law)
        assert pvalue < ALPHA, (seed, pvalue)
    pvalue, _, _ = chi_square(np.random.default_rng(100).multinomial(ROWS, law), law)
    assert pvalue > ALPHA, pvalue
    # a single draw in a cell the target cannot produce is an outright failure
    impossible = np.flatnonzero(law == 0)
    if impossible.size:
        counts = np.random.default_rng(101).multinomial(ROWS, law)
        counts[impossible[0]] += 1
        assert chi_square(counts, law)[0] == 0.0
