"""A hierarchy: the chain of drafters M_0 < ... < M_K (target last), their buffer targets and the
verification rule of each level. A pytree (weights are leaves), so it passes through `jax.jit`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from hsd_jax.decoding.drafter import Drafter, describe
from hsd_jax.decoding.schedule import Schedule
from hsd_jax.decoding.verify import check_rule
from hsd_jax.models import Model

_PLAN_LOADER: Callable[..., Hierarchy] | None = None
MAX_BUFFER = 256  # the largest buffer target T_i (the planner searches 1..32)


def register_plan_loader(loader: Callable[..., Hierarchy]) -> None:
    """`planning` registers how a plan becomes a Hierarchy, so this module need not import it."""
    global _PLAN_LOADER
    _PLAN_LOADER = loader


@jax.tree_util.register_pytree_node_class
class Hierarchy:
    """A chain of models M_0 < ... < M_K (target last), buffer targets T_0..T_{K-1} and the
    verification rule each level M_1..M_K uses. A pytree: weights are leaves, the rest static."""

    def __init__(self, models: Sequence[Drafter], buffers: Sequence[int] = (),
                 verifier: str | Sequence[str] = "tokenwise", *, shared_vocab_size: int | None = None,
                 allow_inexact: bool = False):
        if isinstance(models, (str, bytes)) or not isinstance(models, Sequence):
            raise TypeError(f"models must be a sequence of drafters (M_0 first, target last), got "
                            f"{type(models).__name__}")
        models = tuple(models)
        if not models:
            raise ValueError("a Hierarchy needs at least the target model")
        for i, m in enumerate(models):
            if not isinstance(m, Drafter):
                raise TypeError(f"models[{i}] is a {type(m).__name__}; expected hsd_jax.Model, NGramDrafter "
                                "or another hsd_jax.decoding.drafter.Drafter")
        if models[-1].init_state(1, 1) is None:
            raise ValueError(
                f"the target (the last model) must be a neural Model (one with a KV cache), "
                f"not {describe(models[-1])}; "
                "order models smallest (M_0) to target (M_K)"
            )
        sizes = [m.num_params for m in models]
        for i in range(len(models) - 1):
            if sizes[i] > sizes[-1]:
                raise ValueError(
                    f"models[{i}] has {sizes[i]:,} parameters, more than the target models[-1] "
                    f"({sizes[-1]:,}); order models smallest (M_0) to target (M_K), target last")
        depth = len(models) - 1
        if isinstance(buffers, (str, bytes)) or not isinstance(buffers, (Sequence, np.ndarray)):
            raise TypeError(f"buffers must be a sequence of integers (T_0..T_{{K-1}}), got {buffers!r}")
        buffers = tuple(buffers)
        if len(buffers) != depth:
            raise ValueError(
                f"{len(models)} models need {depth} buffer targets (T_0..T_{{K-1}}), got {len(buffers)}"
            )
        for i, t in enumerate(buffers):
            if (
                isinstance(t, (bool, np.bool_))
                or not isinstance(t, (int, np.integer))
                or not 1 <= t <= MAX_BUFFER
            ):
                raise ValueError(f"buffer T_{i} must be an integer in [1, {MAX_BUFFER}], got {t!r}")
        schedule = Schedule.of(tuple(int(t) for t in buffers))
        if not isinstance(verifier, (str, Sequence)):
            raise TypeError(f"verifier must be a rule name or one per level, got {verifier!r}")
        verifiers = (verifier,) * depth if isinstance(verifier, str) else tuple(verifier)
        if len(verifiers) != depth:
            raise ValueError(
                f"give one verifier for all levels or one per level M_1..M_K ({depth}), got {len(verifiers)}"
            )
        verifiers = tuple(check_rule(v, allow_inexact) for v in verifiers)
        vocab_sizes = [m.vocab_size for m in models]
        if shared_vocab_size is None:
            if len(set(vocab_sizes)) > 1:
                raise ValueError(
                    f"models have different vocabulary sizes {vocab_sizes}. If they share one tokenizer "
                    "and differ only by padding, pass shared_vocab_size=<the tokenizer's size> to slice "
                    "every model's logits to it; otherwise they cannot draft for each other")
            shared_vocab_size = vocab_sizes[0]
        elif (isinstance(shared_vocab_size, (bool, np.bool_))
              or not isinstance(shared_vocab_size, (int, np.integer))
              or not 1 <= shared_vocab_size <= min(vocab_sizes)):
            raise ValueError(f"shared_vocab_size={shared_vocab_size} must be in [1, {min(vocab_sizes)}] "
                             f"(the smallest model vocabulary of {vocab_sizes})")
        self._set(models, schedule.buffers, verifiers, int(shared_vocab_size))

    def _set(self, models, buffers, verifiers, vocab_size):
        self.models, self.buffers, self.verifiers, self.vocab_size = models, buffers, verifiers, vocab_size
        self.schedule = Schedule(buffers)

    @classmethod
    def from_plan(cls, plan, **kwargs) -> Hierarchy:
        """The hierarchy of a plan (a `planning.Plan`, its dict, or a plan.json path); keyword
        arguments as `planning.hierarchy_from_plan` (dtype, shared_vocab_size). Relative sources
        resolve against the plan file's directory."""
        if _PLAN_LOADER is None:
            raise RuntimeError("no plan loader is registered: import hsd_jax (or hsd_jax.planning) first")
        return _PLAN_LOADER(plan, **kwargs)

    @property
    def depth(self) -> int:
        """K: the number of levels above M_0."""
        return len(self.models) - 1

    @property
    def target(self) -> Model:
        return self.models[-1]

    @property
    def capacities(self) -> tuple[int, ...]:
        """Buffer size of each level < K: T_i plus the largest overshoot, cap_i = T_i + cap_{i-1}."""
        return self.schedule.capacities

    def tree_flatten(self):
        return (self.models,), (self.buffers, self.verifiers, self.vocab_size)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj._set(children[0], *aux)
        return obj

    def __repr__(self) -> str:
        names = [describe(m) for m in self.models]
        return f"Hierarchy({' < '.join(names)}, buffers={self.buffers}, verifiers={self.verifiers})"
