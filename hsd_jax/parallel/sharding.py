"""Tensor and data parallelism on JAX's own SPMD partitioner: a `data` x `model` device mesh, a
partition rule for every weight built from `model.param_logical_axes`, and KV caches pinned to
the mesh inside the caller's `jax.jit`.

    mesh = hsd_jax.sharding.parse_mesh("data=2,model=4")
    target = hsd_jax.load_model(target_dir, mesh=mesh)                   # restored shard by shard
    draft = hsd_jax.load_model(draft_dir, mesh=mesh, rule="replicated")  # small: a copy per device
    prompts, lengths = hsd_jax.sharding.shard_batch(mesh, prompts, lengths)
    run = jax.jit(functools.partial(hsd_jax.hsd_generate, max_new_tokens=64))
    out = run(hsd_jax.Hierarchy([draft, target], (4,)), prompts, lengths, key)

A rule maps logical weight axes to mesh axes; every axis it does not name is replicated:
  "tensor"      heads, kv_heads, mlp, vocab, head_vocab -> `model`. Megatron-style: q/k/v and
                gate/up are column-parallel, o and down row-parallel, so each attention and MLP
                block costs one all-reduce of [B, T, D] over `model`.
  "replicated"  nothing is split: every device holds the whole model (small drafts: no
                collectives at all). Any weight tree qualifies, int8 CPU drafts included.
A rule may also be a mapping {logical axis: mesh axis or None}, e.g. {**RULES["tensor"], "vocab": None}.
Under every rule weights are replicated over `data`, batch rows (prompts, KV caches and all that
derives from them) are split over `data`, KV caches [L, B, S, H_kv, D] are split over `model` on
H_kv wherever kv_heads are, and the sampling state (PRNG keys, parameters) is replicated.

Embeddings and lm_head are split over the vocabulary rather than the hidden size. V is the large
dimension (SmolLM2: 49152 x 576), so this is what divides the biggest matrix; the head becomes
column-parallel: each device computes its own V/m logits and greedy argmax and softmax reduce
over them with [B, T]-sized collectives (top-k/top-p sorts gather the [B, V] rows), where a
hidden split would all-reduce the full [B, T, V] partial logits of every verification pass; and
the input lookup costs one [B, T, D] all-reduce. A V that the `model` axis does not divide (GPT-2's
50257 is prime) is padded, as serving stacks do: zero rows are appended to the embedding and zero
columns to lm_head up to the next multiple, no token id ever reaches them, and the head's logits
are cut back to V before anything reads them (`models.decoder.logits_from_hidden`), so every
distribution is the unpadded model's. `rule={**RULES["tensor"], "vocab": None}` keeps the
embeddings whole instead.

With a mesh, models use the "stacked" layer layout (the storage layout that `param_logical_axes`
describes). The CPU decode layout fuses q/k/v and gate/up along the very axes that the rule
splits, so it is refused under any rule that splits weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from hsd_jax.decoding.hsd import Hierarchy
from hsd_jax.models import Model, Params, param_logical_axes, param_shapes
from hsd_jax.models.cache import KVCache
from hsd_jax.models.config import ModelConfig

MESH_AXES = ("data", "model")
DATA, MODEL = MESH_AXES
RULES: dict[str, dict[str, str]] = {
    "tensor": {"heads": MODEL, "kv_heads": MODEL, "mlp": MODEL, "vocab": MODEL, "head_vocab": MODEL},
    "replicated": {},
}
# The config field behind each logical axis that a rule may split (for error messages).
_CONFIG_FIELDS = {"heads": "num_heads", "kv_heads": "num_kv_heads", "mlp": "intermediate_size",
                  "vocab": "vocab_size", "head_vocab": "head_vocab_size", "embed": "hidden_size",
                  "head_dim": "head_dim", "layers": "num_layers"}

Rule = str | Mapping[str, str | None]
_is_axes = lambda x: isinstance(x, tuple)  # a leaf of `param_logical_axes`


# ------------------------------------------------------------------------------- meshes


def make_mesh(data: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `data` x `model` mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    for name, size in ((DATA, data), (MODEL, model)):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"mesh axis {name!r} needs a positive integer size, got {size!r}")
    if data * model != len(devices):
        raise ValueError(
            f"a mesh of data={data} x model={model} needs {data * model} devices but {len(devices)} "
            "are given "
            f"({jax.default_backend()}); choose sizes whose product is {len(devices)}"
        )
    return jax.make_mesh((data, model), MESH_AXES, (AxisType.Auto, AxisType.Auto), devices=devices)


def parse_mesh_spec(text: str) -> dict[str, int]:
    """'data=2,model=4' -> {'data': 2, 'model': 4}: syntax only, no devices touched. An omitted
    axis is 1; one axis may be -1, meaning all devices the other axis leaves."""
    sizes: dict[str, int] = {}
    for item in (part.strip() for part in str(text).split(",")):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(
                f"mesh {text!r}: expected comma-separated AXIS=SIZE items such as 'data=2,model=4', "
                f"got {item!r}"
            )
        if name not in MESH_AXES:
            raise ValueError(f"mesh {text!r}: unknown axis {name!r}; the axes are {' and '.join(MESH_AXES)}")
        if name in sizes:
            raise ValueError(f"mesh {text!r}: axis {name!r} is given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(
                f"mesh {text!r}: the size of {name!r} must be an integer, got {value.strip()!r}"
            ) from None
        if size < 1 and size != -1:
            raise ValueError(
                f"mesh {text!r}: the size of {name!r} must be >= 1 (or -1: the remaining devices), got {size}"
            )
        sizes[name] = size
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"mesh {text!r}: at most one axis may be -1")
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def parse_mesh(text: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """`parse_mesh("data=2,model=4")` -> a Mesh over all devices (see `parse_mesh_spec`)."""
    sizes = parse_mesh_spec(text)
    count = len(jax.devices() if devices is None else devices)
    if -1 in sizes.values():
        known = math.prod(s for s in sizes.values() if s != -1)
        if count % known:
            raise ValueError(f"mesh {text!r}: {count} devices do not split into groups of {known}")
        sizes = {name: count // known if s == -1 else s for name, s in sizes.items()}
    if math.prod(sizes.values()) != count:
        hint = (
            f", e.g. 'data={count // sizes[MODEL]},model={sizes[MODEL]}'" if count % sizes[MODEL] == 0 else ""
        )
        raise ValueError(
            f"mesh {text!r} (data={sizes[DATA]} x model={sizes[MODEL]}) needs "
            f"{math.prod(sizes.values())} devices "
            f"but {count} are available ({jax.default_backend()}); give sizes whose product is {count}{hint}"
        )
    return make_mesh(sizes[DATA], sizes[MODEL], devices)


def _check_mesh(mesh: Mesh) -> Mesh:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"expected a jax.sharding.Mesh (see hsd_jax.sharding.parse_mesh), got {type(mesh).__name__}"
        )
    if set(mesh.axis_names) != set(MESH_AXES):
        raise ValueError(f"the mesh must have exactly the axes {MESH_AXES}, got {mesh.axis_names}; "
                         "build it with hsd_jax.sharding.make_mesh or parse_mesh")
    return mesh


# -------------------------------------------------------------------------------- rules


def _rule_items(rule: Rule) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(name, sorted (logical axis, mesh axis) pairs) of a preset name or a mapping."""
    if isinstance(rule, str):
        if rule not in RULES:
            raise ValueError(
                f"unknown sharding rule {rule!r}; choose one of {', '.join(RULES)} or pass a mapping "
                "{logical axis: mesh axis}"
            )
        return rule, tuple(sorted(RULES[rule].items()))
    if not isinstance(rule, Mapping):
        raise TypeError(
            f"a sharding rule is a name ({', '.join(RULES)}) or a mapping, got {type(rule).__name__}"
        )
    for logical, axis in rule.items():
        if axis is not None and axis not in MESH_AXES:
            raise ValueError(f"rule maps {logical!r} to {axis!r}, which is not a mesh axis {MESH_AXES}")
        if axis == DATA:
            raise ValueError(f"rule maps {logical!r} to {DATA!r}; weights are replicated over {DATA!r} "
                             f"(it carries batch rows), split them over {MODEL!r}")
    items = tuple(sorted((k, v) for k, v in rule.items() if v is not None))
    named = [name for name, preset in RULES.items() if tuple(sorted(preset.items())) == items]
    return (named[0] if named else "custom"), items


@dataclasses.dataclass(frozen=True)
class ModelSharding:
    """Where one model's weights and KV caches live: a mesh and a rule. Hashable: it rides on a
    `Model` as static data, so `Model.init_cache` can pin fresh caches inside any `jax.jit`."""

    mesh: Mesh
    name: str
    rule: tuple[tuple[str, str], ...]  # sorted (logical axis, mesh axis) pairs

    @classmethod
    def create(cls, mesh: Mesh, rule: Rule = "tensor") -> ModelSharding:
        name, items = _rule_items(rule)
        return cls(_check_mesh(mesh), name, items)

    @property
    def splits_weights(self) -> bool:
        return bool(self.rule)

    def spec(self, logical_axes: tuple) -> PartitionSpec:
        table = dict(self.rule)
        return PartitionSpec(*(table.get(a) for a in logical_axes))

    def param_specs(self, config: ModelConfig) -> Params:
        """A PartitionSpec per weight of the stacked layout, as a tree shaped like the params."""
        return jax.tree.map(self.spec, param_logical_axes(config), is_leaf=_is_axes)

    def param_shardings(self, config: ModelConfig) -> Params:
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.param_specs(config),
                            is_leaf=lambda x: isinstance(x, PartitionSpec))

    def cache_shardings(self) -> KVCache:
        """A KVCache of shardings: k/v [L, B, S, H_kv, D] over (data, -, -, kv_heads' axis, -)."""
        kv = NamedSharding(self.mesh, PartitionSpec(None, DATA, None, dict(self.rule).get("kv_heads"), None))
        return KVCache(k=kv, v=kv, lengths=NamedSharding(self.mesh, PartitionSpec(DATA)))

    def vocab_padding(self, config: ModelConfig) -> int:
        """Rows of padding that make the vocabulary divisible by its mesh axis (0: none needed)."""
        axis = dict(self.rule).get("vocab")
        return 0 if axis is None else -config.vocab_size % self.mesh.shape[axis]

    def validate(self, config: ModelConfig) -> None:
        """Raise ValueError naming the axis, the sizes and the fix if the mesh does not divide a
        split dimension of the model (the vocabulary is padded instead, see `vocab_padding`)."""
        sizes = {}  # logical axis -> its size, for every split axis but the (padded) vocabulary
        for axes, shape in zip(jax.tree.leaves(param_logical_axes(config), is_leaf=_is_axes),
                               jax.tree.leaves(param_shapes(config), is_leaf=_is_axes)):
            sizes.update({a: n for a, n, s in zip(axes, shape, self.spec(axes))
                          if s is not None and a != "vocab"})
        for logical, size in sorted(sizes.items()):
            axis = dict(self.rule)[logical]
            parts = self.mesh.shape[axis]
            if size % parts:
                field = _CONFIG_FIELDS.get(logical, logical)
                fits = [d for d in range(parts, 0, -1) if all(n % d == 0 for n in sizes.values())]
                raise ValueError(
                    f"mesh axis {axis!r} has size {parts}, which does not divide {field}={size} of this "
                    f"{config.model_type} model (sharding rule {self.name!r} splits {logical!r} "
                    f"over {axis!r}); "
                    f"use a {axis!r} size that divides every split dimension "
                    f"({', '.join(f'{_CONFIG_FIELDS.get(k, k)}={v}' for k, v in sorted(sizes.items()))}; "
                    f"the largest up to {parts} is {fits[0]}), or rule='replicated' for this model"
                )

    def constrain_cache(self, cache: KVCache) -> KVCache:
        """Pin a (fresh) cache to the mesh: batch over `data`, kv heads per the rule."""
        check_batch(self.mesh, cache.batch)
        return jax.lax.with_sharding_constraint(cache, self.cache_shardings())

    def layout(self, layout: str) -> str:
        """The layer layout to run under this sharding: 'auto' is 'stacked'; the fused CPU decode
        layout only where no weight is split."""
        if layout == "auto":
            return "stacked"
        if layout == "unstacked" and self.splits_weights:
            raise ValueError(
                "the 'unstacked' CPU decode layout fuses q/k/v and gate/up along the axes that "
                "sharding rule "
                f"{self.name!r} splits; use layout='stacked' (or 'auto') with a mesh, or rule='replicated'"
            )
        return layout


# ------------------------------------------------------------------------ sharding models


def shard_model(model: Model, mesh: Mesh, rule: Rule = "tensor") -> Model:
    """`model` with its weights placed on `mesh` per `rule` and its KV caches pinned there.

    A splitting rule converts to the stacked layout; "replicated" keeps any layout and weight
    tree (int8 drafts included)."""
    sharding = ModelSharding.create(mesh, rule)
    if not sharding.splits_weights:
        params = jax.device_put(model.params, NamedSharding(mesh, PartitionSpec()))
        return model.replace(params=params, sharding=sharding)
    sharding.validate(model.config)
    if any(
        hasattr(w, "in_dims") for w in jax.tree.leaves(model.params, is_leaf=lambda x: hasattr(x, "in_dims"))
    ):
        raise ValueError(
            f"int8-quantized weights cannot be split by rule {sharding.name!r}; shard such a draft "
            "with rule='replicated'"
        )
    model = model.with_layout("stacked")
    params = pad_vocabulary(model.params, model.config, sharding.vocab_padding(model.config))
    shardings = sharding.param_shardings(model.config)
    if jax.tree.structure(params) != jax.tree.structure(shardings):
        raise ValueError("the model's weights do not match param_logical_axes(config): "
                         f"{jax.tree.structure(params)} vs {jax.tree.structure(shardings)}")
    return model.replace(params=jax.device_put(params, shardings), sharding=sharding)


def pad_vocabulary(params: Params, config: ModelConfig, rows: int) -> Params:
    """Stacked-layout weights with `rows` zero rows appended to the embedding and zero columns to an
    untied lm_head (a vocabulary-subset head is not padded: its size is `head_vocab_size`)."""
    if not rows:
        return params
    padded = {**params, "embed": jax.numpy.pad(params["embed"], ((0, rows), (0, 0)))}
    if "lm_head" in params and not config.head_vocab_size:
        padded["lm_head"] = jax.numpy.pad(params["lm_head"], ((0, 0), (0, rows)))
    return padded


def family_rules(count: int) -> list[str]:
    """The command line's rules for `count` models, target last: the drafts replicated (small,
    so no collectives) and the target tensor-parallel."""
    return ["replicated"] * (count - 1) + ["tensor"]


def shard_levels(models: Sequence[Any], mesh: Mesh, rule: Rule | Sequence[Rule] | None = None) -> list[Any]:
    """Every neural model of `models` (smallest first) on `mesh`: one rule for all, one per model,
    or None for `family_rules`. The n-gram drafter has no weights and is returned as is."""
    rules = (family_rules(len(models)) if rule is None else
             [rule] * len(models) if isinstance(rule, (str, Mapping)) else list(rule))
    if len(rules) != len(models):
        raise ValueError(
            f"give one sharding rule for all models or one per model ({len(models)}), got {len(rules)}"
        )
    return [shard_model(m, mesh, r) if isinstance(m, Model) else m for m, r in zip(models, rules)]


def shard_hierarchy(hierarchy, mesh: Mesh, rule: Rule | Sequence[Rule] | None = "tensor"):
    """A `Hierarchy` with every neural model on `mesh`: one rule for all, one per model (smallest
    first; e.g. ("replicated", "tensor", "tensor")), or None for `family_rules`."""
    sharded = tuple(shard_levels(hierarchy.models, mesh, rule))
    return Hierarchy.tree_unflatten(hierarchy.tree_flatten()[1], (sharded,))


def check_batch(mesh: Mesh, batch: int) -> None:
    """Raise ValueError with the fix if the `data` axis does not divide `batch` rows."""
    parts = mesh.shape[DATA]
    if batch % parts:
        raise ValueError(
            f"mesh axis {DATA!r} has size {parts}, which does not divide the batch of {batch} rows; "
            f"pad the batch to a multiple of {parts} (e.g. {-(-batch // parts) * parts} rows) or use a "
            f"smaller {DATA!r} axis")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over `data`, everything else replicated."""
    return NamedSharding(_check_mesh(mesh), PartitionSpec(DATA))


def shard_batch(mesh: Mesh, *arrays) -> tuple[jax.Array, ...]:
    """Place `prompt_tokens [B, P]`, `prompt_lengths [B]`, ... with their rows split over `data`
    (single process; on several hosts build them with `distributed.global_batch`)."""
    sharding = batch_sharding(mesh)
    out = []
    for array in arrays:
        array = np.asarray(array) if not isinstance(array, jax.Array) else array
        chex.assert_rank(array, {1, 2})
        check_batch(mesh, array.shape[0])
        out.append(jax.device_put(array, sharding))
    return tuple(out)


def per_device_bytes(params: Params) -> dict[jax.Device, int]:
    """Bytes of weights each device holds."""
    held: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held
