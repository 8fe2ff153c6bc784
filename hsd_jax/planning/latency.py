"""The latency model: predicted seconds per committed token of a hierarchy.

It prices the round that `decoding.schedule` describes (and `decoding.hsd` runs), with a model's
forward of k tokens costing c(k) seconds (a measured table; past its end it is extrapolated
linearly from its last two points, never decreasing):
  * the drafter M_0 drafts exactly T_0 tokens (`Schedule.draft_widths`: one forward of its
    catch-up window, then T_0 - 1 single-token forwards);
  * level 0 < i < K repeatedly takes a batch of n tokens from level i-1 (T_{i-1} <= n <= cap_{i-1}),
    verifies it in one forward of the fixed width `Schedule.verify_width(i)` whatever n is, and
    keeps tau + 1 tokens (tau accepted drafts, then the correction, or the bonus when all n are
    accepted); it stops once it holds >= T_i tokens (possibly overshooting to cap_i) and hands
    all of them up;
  * the target verifies one batch of level K-1 per round and commits tau + 1 tokens.
Acceptances are i.i.d. Bernoulli(alpha(M_{i-1}, M_i)) per draft, or optionally a per-position
profile. The latency per committed token is E[round cost] / E[committed tokens per round]
(renewal-reward); plain autoregressive decoding costs c_K(1) per token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from hsd_jax.decoding.schedule import Schedule, catch_up

Acceptance = float | Sequence[float]
"""alpha(M_i, M_{i+1}): one i.i.d. rate, or the rates of draft positions 1, 2, ... of a batch
(the last one repeats for longer batches)."""


def forward_cost(table: Sequence[float], k: int | np.ndarray) -> float | np.ndarray:
    """c(k), the cost of a forward pass of k tokens, from a measured table [c(1), ..., c(K_max)].

    Past K_max the cost is extrapolated linearly from the last two points, with the slope clamped
    at >= 0 so that noise in the measurement cannot make longer forwards look cheaper; a table of
    one point is treated as constant. `k` may be an int (returns a float) or an integer array.
    """
    last = len(table)
    slope = max(float(table[-1]) - float(table[-2]), 0.0) if last > 1 else 0.0
    if isinstance(k, (int, np.integer)):
        if k < 1:
            raise ValueError(f"a forward pass has at least 1 token, got k={k}")
        return float(table[k - 1]) if k <= last else float(table[-1]) + slope * (k - last)
    ks = np.asarray(k)
    if np.any(ks < 1):
        raise ValueError(f"a forward pass has at least 1 token, got k={k}")
    table = np.asarray(table, dtype=float)
    return np.where(ks <= last, table[np.minimum(ks, last) - 1], table[-1] + slope * (ks - last))


def draft_cost(table: Sequence[float], depth: int, n: int | np.ndarray) -> float | np.ndarray:
    """Cost of the drafter M_0 of a K = `depth` hierarchy drafting n tokens (`Schedule.draft_widths`
    for any n at once: one forward of the catch-up window, then n - 1 single-token forwards)."""
    return forward_cost(table, catch_up(depth, 0)) + (np.asarray(n) - 1) * forward_cost(table, 1)


def expected_tokens(alpha: float, n: np.ndarray) -> np.ndarray:
    """E[tau + 1 | n] = (1 - alpha^(n+1)) / (1 - alpha) for i.i.d. acceptance (research.md §1),
    summed as 1 + alpha + ... + alpha^n so that alpha = 1 needs no special case."""
    n = np.asarray(n)
    powers = np.cumsum(alpha ** np.arange(int(np.max(n)) + 1))
    return powers[n]


def acceptance_vector(alpha: Acceptance, length: int) -> np.ndarray:
    """Acceptance probability of draft positions 1..length of a batch (a profile is clamped to
    its last entry)."""
    if np.ndim(alpha) == 0:
        return np.full(length, float(alpha))
    profile = np.asarray(alpha, dtype=float)
    return profile[np.minimum(np.arange(length), len(profile) - 1)]


def _tau_pmf(alpha: Acceptance, cap: int) -> np.ndarray:
    """pmf[n, t] = P(tau = t | batch of n drafts), n, t in 0..cap: tau is the index of the first
    rejection, or n when all n drafts are accepted."""
    accept = acceptance_vector(alpha, cap)
    survive = np.concatenate([[1.0], np.cumprod(accept)])  # P(first t drafts accepted)
    stop_here = np.concatenate([survive[:-1] * (1.0 - accept), [0.0]])  # P(tau = t) for t < n
    n, t = np.arange(cap + 1)[:, None], np.arange(cap + 1)[None, :]
    return np.where(t < n, stop_here[t], np.where(t == n, survive[t], 0.0))


@dataclasses.dataclass(frozen=True)
class _Chain:
    """A validated chain: cost tables M_0..M_K, acceptances alpha(M_i, M_{i+1}) and its schedule."""

    tables: tuple[np.ndarray, ...]
    acceptances: tuple[Acceptance, ...]
    schedule: Schedule

    @property
    def depth(self) -> int:
        return self.schedule.depth

    @property
    def buffers(self) -> tuple[int, ...]:
        return self.schedule.buffers

    def level_0_cost(self) -> float:
        """Cost of M_0 drafting one batch of T_0 tokens."""
        return float(np.sum(forward_cost(self.tables[0], np.asarray(self.schedule.draft_widths()))))

    def verify_cost(self, level: int) -> float:
        """Cost of one verify forward of level 1..K (fixed width, whatever the batch size)."""
        return float(forward_cost(self.tables[level], self.schedule.verify_width(level)))


def _chain(
    costs: Sequence[Sequence[float]], acceptances: Sequence[Acceptance], buffers: Sequence[int]
) -> _Chain:
    tables = tuple(np.asarray(c, dtype=float) for c in costs)
    if not tables:
        raise ValueError("a chain needs at least the target's cost table")
    for i, t in enumerate(tables):
        if t.ndim != 1 or t.size == 0 or not np.all(np.isfinite(t)) or np.any(t <= 0):
            raise ValueError(
                f"costs[{i}] must be a non-empty list of positive finite seconds, got {t.tolist()}"
            )
    depth = len(tables) - 1
    if len(acceptances) != depth or len(buffers) != depth:
        raise ValueError(f"{depth + 1} models need {depth} acceptances and {depth} buffers, "
                         f"got {len(acceptances)} and {len(buffers)}")
    for i, a in enumerate(acceptances):
        values = np.atleast_1d(np.asarray(a, dtype=float))
        if values.size == 0 or not np.all((values >= 0) & (values <= 1)):
            raise ValueError(f"acceptances[{i}] must be in [0, 1], got {a!r}")
    schedule = Schedule(tuple(int(t) if isinstance(t, np.integer) else t for t in buffers))  # validates them
    return _Chain(tables, tuple(acceptances), schedule)


@dataclasses.dataclass(frozen=True)
class RoundPrediction:
    """One target round as the model prices it: its expected cost and committed tokens."""

    seconds: float
    tokens: float

    @property
    def latency(self) -> float:
        """Seconds per committed token (renewal-reward: E[cost] / E[tokens])."""
        return self.seconds / self.tokens


def expected_latency(costs: Sequence[Sequence[float]], acceptances: Sequence[Acceptance],
                     buffers: Sequence[int]) -> float:
    """Exact expected seconds per committed token of the hierarchy (the model in the module doc):
    `expected_round(...).latency`."""
    return expected_round(costs, acceptances, buffers).latency


def expected_round(costs: Sequence[Sequence[float]], acceptances: Sequence[Acceptance],
                   buffers: Sequence[int]) -> RoundPrediction:
    """Exact expected cost and committed tokens of one target round (plain decoding: one step,
    one token).

    `costs[i]` is M_i's cost table (M_K = target last), `acceptances[i]` = alpha(M_i, M_{i+1}) as a
    float (i.i.d.) or a per-position profile, `buffers` = T_0..T_{K-1}.

    Level by level it carries the distribution of the batch size n that the level hands up
    (support T_i..cap_i) and the expected cost of producing one batch. Filling level i is a
    sequence of i.i.d. (batch, verify) iterations whose gains tau + 1 are i.i.d. too, so the
    partial sums form a Markov chain on 0..T_i - 1: a DP over them gives the overshoot
    distribution and the expected number of iterations E[N], and since N is a stopping time,
    Wald's identity gives E[cost] = E[N] * (E[batch cost below] + verify cost). This is the exact
    recursion of research.md §1 ("with overshoot"); `simulate` runs the same algorithm.
    """
    chain = _chain(costs, acceptances, buffers)
    depth = chain.depth
    if depth == 0:
        return RoundPrediction(float(forward_cost(chain.tables[0], 1)), 1.0)
    caps = chain.schedule.capacities
    batch = np.zeros(caps[0] + 1)
    batch[chain.buffers[0]] = 1.0  # M_0 hands up exactly T_0 drafts
    batch_cost = chain.level_0_cost()
    for level in range(1, depth):
        tau = batch @ _tau_pmf(chain.acceptances[level - 1], caps[level - 1])  # P(tau = t), t = 0..cap
        gain = np.concatenate([[0.0], tau])  # P(gain = g), g = tau + 1
        target = chain.buffers[level]
        reach = np.zeros(target + gain.size)  # P(partial sum s is visited); s >= target stops
        reach[0] = 1.0
        for s in range(target):
            reach[s:s + gain.size] += reach[s] * gain
        batch_cost = reach[:target].sum() * (batch_cost + chain.verify_cost(level))
        batch = np.zeros(caps[level] + 1)
        batch[target:] = reach[target:caps[level] + 1]
    tokens = batch @ (_tau_pmf(chain.acceptances[-1], caps[-1]) @ np.arange(1, caps[-1] + 2))
    return RoundPrediction(float(batch_cost + chain.verify_cost(depth)), float(tokens))


def surrogate_latency(
    costs: Sequence[Sequence[float]], acceptances: Sequence[float], buffers: Sequence[int]
) -> float:
    """The "truncated" latency of research.md §1, which `solver.solve`'s GSP DP minimises exactly.

    Every level is taken to hand up exactly n = T tokens (overshoot kept for later, so a level
    produces tokens at a steady cost lambda per token) and the verify width to be n plus the
    catch-up window: lambda_1 = [d(T_0) + c_1(T_0 + K)] / E[tokens | T_0] with d(T_0) the drafter's
    cost, then lambda_i = g_i * lambda_{i-1} + b_i with g_i = n(1-a)/(1-a^{n+1}) and
    b_i = c_i(n + K - i + 1)(1-a)/(1-a^{n+1}), n = T_{i-1}; the result is lambda_K.
    i.i.d. acceptances only. It ignores the overshoot and the fixed (cap-wide) verify widths, so
    it is a search heuristic; `expected_latency` is the prediction.
    """
    chain = _chain(costs, acceptances, buffers)
    depth = chain.depth
    if depth == 0:
        return float(forward_cost(chain.tables[0], 1))
    batch_cost = chain.level_0_cost()  # cost of n = T_0 tokens at level 0
    per_token = 0.0
    for level in range(1, depth + 1):
        n = chain.buffers[level - 1]
        width = n + chain.schedule.catch_up(level)
        per_token = (batch_cost + forward_cost(chain.tables[level], width)) / expected_tokens(
            float(chain.acceptances[level - 1]), n
        )
        if level < depth:
            batch_cost = chain.buffers[level] * per_token
    return float(per_token)


def _sample_tau(n: np.ndarray, accept: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """tau for each batch size in `n`, with position j accepted with probability accept[j]."""
    position = np.arange(accept.size)
    rejected = (rng.random((n.size, accept.size)) >= accept) & (position < n[:, None])
    return np.where(rejected.any(axis=1), rejected.argmax(axis=1), n)


def simulate(costs: Sequence[Sequence[float]], acceptances: Sequence[Acceptance], buffers: Sequence[int],
             rounds: int, rng: np.random.Generator | int | None = None) -> float:
    """Monte-Carlo seconds per committed token: `rounds` target rounds of the same algorithm as
    `expected_latency`, run in parallel (numpy arrays over rounds, Bernoulli acceptances)."""
    chain = _chain(costs, acceptances, buffers)
    rng = np.random.default_rng(rng)
    depth = chain.depth
    if depth == 0:
        return float(forward_cost(chain.tables[0], 1))
    accept = [acceptance_vector(a, cap) for a, cap in zip(chain.acceptances, chain.schedule.capacities)]

    def fill(level: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens handed up, cost) of one buffer fill of `level` for each of `rows` rounds."""
        if level == 0:
            return np.full(rows, chain.buffers[0]), np.full(rows, chain.level_0_cost())
        count, spent = np.zeros(rows, dtype=np.int64), np.zeros(rows)
        verify = chain.verify_cost(level)
        active = np.arange(rows)
        while active.size:
            n, cost = fill(level - 1, active.size)
            count[active] += _sample_tau(n, accept[level - 1], rng) + 1
            spent[active] += cost + verify
            active = active[count[active] < chain.buffers[level]]
        return count, spent

    n, cost = fill(depth - 1, rounds)
    tokens = _sample_tau(n, accept[-1], rng) + 1
    return float((cost.sum() + rounds * chain.verify_cost(depth)) / tokens.sum())
