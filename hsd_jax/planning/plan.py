"""plan.json: a chosen hierarchy (models and buffer targets) and its predicted latency.

`Plan` owns the schema (`from_json` parses and validates, `to_json` writes); `hierarchy_from_plan`
loads the plan's models into an `hsd_jax.Hierarchy`. Relative model directories in a plan file
resolve against the plan file's directory, so a plan keeps working from any working directory
(`Plan.relative_to` re-expresses sources for a plan written elsewhere).

A plan read from a file is input like any other: its model sources must lie inside the plan
file's directory. An absolute source, one that climbs out with `..`, or a link leading out is
refused unless the caller says so (`allow_outside_plan_dir=True`, `--allow-outside-plan-dir`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hsd_jax.decoding.hsd import Hierarchy, register_plan_loader
from hsd_jax.io.files import write_json
from hsd_jax.io.sources import from_source, parse_source
from hsd_jax.planning.stats import MODES, parse_document

PLAN_VERSION = 1


def plan_label(chain: Sequence[str], buffers: Sequence[int]) -> str:
    """'ngram3[4] > draft-s[8] > target': each model with its buffer target, target last."""
    return " > ".join([f"{name}[{t}]" for name, t in zip(chain, buffers)] + [chain[-1]])


@dataclasses.dataclass
class Plan:
    """A chosen hierarchy and its predicted latency (the content of plan.json)."""

    chain: tuple[str, ...]  # model names, M_0 first, target last
    sources: tuple[str, ...]  # model directories, "int8:DIR" or "ngram:N", like `chain`
    buffers: tuple[int, ...]  # T_0..T_{K-1}
    predicted_latency_s: float  # exact model (`expected_latency`), seconds per token
    ar_latency_s: float  # c_K(1), plain autoregressive decoding of the target
    mode: str = "greedy"
    surrogate_latency_s: float | None = None  # the DP's objective (`surrogate_latency`)
    verifier: str = "tokenwise"
    runner_up: list[dict] = dataclasses.field(default_factory=list)
    stats: dict = dataclasses.field(default_factory=dict)  # hardware, dtype, temperature
    # where relative sources resolve: the plan file's directory once loaded by `load_plan`
    # (not part of the plan's content: not written, not compared)
    base_dir: str | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def dtype(self) -> str | None:
        """The weight dtype the plan was made for (its stats' profiling dtype), if recorded."""
        return self.stats.get("dtype") or None

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

    def directory(self, index: int = -1, base_dir: str | os.PathLike | None = None) -> Path | None:
        """The model directory of level `index` (default: the target), relative ones resolved
        against `base_dir`, else the plan file's directory, else the working directory; None
        for the n-gram drafter."""
        return parse_source(self.sources[index]).directory(self._base(base_dir))

    def relative_to(self, directory: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> Plan:
        """The same plan with every relative model directory (as it resolves now: against
        `base_dir`, else the plan's own base) re-expressed relative to `directory`, for a plan
        file written there. Absolute directories and n-gram sources are kept."""
        start = Path(directory).absolute()
        sources = []
        for text in self.sources:
            source = parse_source(text)
            if source.is_ngram or Path(source.path).is_absolute():
                sources.append(text)
            else:
                moved = os.path.relpath(Path(self._base(base_dir)).absolute() / source.path, start)
                sources.append(dataclasses.replace(source, path=moved).text)
        return dataclasses.replace(self, sources=tuple(sources), base_dir=str(start))

    def _base(self, base_dir: str | os.PathLike | None) -> str | os.PathLike:
        return base_dir if base_dir is not None else self.base_dir if self.base_dir is not None else "."

    def to_json(self) -> dict:
        """plan.json as a dict (`save_plan` writes it)."""
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
    def from_json(cls, data: Mapping | str, where: str = "plan") -> Plan:
        """A Plan from plan.json's dict or its JSON text; a ValueError prefixed by `where` (the
        file) names what is wrong."""
        return parse_document(cls._parse, data, where)

    @classmethod
    def _parse(cls, data: Any) -> Plan:
        if not isinstance(data, Mapping):
            raise ValueError(f"a plan must be a JSON object, got {type(data).__name__}")
        if data.get("version") != PLAN_VERSION:
            raise ValueError(
                f"plan version {data.get('version')!r} is not supported; expected {PLAN_VERSION} "
                f"(re-run `hsd-jax plan`)"
            )
        for field in ("chain", "buffers", "predicted_latency_s", "ar_latency_s"):
            if field not in data:
                raise ValueError(f"malformed plan: no {field!r} field")
        chain = data["chain"]
        if not isinstance(chain, list) or not chain:
            raise ValueError(
                f"malformed plan: 'chain' must be a non-empty list of {{name, source}}, got {chain!r}"
            )
        names, sources = [], []
        for i, entry in enumerate(chain):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or not entry["name"]:
                raise ValueError(
                    f"malformed plan: chain[{i}] must be an object with a string 'name', got {entry!r}"
                )
            source = entry.get("source")
            if not isinstance(source, str):
                raise ValueError(f"malformed plan: chain[{i}].source must be a string (a model directory, "
                                 f"int8:DIR or ngram:N), got {source!r}")
            parse_source(source)
            names.append(entry["name"])
            sources.append(source)
        buffers = data["buffers"]
        if not isinstance(buffers, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1
                                                    for t in buffers):
            raise ValueError(f"malformed plan: 'buffers' must be a list of integers >= 1, got {buffers!r}")
        if len(buffers) != len(names) - 1:
            raise ValueError(
                f"malformed plan: {len(names)} models need {len(names) - 1} buffers, got {len(buffers)}"
            )
        mode = data.get("mode", "greedy")
        if mode not in MODES:
            raise ValueError(f"malformed plan: mode must be one of {MODES}, got {mode!r}")
        try:
            return cls(chain=tuple(names), sources=tuple(sources), buffers=tuple(buffers),
                       predicted_latency_s=float(data["predicted_latency_s"]),
                       ar_latency_s=float(data["ar_latency_s"]), mode=mode,
                       surrogate_latency_s=data.get("surrogate_latency_s"),
                       verifier=data.get("verifier", "tokenwise"), runner_up=list(data.get("runner_up", [])),
                       stats=dict(data.get("stats", {})))
        except (TypeError, ValueError) as e:
            raise ValueError(f"malformed plan: {e}") from None


def load_plan(path: str | os.PathLike) -> Plan:
    """Read plan.json; its relative sources will resolve against the file's directory."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the plan.json file `hsd-jax plan` wrote")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a plan.json (not UTF-8 text: {e})") from None
    plan = Plan.from_json(text, where=str(path))
    plan.base_dir = str(Path(path).absolute().parent)
    return plan


def save_plan(plan: Plan, path: str | os.PathLike) -> Path:
    """Write plan.json atomically, its sources as they are (see `Plan.relative_to`)."""
    return write_json(path, plan.to_json())


def outside_sources(plan: Plan, base_dir: str | os.PathLike | None = None) -> list[str]:
    """The plan's model sources that are absolute or resolve (links followed) outside the
    directory they are relative to."""
    root = Path(plan._base(base_dir)).resolve()
    outside = []
    for text in plan.sources:
        source = parse_source(text)
        if source.is_ngram:
            continue
        if Path(source.path).is_absolute() or not (root / source.path).resolve().is_relative_to(root):
            outside.append(text)
    return outside


def hierarchy_from_plan(
    plan: Plan | Mapping | str | os.PathLike,
    *,
    base_dir: str | os.PathLike | None = None,
    dtype: Any = None,
    shared_vocab_size: int | None = None,
    allow_outside_plan_dir: bool = False,
    allow_inexact: bool = False,
) -> Hierarchy:
    """Load the plan's models into an `hsd_jax.Hierarchy` with the plan's buffers and verifier.

    `plan` is a plan.json path, a `Plan` or its dict. Relative model directories resolve against
    `base_dir` when given, else the plan file's directory (a path, or a Plan from `load_plan`),
    else the working directory. "ngram:N" becomes an `NGramDrafter` with the target's vocabulary;
    `dtype` casts the weights (default: the dtype the plan's stats were profiled in, else as
    stored); `shared_vocab_size` is passed on for models whose vocabularies
    differ only by padding (see `Hierarchy`). A plan read from a file may name models only inside
    its directory unless `allow_outside_plan_dir`; `allow_inexact` admits the plan's inexact
    verifier (see `Hierarchy`)."""
    if isinstance(plan, Mapping):
        plan = Plan.from_json(plan)
    elif isinstance(plan, (str, os.PathLike)):
        plan = load_plan(plan)
    elif not isinstance(plan, Plan):
        raise ValueError(f"a plan is a plan.json path, a Plan or its dict; got {type(plan).__name__}")
    base = plan._base(base_dir)
    dtype = plan.dtype if dtype is None else dtype
    outside = outside_sources(plan, base_dir) if plan.base_dir is not None else []
    if outside and not allow_outside_plan_dir:
        raise ValueError(
            f"the plan names models outside its directory {Path(base).absolute()}: {', '.join(outside)}. "
            "A plan from elsewhere should not make hsd-jax read arbitrary paths; move the models (or the "
            "plan) so that they lie below the plan file, or pass --allow-outside-plan-dir "
            "(allow_outside_plan_dir=True) if you trust this plan")
    sources = [parse_source(s) for s in plan.sources]
    if sources[-1].is_ngram:
        raise ValueError(
            f"the plan's target {plan.chain[-1]!r} is an n-gram drafter; the target must be a model"
        )
    target = from_source(sources[-1], base_dir=base, dtype=dtype)
    models = [from_source(s, vocab_size=target.vocab_size, base_dir=base, dtype=dtype) for s in sources[:-1]]
    return Hierarchy([*models, target], plan.buffers, plan.verifier, shared_vocab_size=shared_vocab_size,
                     allow_inexact=allow_inexact)


register_plan_loader(hierarchy_from_plan)
