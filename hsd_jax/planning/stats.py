"""The stats schema: profiled costs and acceptance rates (the JSON `hsd-jax profile` writes).

`Stats` owns both directions: `Stats.from_json` parses and validates (a ValueError naming the
file and the field, and how to fix it), `Stats.to_json` writes. `profile.profile_family` builds
its output through this type, and the planner reads it back with `load_stats`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hsd_jax.io.files import write_json
from hsd_jax.io.sources import parse_source
from hsd_jax.planning.latency import Acceptance

T = TypeVar("T")

MODES = ("greedy", "sampled")
STATS_VERSION = 1


def acceptance_mode(temperature: float, override: str | None = None) -> str:
    """The acceptance table to plan with: `override` if given, else "greedy" at temperature 0
    (argmax agreement) and "sampled" otherwise (E[sum min(p, q)], research.md §1)."""
    if override is not None:
        if override not in MODES:
            raise ValueError(f"acceptance mode must be one of {MODES}, got {override!r}")
        return override
    return "greedy" if temperature == 0 else "sampled"


@dataclasses.dataclass(frozen=True)
class ModelStats:
    name: str
    source: str  # a model directory, "int8:DIR" or "ngram:N"
    params: int
    cost_s: tuple[float, ...]  # c(1), ..., c(K_max) in seconds

    @property
    def step_cost(self) -> float:
        """c(1): the cost that orders models from cheapest (M_0) to the target."""
        return self.cost_s[0]

    def to_json(self) -> dict:
        return {"name": self.name, "source": self.source, "params": self.params, "cost_s": list(self.cost_s)}

    @classmethod
    def from_json(cls, entry: Any, index: int = 0) -> ModelStats:
        if not isinstance(entry, Mapping):
            raise ValueError(f"models[{index}] must be an object with name, source, params, cost_s")
        for field in ("name", "source", "params", "cost_s"):
            if field not in entry:
                raise ValueError(f"models[{index}] has no {field!r}")
        name, source, params, costs = entry["name"], entry["source"], entry["params"], entry["cost_s"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"models[{index}].name must be a non-empty string, got {name!r}")
        try:
            parse_source(source)
        except ValueError as e:
            raise ValueError(f"model {name!r}: {e}") from None
        if isinstance(params, bool) or not isinstance(params, int) or params < 0:
            raise ValueError(f"model {name!r}: params must be an integer >= 0, got {params!r}")
        if not isinstance(costs, list) or not costs:
            raise ValueError(f"model {name!r} has an empty cost table cost_s; profile its forward cost "
                             f"c(1), c(2), ... in seconds")
        for k, c in enumerate(costs, 1):
            if not _finite_number(c) or c <= 0:
                raise ValueError(
                    f"model {name!r}: cost_s c({k}) = {c!r} must be a positive, finite number of "
                    f"seconds; re-profile it (for the n-gram drafter use its small measured cost)"
                )
        return cls(name, source, params, tuple(float(c) for c in costs))


@dataclasses.dataclass(frozen=True)
class Stats:
    """Profiled costs and acceptance rates, and how they were measured."""

    hardware: str
    dtype: str
    batch_size: int
    temperature: float
    versions: dict
    target: str
    models: tuple[ModelStats, ...]
    acceptance: dict  # mode -> drafter -> verifier -> alpha
    position_acceptance: dict | None = None  # mode -> drafter -> verifier -> [alpha_1, alpha_2, ...]
    # provenance (optional): the mesh shape, KV-cache size the costs were timed at, the k actually
    # timed (the rest interpolated), the prompts and answer positions the acceptances averaged over
    mesh: dict | None = None
    cache_size: int | None = None
    measured_k: tuple[int, ...] | None = None
    prompts: int | None = None
    answer_positions: int | None = None

    # ------------------------------------------------------------------------- queries

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

    # ---------------------------------------------------------------------------- JSON

    def to_json(self) -> dict:
        """The stats JSON as a dict (`save_stats` writes it)."""
        data = {
            "version": STATS_VERSION,
            "hardware": self.hardware,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "temperature": self.temperature,
            "versions": dict(self.versions),
            "target": self.target,
            "mesh": self.mesh,
            "cache_size": self.cache_size,
            "measured_k": None if self.measured_k is None else list(self.measured_k),
            "prompts": self.prompts,
            "answer_positions": self.answer_positions,
            "models": [m.to_json() for m in self.models],
            "acceptance": _copy_rates(self.acceptance),
        }
        if self.position_acceptance is not None:
            data["position_acceptance"] = _copy_rates(self.position_acceptance)
        return {k: v for k, v in data.items() if v is not None or k == "mesh"}

    @classmethod
    def from_json(cls, data: Any, where: str = "stats") -> Stats:
        """Parse and validate the stats dict; `where` (the file) prefixes every error.

        Raises ValueError naming the problem and its fix: wrong version, missing fields, duplicate
        model names, an empty or non-positive/non-finite cost table, an unknown target, an
        acceptance outside [0, 1], or a (drafter, verifier) pair without an acceptance in a mode
        the stats have (`solve` then checks that the mode it plans with is present).
        """
        return parse_document(cls._parse, data, where)

    @classmethod
    def _parse(cls, data: Any) -> Stats:
        if not isinstance(data, Mapping):
            raise ValueError("stats must be a JSON object")
        if data.get("version") != STATS_VERSION:
            raise ValueError(
                f"stats version {data.get('version')!r} is not supported; expected {STATS_VERSION} "
                f"(re-run `hsd-jax profile`)"
            )
        for field in ("target", "models", "acceptance"):
            if field not in data:
                raise ValueError(f"stats have no {field!r} field (re-run `hsd-jax profile`)")
        temperature = data.get("temperature", 0.0)
        if not _finite_number(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if not isinstance(data["models"], list) or not data["models"]:
            raise ValueError("stats list no models; profile at least the target")
        models = tuple(ModelStats.from_json(entry, i) for i, entry in enumerate(data["models"]))
        names = [m.name for m in models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate model names {duplicates}; give every profiled model a unique name")
        target = data["target"]
        if target not in names:
            raise ValueError(f"unknown target {target!r}: it is not among the models {names}; "
                             f"set 'target' to one of them or profile it")
        if parse_source(models[names.index(target)].source).is_ngram:
            raise ValueError(
                f"the target {target!r} is the n-gram drafter; the target must be a neural model"
            )
        _check_rates(data["acceptance"], "acceptance", is_profile=False)
        position = data.get("position_acceptance")
        if position is not None:
            _check_rates(position, "position_acceptance", is_profile=True)
        for field in ("batch_size", "cache_size", "prompts", "answer_positions"):
            value = data.get(field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{field} must be an integer >= 0, got {value!r}")
        for field in ("versions", "mesh"):
            if data.get(field) is not None and not isinstance(data[field], Mapping):
                raise ValueError(f"{field} must be an object, got {data[field]!r}")
        measured_k = data.get("measured_k")
        if measured_k is not None and (not isinstance(measured_k, list) or not all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in measured_k)):
            raise ValueError(f"measured_k must be a list of integers >= 1, got {measured_k!r}")
        stats = cls(hardware=str(data.get("hardware", "")), dtype=str(data.get("dtype", "")),
                    batch_size=int(data.get("batch_size", 1)), temperature=float(temperature),
                    versions=dict(data.get("versions") or {}), target=target, models=models,
                    acceptance=_copy_rates(data["acceptance"]),
                    position_acceptance=None if position is None else _copy_rates(position),
                    mesh=None if data.get("mesh") is None else dict(data["mesh"]),
                    cache_size=data.get("cache_size"),
                    measured_k=None if measured_k is None else tuple(measured_k),
                    prompts=data.get("prompts"), answer_positions=data.get("answer_positions"))
        if not stats.acceptance and any(True for _ in stats.pairs()):
            raise ValueError("stats have no acceptance rates; profile at least one mode "
                             f"({' or '.join(MODES)}) for every (drafter, verifier) pair")
        for mode in stats.acceptance:
            stats.check_mode(mode)
        return stats


def parse_document(parse: Callable[[Any], T], data: Any, where: str) -> T:
    """`parse(data)`, JSON text decoded first, with every ValueError prefixed by `where` (the file)."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON: {e}") from None
    try:
        return parse(data)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _copy_rates(table: Mapping) -> dict:
    """mode -> drafter -> verifier -> value, copied (lists stay lists)."""
    return {m: {d: {v: list(x) if isinstance(x, (list, tuple)) else x for v, x in t.items()}
                for d, t in drafters.items()} for m, drafters in table.items()}


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


def load_stats(source: str | os.PathLike | Mapping | Stats) -> Stats:
    """Read and validate stats: a path to the JSON, its parsed dict, or a `Stats` (returned)."""
    if isinstance(source, Stats):
        return source
    if isinstance(source, Mapping):
        return Stats.from_json(source)
    where = str(source)
    try:
        data = json.loads(Path(source).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from e
    return Stats.from_json(data, where=where)


def save_stats(stats: Stats, path: str | os.PathLike) -> Path:
    """Write the stats JSON atomically."""
    return write_json(path, stats.to_json())
