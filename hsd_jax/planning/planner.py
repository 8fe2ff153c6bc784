"""Choose a hierarchy (models and buffer targets) from profiled costs and acceptance rates.

The planner reads the JSON that `hsd-jax profile` writes (`load_stats`), predicts the latency of
any chain M_0 < ... < M_K = target with buffer targets T_0..T_{K-1} (`expected_latency`), checks
that prediction with a Monte-Carlo run of the same algorithm (`simulate`), searches all chains
and buffers with the Generalized-Shortest-Path DP of research.md §1 (`solve`) and turns the
winner into a `Plan` (plan.json) and back into an `hsd_jax.Hierarchy` (`hierarchy_from_plan`).

The cost model is the algorithm of `hsd_jax/hsd.py`, with a model's forward of k tokens costing
c(k) seconds (a measured table; past its end it is extrapolated linearly from its last two
points, never decreasing):
  * the drafter M_0 drafts exactly T_0 tokens: a first forward of K+1 tokens (the catch-up window:
    its own last token plus one correction/bonus per level above) and T_0 - 1 forwards of 1 token;
  * level 0 < i < K repeatedly takes a batch of n tokens from level i-1 (T_{i-1} <= n <= cap_{i-1},
    where cap_0 = T_0 and cap_i = T_i + cap_{i-1}), verifies it in one forward of the fixed width
    cap_{i-1} + (K - i + 1) whatever n is, and keeps tau + 1 tokens (tau accepted drafts, then the
    correction, or the bonus when all n are accepted); it stops once it holds >= T_i tokens
    (possibly overshooting to cap_i) and hands all of them up;
  * the target verifies one batch of level K-1 per round with a forward of cap_{K-1} + 1 tokens
    and commits tau + 1 tokens.
Acceptances are i.i.d. Bernoulli(alpha(M_{i-1}, M_i)) per draft, or optionally a per-position
profile. The latency per committed token is E[round cost] / E[committed tokens per round]
(renewal-reward); plain autoregressive decoding costs c_K(1) per token.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

MODES = ("greedy", "sampled")
STATS_VERSION = 1
PLAN_VERSION = 1
NGRAM_PREFIX = "ngram:"

Acceptance = float | Sequence[float]
"""alpha(M_i, M_{i+1}): one i.i.d. rate, or the rates of draft positions 1, 2, ... of a batch
(the last one repeats for longer batches)."""


# ----------------------------------------------------------------------------- cost model


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


def catch_up(distance: int) -> int:
    """Tokens a model at `distance` levels below the top may lack KV for before its next query:
    its own last token plus one correction/bonus from each level above (`_Plan.catch_up`)."""
    return distance + 1


def draft_cost(table: Sequence[float], distance: int, n: int | np.ndarray) -> float | np.ndarray:
    """Cost of the drafter M_0, `distance` = K levels below the top, drafting n tokens: one forward
    of the catch-up window, then n - 1 single-token forwards."""
    return forward_cost(table, catch_up(distance)) + (np.asarray(n) - 1) * forward_cost(table, 1)


def verify_width(batch: int | np.ndarray, distance: int) -> int | np.ndarray:
    """Width of a verify forward of a model `distance` levels below the top: the catch-up window
    plus the (fixed) batch width it scores."""
    return batch + catch_up(distance)


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
    """A validated chain: cost tables M_0..M_K, acceptances alpha(M_i, M_{i+1}), buffers, caps."""

    tables: tuple[np.ndarray, ...]
    acceptances: tuple[Acceptance, ...]
    buffers: tuple[int, ...]
    caps: tuple[int, ...]  # cap_0 = T_0, cap_i = T_i + cap_{i-1}

    @property
    def depth(self) -> int:
        return len(self.tables) - 1

    def level_0_cost(self) -> float:
        return float(draft_cost(self.tables[0], self.depth, self.buffers[0]))

    def verify_cost(self, level: int) -> float:
        """Cost of one verify forward of level 1..K (fixed width, whatever the batch size)."""
        return float(forward_cost(self.tables[level], verify_width(self.caps[level - 1], self.depth - level)))


def _chain(costs: Sequence[Sequence[float]], acceptances: Sequence[Acceptance], buffers: Sequence[int]) -> _Chain:
    tables = tuple(np.asarray(c, dtype=float) for c in costs)
    if not tables:
        raise ValueError("a chain needs at least the target's cost table")
    for i, t in enumerate(tables):
        if t.ndim != 1 or t.size == 0 or not np.all(np.isfinite(t)) or np.any(t <= 0):
            raise ValueError(f"costs[{i}] must be a non-empty list of positive finite seconds, got {t.tolist()}")
    depth = len(tables) - 1
    if len(acceptances) != depth or len(buffers) != depth:
        raise ValueError(f"{depth + 1} models need {depth} acceptances and {depth} buffers, "
                         f"got {len(acceptances)} and {len(buffers)}")
    for i, a in enumerate(acceptances):
        values = np.atleast_1d(np.asarray(a, dtype=float))
        if values.size == 0 or not np.all((values >= 0) & (values <= 1)):
            raise ValueError(f"acceptances[{i}] must be in [0, 1], got {a!r}")
    for i, t in enumerate(buffers):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
            raise ValueError(f"buffer T_{i} must be an integer >= 1, got {t!r}")
    buffers = tuple(int(t) for t in buffers)
    return _Chain(tables, tuple(acceptances), buffers, tuple(itertools.accumulate(buffers)))


def expected_latency(costs: Sequence[Sequence[float]], acceptances: Sequence[Acceptance],
                     buffers: Sequence[int]) -> float:
    """Exact expected seconds per committed token of the hierarchy (the model in the module doc).

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
        return float(forward_cost(chain.tables[0], 1))
    caps = chain.caps
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
    return (batch_cost + chain.verify_cost(depth)) / tokens


def surrogate_latency(costs: Sequence[Sequence[float]], acceptances: Sequence[float], buffers: Sequence[int]) -> float:
    """The "truncated" latency of research.md §1, which `solve`'s GSP DP minimises exactly.

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
        width = verify_width(n, depth - level)
        per_token = (batch_cost + forward_cost(chain.tables[level], width)) / expected_tokens(float(chain.acceptances[level - 1]), n)
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
    caps = chain.caps
    accept = [acceptance_vector(a, cap) for a, cap in zip(chain.acceptances, caps)]

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


# ---------------------------------------------------------------------------------- stats


@dataclasses.dataclass(frozen=True)
class ModelStats:
    name: str
    source: str  # a model directory, or "ngram:N"
    params: int
    cost_s: tuple[float, ...]  # c(1), ..., c(K_max) in seconds

    @property
    def step_cost(self) -> float:
        """c(1): the cost that orders models from cheapest (M_0) to the target."""
        return self.cost_s[0]


@dataclasses.dataclass(frozen=True)
class Stats:
    """Profiled costs and acceptance rates (the JSON written by `hsd-jax profile`)."""

    hardware: str
    dtype: str
    batch_size: int
    temperature: float
    versions: dict
    target: str
    models: tuple[ModelStats, ...]
    acceptance: dict  # mode -> drafter -> verifier -> alpha
    position_acceptance: dict | None = None  # mode -> drafter -> verifier -> [alpha_1, alpha_2, ...]

    def model(self, name: str) -> ModelStats:
        for m in self.models:
            if m.name == name:
                return m
        raise ValueError(f"stats have no model named {name!r}; known: {[m.name for m in self.models]}")

    @property
    def default_mode(self) -> str:
        return acceptance_mode(self.temperature)

    def candidates(self) -> tuple[ModelStats, ...]:
        """Models a chain may use, cheapest first, target last: the target and every model that
        is strictly cheaper per step and no larger (a `Hierarchy` requires drafters no larger than
        the target)."""
        top = self.model(self.target)
        below = [m for m in self.models if m.step_cost < top.step_cost and m.params <= top.params]
        return (*sorted(below, key=lambda m: (m.step_cost, m.name)), top)

    def pairs(self) -> Iterable[tuple[str, str]]:
        """Every (drafter, verifier) pair a chain may use: drafter strictly cheaper."""
        models = self.candidates()
        for j, verifier in enumerate(models):
            for drafter in models[:j]:
                if drafter.step_cost < verifier.step_cost:
                    yield drafter.name, verifier.name

    def check_mode(self, mode: str) -> None:
        """Raise ValueError unless `mode` has an acceptance for every pair a chain may use."""
        if mode not in MODES:
            raise ValueError(f"acceptance mode must be one of {MODES}, got {mode!r}")
        table = self.acceptance.get(mode) or {}
        if not table and any(True for _ in self.pairs()):
            raise ValueError(f"stats have no {mode!r} acceptance rates (temperature {self.temperature}); "
                             f"profile at {'temperature 0' if mode == 'greedy' else 'a temperature > 0'} "
                             f"or choose the other mode")
        for drafter, verifier in self.pairs():
            if verifier not in table.get(drafter, {}):
                raise ValueError(
                    f"stats have no {mode} acceptance for drafter {drafter!r} verified by {verifier!r}; "
                    f"re-run `hsd-jax profile` with both models, or add "
                    f"acceptance[{mode!r}][{drafter!r}][{verifier!r}]")

    def alpha(self, drafter: str, verifier: str, mode: str) -> float:
        return float(self.acceptance[mode][drafter][verifier])

    def profile(self, drafter: str, verifier: str, mode: str) -> Acceptance:
        """The per-position acceptance profile of the pair when profiled, else its i.i.d. alpha."""
        found = ((self.position_acceptance or {}).get(mode, {}).get(drafter, {}).get(verifier))
        return tuple(found) if found else self.alpha(drafter, verifier, mode)

    def chain_inputs(self, names: Sequence[str], mode: str, position_profiles: bool = False
                     ) -> tuple[list[tuple[float, ...]], list[Acceptance]]:
        """(costs, acceptances) of a chain of model names for `expected_latency` and friends."""
        rate = self.profile if position_profiles else self.alpha
        costs = [self.model(n).cost_s for n in names]
        return costs, [rate(d, v, mode) for d, v in zip(names[:-1], names[1:])]


def acceptance_mode(temperature: float, override: str | None = None) -> str:
    """The acceptance table to plan with: `override` if given, else "greedy" at temperature 0
    (argmax agreement) and "sampled" otherwise (E[sum min(p, q)], research.md §1)."""
    if override is not None:
        if override not in MODES:
            raise ValueError(f"acceptance mode must be one of {MODES}, got {override!r}")
        return override
    return "greedy" if temperature == 0 else "sampled"


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_rates(table: Any, what: str, is_profile: bool) -> None:
    if not isinstance(table, Mapping):
        raise ValueError(f"{what} must be an object {{mode: {{drafter: {{verifier: value}}}}}}")
    for mode, drafters in table.items():
        if mode not in MODES:
            raise ValueError(f"{what} has unknown mode {mode!r}; use {MODES}")
        if not isinstance(drafters, Mapping):
            raise ValueError(f"{what}[{mode!r}] must map drafter names to {{verifier: value}}")
        for drafter, verifiers in drafters.items():
            if not isinstance(verifiers, Mapping):
                raise ValueError(f"{what}[{mode!r}][{drafter!r}] must map verifier names to values")
            for verifier, value in verifiers.items():
                values = value if is_profile else [value]
                where = f"{what}[{mode!r}][{drafter!r}][{verifier!r}]"
                if is_profile and (not isinstance(value, list) or not value):
                    raise ValueError(f"{where} must be a non-empty list of per-position rates, got {value!r}")
                for v in values:
                    if not _finite_number(v) or not 0.0 <= v <= 1.0:
                        raise ValueError(f"{where} = {value!r}: an acceptance rate must be in [0, 1]; "
                                         f"re-profile the pair or fix the value")


def _parse_model(entry: Any, index: int) -> ModelStats:
    if not isinstance(entry, Mapping):
        raise ValueError(f"models[{index}] must be an object with name, source, params, cost_s")
    for field in ("name", "source", "params", "cost_s"):
        if field not in entry:
            raise ValueError(f"models[{index}] has no {field!r}")
    name, source, params, costs = entry["name"], entry["source"], entry["params"], entry["cost_s"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"models[{index}].name must be a non-empty string, got {name!r}")
    if not isinstance(source, str) or not source:
        raise ValueError(f"model {name!r}: source must be a model directory or 'ngram:N', got {source!r}")
    if source.startswith(NGRAM_PREFIX):
        _ngram_order(source, name)
    if isinstance(params, bool) or not isinstance(params, int) or params < 0:
        raise ValueError(f"model {name!r}: params must be an integer >= 0, got {params!r}")
    if not isinstance(costs, list) or not costs:
        raise ValueError(f"model {name!r} has an empty cost table cost_s; profile its forward cost "
                         f"c(1), c(2), ... in seconds")
    for k, c in enumerate(costs, 1):
        if not _finite_number(c) or c <= 0:
            raise ValueError(f"model {name!r}: cost_s c({k}) = {c!r} must be a positive, finite number of "
                             f"seconds; re-profile it (for the n-gram drafter use its small measured cost)")
    return ModelStats(name, source, params, tuple(float(c) for c in costs))


def _ngram_order(source: str, name: str) -> int:
    try:
        n = int(source[len(NGRAM_PREFIX):])
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"model {name!r}: source {source!r} must be 'ngram:N' with an integer N >= 1")
    return n


def load_stats(source: str | os.PathLike | Mapping) -> Stats:
    """Read and validate stats (a path to the JSON, or the parsed dict).

    Raises ValueError naming the problem and its fix: wrong version, missing fields, duplicate
    model names, an empty or non-positive/non-finite cost table, an unknown target, an
    acceptance outside [0, 1], or a (drafter, verifier) pair without an acceptance in a mode
    the stats have (`solve` then checks that the mode it plans with is present).
    """
    if isinstance(source, Mapping):
        data, where = source, "stats"
    else:
        where = str(source)
        try:
            data = json.loads(Path(source).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON: {e}") from e
    try:
        return _parse_stats(data)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _parse_stats(data: Any) -> Stats:
    if not isinstance(data, Mapping):
        raise ValueError("stats must be a JSON object")
    if data.get("version") != STATS_VERSION:
        raise ValueError(f"stats version {data.get('version')!r} is not supported; expected {STATS_VERSION} "
                         f"(re-run `hsd-jax profile`)")
    for field in ("target", "models", "acceptance"):
        if field not in data:
            raise ValueError(f"stats have no {field!r} field (re-run `hsd-jax profile`)")
    temperature = data.get("temperature", 0.0)
    if not _finite_number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not isinstance(data["models"], list) or not data["models"]:
        raise ValueError("stats list no models; profile at least the target")
    models = tuple(_parse_model(entry, i) for i, entry in enumerate(data["models"]))
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate model names {duplicates}; give every profiled model a unique name")
    target = data["target"]
    if target not in names:
        raise ValueError(f"unknown target {target!r}: it is not among the models {names}; "
                         f"set 'target' to one of them or profile it")
    if next(m for m in models if m.name == target).source.startswith(NGRAM_PREFIX):
        raise ValueError(f"the target {target!r} is the n-gram drafter; the target must be a neural model")
    _check_rates(data["acceptance"], "acceptance", is_profile=False)
    position = data.get("position_acceptance")
    if position is not None:
        _check_rates(position, "position_acceptance", is_profile=True)
    stats = Stats(hardware=str(data.get("hardware", "")), dtype=str(data.get("dtype", "")),
                  batch_size=int(data.get("batch_size", 1)), temperature=float(temperature),
                  versions=dict(data.get("versions", {})), target=target, models=models,
                  acceptance={m: {d: dict(v) for d, v in t.items()} for m, t in data["acceptance"].items()},
                  position_acceptance=position)
    if not stats.acceptance and any(True for _ in stats.pairs()):
        raise ValueError("stats have no acceptance rates; profile at least one mode "
                         f"({' or '.join(MODES)}) for every (drafter, verifier) pair")
    for mode in stats.acceptance:
        stats.check_mode(mode)
    return stats


# ----------------------------------------------------------------------------------- plans


def plan_label(chain: Sequence[str], buffers: Sequence[int]) -> str:
    """'ngram3[4] > draft-s[8] > target': each model with its buffer target, target last."""
    return " > ".join([f"{name}[{t}]" for name, t in zip(chain, buffers)] + [chain[-1]])


@dataclasses.dataclass
class Plan:
    """A chosen hierarchy and its predicted latency (the content of plan.json)."""

    chain: tuple[str, ...]  # model names, M_0 first, target last
    sources: tuple[str, ...]  # model directories or "ngram:N", like `chain`
    buffers: tuple[int, ...]  # T_0..T_{K-1}
    predicted_latency_s: float  # exact model (`expected_latency`), seconds per token
    ar_latency_s: float  # c_K(1), plain autoregressive decoding of the target
    mode: str = "greedy"
    surrogate_latency_s: float | None = None  # the DP's objective (`surrogate_latency`)
    verifier: str = "tokenwise"
    runner_up: list[dict] = dataclasses.field(default_factory=list)
    stats: dict = dataclasses.field(default_factory=dict)  # hardware, dtype, temperature

    @property
    def predicted_speedup(self) -> float:
        return self.ar_latency_s / self.predicted_latency_s

    @property
    def label(self) -> str:
        return plan_label(self.chain, self.buffers)

    def summary(self) -> dict:
        """The runner-up entry of plan.json."""
        return {"chain": list(self.chain), "buffers": list(self.buffers),
                "predicted_latency_s": self.predicted_latency_s, "predicted_speedup": self.predicted_speedup}

    def to_json(self) -> dict:
        """plan.json as a dict (`json.dumps` it)."""
        data = {"version": PLAN_VERSION,
                "chain": [{"name": n, "source": s} for n, s in zip(self.chain, self.sources)],
                "buffers": list(self.buffers), "verifier": self.verifier, "mode": self.mode,
                "predicted_latency_s": self.predicted_latency_s, "ar_latency_s": self.ar_latency_s,
                "predicted_speedup": self.predicted_speedup, "runner_up": list(self.runner_up),
                "stats": dict(self.stats)}
        if self.surrogate_latency_s is not None:
            data["surrogate_latency_s"] = self.surrogate_latency_s
        return data

    @classmethod
    def from_json(cls, data: Mapping | str) -> "Plan":
        """A Plan from plan.json's dict or its JSON text."""
        if isinstance(data, str):
            data = json.loads(data)
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {data.get('version')!r} is not supported; expected {PLAN_VERSION} "
                             f"(re-run `hsd-jax plan`)")
        try:
            chain = data["chain"]
            plan = cls(chain=tuple(c["name"] for c in chain), sources=tuple(c["source"] for c in chain),
                       buffers=tuple(int(t) for t in data["buffers"]),
                       predicted_latency_s=float(data["predicted_latency_s"]),
                       ar_latency_s=float(data["ar_latency_s"]), mode=data.get("mode", "greedy"),
                       surrogate_latency_s=data.get("surrogate_latency_s"),
                       verifier=data.get("verifier", "tokenwise"), runner_up=list(data.get("runner_up", [])),
                       stats=dict(data.get("stats", {})))
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed plan: missing or invalid {e}") from None
        if not plan.chain or len(plan.buffers) != len(plan.chain) - 1:
            raise ValueError(f"malformed plan: {len(plan.chain)} models need {max(len(plan.chain) - 1, 0)} "
                             f"buffers, got {len(plan.buffers)}")
        return plan


def load_plan(path: str | os.PathLike) -> Plan:
    return Plan.from_json(Path(path).read_text())


def _atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same directory and os.replace, so readers never see
    a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_plan(plan: Plan, path: str | os.PathLike) -> None:
    _atomic_write(path, (json.dumps(plan.to_json(), indent=2) + "\n").encode())


# ---------------------------------------------------------------------------------- solver


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
            verify = forward_cost(tables[i], verify_width(n, d))
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
                    parts.append((value.ravel(), np.full(value.size, j), np.broadcast_to(n[:, None], shape).ravel(),
                                  np.broadcast_to(np.arange(below.size)[None, :], shape).ravel()))
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
    Each Plan carries both latencies; the first plan's `runner_up` lists the others.

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
            raise ValueError(f"no hierarchy with at least {min_drafts} drafts among the {len(models)} candidate "
                             "models; lower --min-drafts")
    chosen = plans[:top]
    if not min_drafts and not any(len(p.chain) == 1 for p in chosen):
        chosen.append(next(p for p in plans if len(p.chain) == 1))
    chosen[0].runner_up = [p.summary() for p in chosen[1:]]
    return chosen


# ------------------------------------------------------------------------------- hierarchy


def hierarchy_from_plan(plan: Plan | Mapping | str | os.PathLike, *, base_dir: str | os.PathLike = ".",
                        dtype: Any = None, shared_vocab_size: int | None = None):
    """Load the plan's models ("ngram:N" becomes an `NGramDrafter` with the target's vocabulary;
    relative directories are resolved against `base_dir`; `dtype` casts the weights) into an
    `hsd_jax.Hierarchy` with the plan's buffers and verifier. `shared_vocab_size` is passed on
    for models whose vocabularies differ only by padding (see `Hierarchy`)."""
    from hsd_jax.decoding.hsd import Hierarchy
    from hsd_jax.planning.profile import load_level

    if isinstance(plan, Mapping):
        plan = Plan.from_json(plan)
    elif not isinstance(plan, Plan):
        plan = load_plan(plan)
    if plan.sources[-1].startswith(NGRAM_PREFIX):
        raise ValueError(f"the plan's target {plan.chain[-1]!r} is an n-gram drafter; the target must be a model")
    for name, source in zip(plan.chain, plan.sources):
        if source.startswith(NGRAM_PREFIX):
            _ngram_order(source, name)  # a clear error for a malformed ngram:N
    target = load_level(plan.sources[-1], base_dir=base_dir, dtype=dtype)
    models = [load_level(s, vocab_size=target.vocab_size, base_dir=base_dir, dtype=dtype) for s in plan.sources[:-1]]
    return Hierarchy([*models, target], plan.buffers, plan.verifier, shared_vocab_size=shared_vocab_size)


# ------------------------------------------------------------------------------------ CLI


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `plan` subcommand to an argparse subparsers object (handler: `run_plan`)."""
    p = subparsers.add_parser("plan", help="choose models and buffer targets from profiled stats")
    p.add_argument("--stats", required=True, help="stats.json written by `hsd-jax profile`")
    p.add_argument("--out", required=True, help="where to write plan.json")
    p.add_argument("--plot", help="also write a bar chart (PNG) of the best plans' predicted ms/token")
    p.add_argument("--n-max", type=int, default=32, help="largest buffer target to consider (default 32)")
    p.add_argument("--temperature-mode", choices=MODES, default=None,
                   help="acceptance table to use (default: greedy if the stats' temperature is 0, else sampled)")
    p.add_argument("--measure", help='JSON {"<plan label>": measured seconds per token} to compare and plot')
    p.add_argument("--top", type=int, default=5, help="how many plans to report (default 5)")
    p.add_argument("--position-profiles", action="store_true",
                   help="use the stats' per-position acceptance profiles instead of one i.i.d. rate per pair "
                        "(on the default family the i.i.d. rate predicted measured latency better)")
    p.add_argument("--min-drafts", type=int, default=0,
                   help="only hierarchies with at least this many drafts (default 0: the target alone may win)")
    return p


def _load_measured(path: str | None) -> dict[str, float]:
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    if not isinstance(data, Mapping) or not all(_finite_number(v) and v > 0 for v in data.values()):
        raise ValueError(f"{path} must be a JSON object {{\"<plan label>\": seconds per token > 0}}")
    return {str(k): float(v) for k, v in data.items()}


def format_table(plans: Sequence[Plan], measured: Mapping[str, float] | None = None) -> str:
    """The plans as a text table: predicted (exact) and surrogate ms/token, speed-up over AR."""
    measured = measured or {}
    width = max(len(p.label) for p in plans)
    head = f"{'#':>2}  {'hierarchy':<{width}}  {'ms/token':>9}  {'speed-up':>8}  {'surrogate':>9}"
    head += f"  {'measured':>9}" if measured else ""
    rows = [head]
    for rank, p in enumerate(plans, 1):
        surrogate = f"{1e3 * p.surrogate_latency_s:9.3f}" if p.surrogate_latency_s is not None else f"{'-':>9}"
        row = (f"{rank:>2}  {p.label:<{width}}  {1e3 * p.predicted_latency_s:9.3f}  "
               f"{p.predicted_speedup:7.2f}x  {surrogate}")
        if measured:
            row += f"  {1e3 * measured[p.label]:9.3f}" if p.label in measured else f"  {'-':>9}"
        rows.append(row)
    return "\n".join(rows)


def plot_plans(plans: Sequence[Plan], path: str | os.PathLike, measured: Mapping[str, float] | None = None) -> None:
    """Bar chart of predicted ms/token per plan (labelled chain[buffers]), with measured ms/token
    overlaid as markers where `measured` has the plan's label. Agg backend, written atomically."""
    from matplotlib.figure import Figure

    measured = measured or {}
    labels = [p.label for p in plans]
    fig = Figure(figsize=(9, 1.5 + 0.5 * len(plans)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(plans))
    predicted = [1e3 * p.predicted_latency_s for p in plans]
    ax.barh(y, predicted, color="tab:blue", label="predicted")
    for k, (ms, p) in enumerate(zip(predicted, plans)):
        ax.annotate(f"{p.predicted_speedup:.2f}x", (ms, k), xytext=(-3, 0), textcoords="offset points",
                    ha="right", va="center", color="white", fontsize=8)
    hits = [(k, measured[label]) for k, label in enumerate(labels) if label in measured]
    if hits:
        ax.scatter([1e3 * s for _, s in hits], [k for k, _ in hits], color="tab:red", marker="D", zorder=3,
                   label="measured")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("ms per token")
    ax.set_title(f"speed-up over AR ({1e3 * plans[0].ar_latency_s:.3f} ms/token)", fontsize=10)
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    _atomic_write(path, buffer.getvalue())


def run_plan(args: argparse.Namespace) -> int:
    """`hsd-jax plan`: solve, print the chosen hierarchy and runner-ups, write plan.json (and the plot)."""
    stats = load_stats(args.stats)
    plans = solve(stats, n_max=args.n_max, mode=args.temperature_mode, top=getattr(args, "top", 5),
                  position_profiles=getattr(args, "position_profiles", False), min_drafts=getattr(args, "min_drafts", 0))
    measured = _load_measured(args.measure)
    best = plans[0]
    print(f"chosen: {best.label}")
    print(f"predicted {1e3 * best.predicted_latency_s:.3f} ms/token, {best.predicted_speedup:.2f}x over AR "
          f"({1e3 * best.ar_latency_s:.3f} ms/token; {best.mode} acceptance, {stats.hardware or 'unknown hardware'})")
    print(format_table(plans, measured))
    unknown = sorted(set(measured) - {p.label for p in plans})
    if unknown:
        print(f"measured labels not among these plans: {unknown}")
    save_plan(best, args.out)
    print(f"wrote {args.out}")
    if args.plot:
        plot_plans(plans, args.plot, measured)
        print(f"wrote {args.plot}")
    return 0
