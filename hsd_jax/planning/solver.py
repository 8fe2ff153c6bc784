"""Choose a hierarchy (models and buffer targets) from profiled stats.

`gsp_candidates` runs the Generalized-Shortest-Path DP of research.md §1 over every chain and
buffer vector under the surrogate objective (`latency.surrogate_latency`); `solve` re-ranks its
survivors with the exact model (`latency.expected_latency`) and returns the best as `Plan`s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from hsd_jax.decoding.schedule import catch_up
from hsd_jax.planning.latency import (
    draft_cost,
    expected_latency,
    expected_tokens,
    forward_cost,
    surrogate_latency,
)
from hsd_jax.planning.plan import Plan
from hsd_jax.planning.stats import Stats, acceptance_mode


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A chain (indices into `Stats.candidates()`) and buffers with its DP objective."""

    surrogate: float
    chain: tuple[int, ...]
    buffers: tuple[int, ...]


def gsp_candidates(costs: Sequence[Sequence[float]], alpha: np.ndarray, n_max: int = 32,
                   keep: int = 32) -> list[Candidate]:
    """The k-best Generalized-Shortest-Path DP of research.md §1 over models 0..M-1 (cheapest
    first, the target M-1 last); `alpha[j, i]` is the acceptance of j's drafts by i, NaN where j
    may not draft for i. Returns up to `keep` + 1 candidates sorted by `surrogate_latency`,
    which it minimises exactly; "target alone" (surrogate c_K(1)) is always among them.

    The research.md recursion lambda*_i = min(c_i, min_{j<i,n} g(j,i,n) lambda*_j + b(j,i,n)) is
    run over states (model i, distance d from the top), because the catch-up window in a verify
    width n + d + 1, and in the drafter's first forward, depends on d. lambda*(i, d) is the cost per
    token of model i verifying at distance d; the drafter option (the research's c_i) is folded
    into the edge, as it costs draft_cost(c_j, d + 1, n) per batch of n:
        lambda*(i, d) = min_{j < i, n} [ min(draft_cost(c_j, d + 1, n), n lambda*(j, d + 1))
                                         + c_i(n + d + 1) ] / E[tokens | n, alpha(j, i)].
    Each state keeps its `keep` best (value, j, n, which entry of j) so that the caller can
    re-rank the survivors with the exact model. O(M^3 * n_max * keep) work.
    """
    tables = [np.asarray(c, dtype=float) for c in costs]
    size = len(tables)
    n = np.arange(1, n_max + 1)
    # best[d][i]: (values, draft model j, buffer n, entry of (j, d+1) or -1 if j drafts)
    best: list[dict[int, tuple[np.ndarray, ...]]] = [{} for _ in range(size)]
    for d in range(size - 2, -1, -1):
        verifiers = [size - 1] if d == 0 else range(1, size - 1 - d + 1)
        for i in verifiers:
            # a model d levels below the top is M_0 of a depth-d hierarchy: its catch-up window
            verify = forward_cost(tables[i], n + catch_up(d, 0))
            parts: list[tuple[np.ndarray, ...]] = []
            for j in range(i):
                a = alpha[j, i]
                if not np.isfinite(a):
                    continue
                tokens = expected_tokens(float(a), n)
                drafted = (draft_cost(tables[j], d + 1, n) + verify) / tokens
                parts.append((drafted, np.full(n_max, j), n, np.full(n_max, -1)))
                if j in best[d + 1]:
                    below = best[d + 1][j][0]
                    value = (n[:, None] * below[None, :] + verify[:, None]) / tokens[:, None]
                    shape = value.shape
                    parts.append(
                        (
                            value.ravel(),
                            np.full(value.size, j),
                            np.broadcast_to(n[:, None], shape).ravel(),
                            np.broadcast_to(np.arange(below.size)[None, :], shape).ravel(),
                        )
                    )
            if parts:
                values, js, ns, entries = (np.concatenate(x) for x in zip(*parts))
                order = np.argsort(values, kind="stable")[:keep]
                best[d][i] = (values[order], js[order], ns[order], entries[order])

    def unwind(i: int, d: int, entry: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        _, js, ns, entries = best[d][i]
        j, buffer, below = int(js[entry]), int(ns[entry]), int(entries[entry])
        chain, buffers = ((j,), ()) if below < 0 else unwind(j, d + 1, below)
        return chain + (i,), buffers + (buffer,)

    top = size - 1
    found = [Candidate(float(forward_cost(tables[top], 1)), (top,), ())]
    if top in best[0]:
        for entry, value in enumerate(best[0][top][0]):
            found.append(Candidate(float(value), *unwind(top, 0, entry)))
    return sorted(found, key=lambda c: c.surrogate)


def solve(stats: Stats, n_max: int = 32, mode: str | None = None, top: int = 5, *, keep: int = 32,
          position_profiles: bool = False, min_drafts: int = 0) -> list[Plan]:
    """The best hierarchies for `stats`, best first (at most `top`, plus "target alone" at the end
    when it is not among them, as the no-drafts baseline).

    Candidates: every profiled model no costlier than the target, chains increasing in c(1) and
    ending at the target, buffers 1..n_max. `gsp_candidates` finds the `keep` best chains under
    the surrogate objective (exactly); with every single-draft plan they are re-ranked by the exact
    `expected_latency`, with one i.i.d. acceptance per pair or, when `position_profiles` is set,
    the stats' per-position profiles (opt-in: on the default family the i.i.d. rate predicted
    tokens per target call within a few percent, the profiles did worse; see README).
    Each Plan carries both latencies; the first plan's `runner_up` lists the others. Its sources
    are the stats' (see `Plan.relative_to` before writing it elsewhere).

    Why re-rank: the surrogate ignores overshoot and the cap-wide verify widths, and its optimum
    can be far from the exact one (27% worse on one random 5-model instance). With keep = 32 the
    re-ranked best equalled the brute-force exact optimum on all of 91 random instances of 2-5
    models with n_max 5-8 (tests/test_planner.py::test_dp_matches_brute_force checks 6 of them);
    keep = 8 missed it by up to 3.3%.

    `min_drafts` > 0 keeps only hierarchies with at least that many drafts (to run HSD where the
    plain target would win, e.g. to measure it); then "target alone" is not appended.
    """
    if n_max < 1 or top < 1 or keep < 1:
        raise ValueError(f"n_max, top and keep must be >= 1, got {n_max}, {top}, {keep}")
    mode = acceptance_mode(stats.temperature, mode)
    stats.check_mode(mode)
    models = stats.candidates()
    index = {m.name: k for k, m in enumerate(models)}
    alpha = np.full((len(models), len(models)), np.nan)
    for drafter, verifier in stats.pairs():
        alpha[index[drafter], index[verifier]] = stats.alpha(drafter, verifier, mode)
    ar = models[-1].step_cost
    info = {"hardware": stats.hardware, "dtype": stats.dtype, "temperature": stats.temperature}
    candidates = {(c.chain, c.buffers): c.surrogate
                  for c in gsp_candidates([m.cost_s for m in models], alpha, n_max=n_max, keep=keep)}
    # Every single-draft plan too (|models| * n_max of them): the surrogate is i.i.d., and a
    # drafter whose acceptance comes in long runs (the n-gram's copies) is best at buffers the
    # surrogate ranks far down.
    for k in range(len(models) - 1):
        for n in range(1, n_max + 1):
            candidates.setdefault(((k, len(models) - 1), (n,)), None)
    plans = []
    for (chain, buffers), surrogate in candidates.items():
        names = [models[k].name for k in chain]
        latency = expected_latency(*stats.chain_inputs(names, mode, position_profiles), buffers)
        if surrogate is None:
            surrogate = surrogate_latency(*stats.chain_inputs(names, mode), buffers)
        plans.append(Plan(chain=tuple(names), sources=tuple(models[k].source for k in chain),
                          buffers=buffers, predicted_latency_s=latency, ar_latency_s=ar, mode=mode,
                          surrogate_latency_s=surrogate, stats=info))
    plans.sort(key=lambda p: p.predicted_latency_s)
    if min_drafts:
        plans = [p for p in plans if len(p.chain) - 1 >= min_drafts]
        if not plans:
            raise ValueError(
                f"no hierarchy with at least {min_drafts} drafts among the {len(models)} candidate "
                "models; lower --min-drafts"
            )
    chosen = plans[:top]
    if not min_drafts and not any(len(p.chain) == 1 for p in chosen):
        chosen.append(next(p for p in plans if len(p.chain) == 1))
    chosen[0].runner_up = [p.summary() for p in chosen[1:]]
    return chosen
