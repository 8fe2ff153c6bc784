"""Sharding over a `data` x `model` mesh of 8 fake CPU devices (tests/conftest.py sets
XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported): greedy identity with
one device for every family, the weight rule and per-device bytes, sharded checkpoint restore,
pinned KV caches, errors, mesh parsing, and two real processes joined by `distributed`.

Programs here are compiled with XLA:CPU's backend optimisation level 0 (reference and sharded
alike) only to keep compile time down on 2 cores; partitioning is unaffected.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import layer_prefix, tiny_config
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hsd_jax import distributed
from hsd_jax.cli.common import add_mesh_argument
from hsd_jax.decoding.ar import ar_generate
from hsd_jax.decoding.hsd import Hierarchy, hsd_generate
from hsd_jax.decoding.ngram import NGramDrafter
from hsd_jax.io.checkpoint import load_model, save_model
from hsd_jax.models import Model, abstract_params, param_shapes
from hsd_jax.models.config import ModelConfig, from_hf_dict
from hsd_jax.parallel.sharding import (
    RULES,
    ModelSharding,
    make_mesh,
    parse_mesh,
    parse_mesh_spec,
    per_device_bytes,
    shard_batch,
    shard_hierarchy,
    shard_model,
)

VOCAB = 64
BATCH = 8
NEW = 12
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# Tiny random members of every family, with head, kv-head, MLP and vocabulary sizes divisible by 8.
_LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=4,
              max_position_embeddings=128)
FAMILIES = {
    "llama": dict(
        _LLAMA, model_type="llama", num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True
    ),
    "mistral": dict(
        _LLAMA, model_type="mistral", num_attention_heads=8, num_key_value_heads=8, sliding_window=6
    ),
    "qwen2": dict(_LLAMA, model_type="qwen2", num_attention_heads=16, num_key_value_heads=8),
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=8, n_positions=128),
    "gpt_neox": dict(
        _LLAMA, model_type="gpt_neox", num_attention_heads=8, rotary_pct=0.5, use_parallel_residual=True
    ),
}
# data x model meshes, and the rule of the 1-layer draft M_1 of the K=2 hierarchy on each.
MESHES = {"data=1,model=8": "tensor", "data=2,model=4": "replicated", "data=8,model=1": "tensor"}


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    if jax.device_count() < 8:
        pytest.fail(
            f"tests/test_sharding.py needs 8 devices but jax sees {jax.device_count()}: XLA_FLAGS must hold "
            "--xla_force_host_platform_device_count=8 before jax is imported (tests/conftest.py sets it; "
            f"XLA_FLAGS is now {__import__('os').environ.get('XLA_FLAGS')!r})"
        )


def _random_params(config: ModelConfig, seed: int = 0):
    """Weights large enough to matter everywhere (biases and norm scales are random too), drawn
    with numpy: one XLA compile per weight shape would cost seconds on 2 cores."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        base = 1.0 if "scale" in name else 0.0
        spread = 0.2 if "scale" in name or "'b" in name or "bias" in name else 0.5
        return jnp.asarray(base + spread * rng.standard_normal(shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(
        draw, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple)
    )


@cache
def _target(family: str) -> Model:
    config = from_hf_dict(FAMILIES[family])
    return Model(_random_params(config), config)


def _prompts() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, VOCAB, (BATCH, 8), dtype=np.int32), rng.integers(2, 9, (BATCH,), dtype=np.int32)


def _both(h: Hierarchy, prompts, lengths, key):
    """The user's program: AR of the target and HSD of the hierarchy, in one jit."""
    ar = ar_generate(h.target, prompts, lengths, key, max_new_tokens=NEW)
    return ar.tokens, hsd_generate(h, prompts, lengths, key, max_new_tokens=NEW).tokens


def _compile(fn, *args):
    lowered = jax.jit(fn).lower(*args)
    return lowered, lowered.compile(compiler_options=FAST_COMPILE)


def _hierarchy(target: Model) -> Hierarchy:
    """K = 2: n-gram drafter < the target's first layer < the target."""
    return Hierarchy([NGramDrafter(2, VOCAB), layer_prefix(target, 1), target], (2, 2))


@cache
def _reference(family: str) -> np.ndarray:
    """Greedy AR tokens of the unsharded target on one device."""
    prompts, lengths = _prompts()
    target = _target(family)
    run = lambda m, p, n, k: ar_generate(m, p, n, k, max_new_tokens=NEW).tokens
    _, compiled = _compile(run, target, prompts, lengths, jax.random.PRNGKey(0))
    tokens = np.asarray(compiled(target, prompts, lengths, jax.random.PRNGKey(0)))
    assert len(np.unique(tokens)) > 10, "degenerate reference: the comparison would prove little"
    return tokens


@pytest.mark.parametrize("mesh_spec", list(MESHES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_outputs_identical_to_one_device(family, mesh_spec):
    """AR and a K=2 hierarchy (target and draft sharded, prompts split over `data`) under the
    user's jax.jit give exactly the one-device greedy tokens (HSD greedy = target AR greedy)."""
    mesh = parse_mesh(mesh_spec)
    hierarchy = shard_hierarchy(
        _hierarchy(_target(family)), mesh, ("replicated", MESHES[mesh_spec], "tensor")
    )
    prompts, lengths = shard_batch(mesh, *_prompts())
    key = jax.random.PRNGKey(0)
    lowered, compiled = _compile(_both, hierarchy, prompts, lengths, key)
    assert "callback" not in lowered.as_text(), "host round-trip in the generation program"
    ar_tokens, hsd_tokens = compiled(hierarchy, prompts, lengths, key)
    reference = _reference(family)
    np.testing.assert_array_equal(np.asarray(ar_tokens), reference)
    np.testing.assert_array_equal(np.asarray(hsd_tokens), reference)


# ---------------------------------------------------------------------------- weight rule

_EXPECTED_SPECS = {  # logical axes -> PartitionSpec under "tensor", written out by hand
    "wq": P(None, None, "model", None),
    "wk": P(None, None, "model", None),
    "wv": P(None, None, "model", None),
    "wo": P(None, "model", None, None),
    "w_up": P(None, None, "model"),
    "w_gate": P(None, None, "model"),
    "w_down": P(None, "model", None),
    "bq": P(None, "model", None),
    "bk": P(None, "model", None),
    "bv": P(None, "model", None),
    "b_up": P(None, "model"),
    "b_down": P(None, None),
    "bo": P(None, None),
    "scale": P(),
    "bias": P(),
    "embed": P("model", None),
    "lm_head": P(None, "model"),
    "pos_embed": P(None, None),
}
_SMALL = ("scale", "bias", "b_down", "bo", "pos_embed")  # what the rule replicates


def _name(path) -> str:
    return str(path[-1].key)


@pytest.mark.parametrize("mesh_spec", ["data=1,model=8", "data=2,model=4"])
@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_weight_shardings_follow_rule_and_split_bytes(family, mesh_spec):
    mesh = parse_mesh(mesh_spec)
    parts = mesh.shape["model"]
    model = shard_model(_target(family), mesh)
    leaves = jax.tree_util.tree_leaves_with_path(model.params)
    assert {_name(p) for p, _ in leaves} >= {"wq", "embed", "w_up", "w_down"}
    total = replicated = 0
    for path, leaf in leaves:
        spec = _EXPECTED_SPECS[_name(path)]
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), (path, leaf.sharding)
        total += leaf.nbytes
        if all(axis is None for axis in spec):
            assert _name(path) in _SMALL, path
            replicated += leaf.nbytes
    held = per_device_bytes(model.params)
    assert len(held) == 8
    for device, nbytes in held.items():
        assert nbytes == (total - replicated) // parts + replicated, device
        assert nbytes <= total / parts + replicated

    copies = per_device_bytes(shard_model(_target(family), mesh, "replicated").params)
    assert set(copies.values()) == {total}


def test_kv_cache_is_pinned_inside_jit():
    mesh = parse_mesh("data=2,model=4")
    for rule, heads_axis in (("tensor", "model"), ("replicated", None)):
        model = shard_model(_target("llama"), mesh, rule)
        cache = jax.jit(lambda m: m.init_cache(BATCH, 16))(model)
        kv = NamedSharding(mesh, P(None, "data", None, heads_axis, None))
        assert cache.k.sharding.is_equivalent_to(kv, 5) and cache.v.sharding.is_equivalent_to(kv, 5), rule
        assert cache.lengths.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 1)
        assert cache.k.addressable_shards[0].data.shape == (
            2,
            BATCH // 2,
            16,
            8 // (4 if heads_axis else 1),
            4,
        )


# ------------------------------------------------------------------------------ checkpoints


def test_sharded_restore_reads_only_each_devices_shards(tmp_path: Path):
    target = _target("qwen2")
    save_model(tmp_path / "m", target)
    mesh = parse_mesh("data=2,model=4")
    model = load_model(tmp_path / "m", mesh=mesh)
    assert model.sharding == ModelSharding.create(mesh, "tensor")
    assert not isinstance(model.params["layers"], tuple), "a mesh loads the stacked layout"
    specs = ModelSharding.create(mesh, "tensor").param_specs(model.config)
    split = 0
    for (path, leaf), spec, original in zip(jax.tree_util.tree_leaves_with_path(model.params),
                                            jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)),
                                            jax.tree.leaves(target.params)):
        want = NamedSharding(mesh, spec)
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), path
        shard_shape = want.shard_shape(leaf.shape)
        assert [s.data.shape for s in leaf.addressable_shards] == [shard_shape] * 8, path
        split += shard_shape != leaf.shape
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(original))
    assert split >= 10

    replicated = load_model(tmp_path / "m", mesh=mesh, rule="replicated", layout="unstacked")
    assert isinstance(replicated.params["layers"], tuple) and replicated.sharding.name == "replicated"
    assert all(len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(replicated.params))
    with pytest.raises(ValueError, match="unstacked.*layout='stacked'"):
        load_model(tmp_path / "m", mesh=mesh, layout="unstacked")
    with pytest.raises(ValueError, match="not both"):
        load_model(tmp_path / "m", mesh=mesh, sharding=NamedSharding(mesh, P()))
    small = tiny_config()  # 4 heads, 2 kv heads
    save_model(tmp_path / "small", Model(_random_params(small), small))
    with pytest.raises(ValueError, match="'model' has size 8, which does not divide num_heads=4"):
        load_model(tmp_path / "small", mesh=make_mesh(data=1, model=8))


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "overrides,mesh_spec,message",
    [
        (
            dict(num_heads=4, num_kv_heads=2),
            "data=1,model=8",
            r"'model' has size 8, which does not divide num_heads=4",
        ),
        (dict(num_heads=8, num_kv_heads=2), "data=2,model=4", r"does not divide num_kv_heads=2"),
        (dict(num_heads=8, num_kv_heads=8, intermediate_size=36), "data=1,model=8", r"intermediate_size=36"),
    ],
)
def test_mesh_not_dividing_the_model_is_a_clear_error(overrides, mesh_spec, message):
    config = tiny_config(hidden=32, **{"head_dim": 4, **overrides})
    with pytest.raises(ValueError, match=message) as info:  # checked before any weight is touched
        shard_model(Model(abstract_params(config), config), parse_mesh(mesh_spec))
    assert "rule='replicated'" in str(info.value) and "use a 'model' size" in str(info.value)


@pytest.mark.parametrize("family,vocab", [("gpt2", 50257), ("qwen2", 61), ("llama", 61)])
def test_a_vocabulary_the_mesh_does_not_divide_is_padded_exactly(family, vocab, tmp_path):
    """GPT-2's prime 50257 (and an untied / tied 61) on model=4: the embedding and head are padded
    to a multiple of 4 and split; logits, greedy AR and greedy HSD are the one-device model's."""
    config = from_hf_dict({**FAMILIES[family], "vocab_size": vocab})
    target = Model(_random_params(config, seed=1), config)
    mesh = parse_mesh("data=2,model=4")
    sharded = shard_model(target, mesh)
    padded = -(-vocab // 4) * 4
    assert sharded.params["embed"].shape == (padded, config.hidden_size)
    assert [s.data.shape[0] for s in sharded.params["embed"].addressable_shards] == [padded // 4] * 8
    if "lm_head" in sharded.params:
        assert sharded.params["lm_head"].shape == (config.hidden_size, padded)
    assert sharded.num_params == target.num_params and sharded.vocab_size == vocab

    rng = np.random.default_rng(0)
    prompts = rng.integers(0, vocab, (BATCH, 8), dtype=np.int32)
    lengths = rng.integers(2, 9, (BATCH,), dtype=np.int32)
    step = lambda m, t: m.step(t, m.init_cache(BATCH, 16))[0]
    want_logits = np.asarray(_compile(step, target, prompts)[1](target, prompts))
    got_logits = np.asarray(_compile(step, sharded, shard_batch(mesh, prompts)[0])[1](
        sharded, shard_batch(mesh, prompts)[0]))
    assert got_logits.shape == want_logits.shape == (BATCH, 8, vocab)
    # row-parallel all-reduces sum in another order: float32 round-off only
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-4)

    key = jax.random.PRNGKey(0)
    hierarchy = Hierarchy([NGramDrafter(2, vocab), layer_prefix(target, 1), target], (2, 2))
    ar_want, hsd_want = (np.asarray(x) for x in _compile(_both, hierarchy, prompts, lengths, key)[1](
        hierarchy, prompts, lengths, key))
    np.testing.assert_array_equal(hsd_want, ar_want)
    assert len(np.unique(ar_want)) > 10
    on_mesh = shard_hierarchy(hierarchy, mesh, ("replicated", "tensor", "tensor"))
    p, n = shard_batch(mesh, prompts, lengths)
    ar_got, hsd_got = _compile(_both, on_mesh, p, n, key)[1](on_mesh, p, n, key)
    np.testing.assert_array_equal(np.asarray(ar_got), ar_want)
    np.testing.assert_array_equal(np.asarray(hsd_got), ar_want)

    save_model(tmp_path / "m", target)
    loaded = load_model(tmp_path / "m", mesh=mesh)
    assert loaded.params["embed"].shape == (padded, config.hidden_size)
    np.testing.assert_array_equal(np.asarray(loaded.params["embed"])[:vocab],
                                  np.asarray(target.params["embed"]))
    assert not np.asarray(loaded.params["embed"])[vocab:].any()


def test_vocabulary_can_stay_whole():
    config = tiny_config(hidden=32, vocab=62, num_heads=8, num_kv_heads=8, head_dim=4)
    model = shard_model(Model(_random_params(config), config), parse_mesh("data=2,model=4"),
                        {**RULES["tensor"], "vocab": None})
    assert model.params["embed"].sharding.is_fully_replicated
    assert not model.params["layers"]["wq"].sharding.is_fully_replicated


def test_batch_not_divisible_by_data_is_a_clear_error():
    mesh = parse_mesh("data=4,model=2")
    prompts, lengths = np.ones((6, 4), np.int32), np.full(6, 4, np.int32)
    with pytest.raises(
        ValueError, match=r"'data' has size 4, which does not divide the batch of 6 rows.*8 rows"
    ):
        shard_batch(mesh, prompts, lengths)
    model = shard_model(_target("llama"), mesh)
    with pytest.raises(ValueError, match="does not divide the batch of 6 rows"):  # the cache, at trace time
        ar_generate(model, prompts, lengths, jax.random.PRNGKey(0), max_new_tokens=2)


def test_bad_meshes_and_rules():
    with pytest.raises(ValueError, match="exactly the axes"):
        shard_model(_target("llama"), Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("x", "y")))
    with pytest.raises(ValueError, match="unknown sharding rule 'fsdp'"):
        shard_model(_target("llama"), parse_mesh("data=8"), "fsdp")
    with pytest.raises(ValueError, match="replicated over 'data'"):
        shard_model(_target("llama"), parse_mesh("data=8"), {"heads": "data"})
    with pytest.raises(ValueError, match="one per model"):
        shard_hierarchy(_hierarchy(_target("llama")), parse_mesh("data=8"), ("tensor", "tensor"))


# --------------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("text,shape", [("data=2,model=4", (2, 4)), ("model=8", (1, 8)), (" data=8 ", (8, 1)),
                                        ("data=-1,model=2", (4, 2)), ("model=-1", (1, 8))])
def test_parse_mesh(text, shape):
    mesh = parse_mesh(text)
    assert mesh.axis_names == ("data", "model") and (mesh.shape["data"], mesh.shape["model"]) == shape
    assert mesh.devices.size == 8


@pytest.mark.parametrize("text,message", [
    ("data=3,model=4", r"needs 12 devices but 8 are available.*'data=2,model=4'"),
    ("tensor=2", r"unknown axis 'tensor'; the axes are data and model"),
    ("data2", r"expected comma-separated AXIS=SIZE"),
    ("data=two", r"size of 'data' must be an integer"),
    ("data=2,data=4", r"'data' is given twice"),
    ("model=0", r"must be >= 1"),
    ("data=-1,model=-1", r"at most one axis may be -1"),
    ("data=-1,model=3", r"8 devices do not split into groups of 3"),
])
def test_parse_mesh_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_mesh(text)


def test_mesh_argument(capsys):
    parser = argparse.ArgumentParser(prog="hsd-jax")
    add_mesh_argument(parser)
    assert parser.parse_args([]).mesh is None
    assert parse_mesh_spec(parser.parse_args(["--mesh", "data=2,model=4"]).mesh) == {"data": 2, "model": 4}
    with pytest.raises(SystemExit):
        parser.parse_args(["--mesh", "tensor=2"])
    assert "unknown axis 'tensor'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- distributed


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
    for name in (
        "JAX_COORDINATOR_ADDRESS",
        "SLURM_JOB_ID",
        "OMPI_MCA_orte_hnp_uri",
        "KUBERNETES_SERVICE_HOST",
        "TPU_WORKER_HOSTNAMES",
    ):
        monkeypatch.delenv(name, raising=False)
    assert distributed.detected_cluster() is None
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1) is False
    assert not jax.distributed.is_initialized() and jax.process_count() == 1


def test_initialize_auto_detects_launchers(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(distributed, "detected_cluster", lambda: ("SlurmCluster", 1))
    assert distributed.initialize() is False and not calls  # a one-process job: nothing to join
    monkeypatch.setattr(distributed, "detected_cluster", lambda: ("GceTpuCluster", 4))
    assert distributed.initialize() is True and calls == [((None, None, None, None), {})]
    assert distributed.initialize("10.0.0.1:1234", 2, 1) is True
    assert calls[-1] == (("10.0.0.1:1234", 2, 1, None), {})
    monkeypatch.undo()
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert distributed.detected_cluster() == ("JAX_COORDINATOR_ADDRESS", None)


def test_global_batch_single_process():
    mesh = parse_mesh("data=4,model=2")
    prompts, lengths = _prompts()
    tokens, lens = distributed.global_batch(mesh, prompts, lengths)
    assert tokens.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
    np.testing.assert_array_equal(np.asarray(tokens), prompts)
    np.testing.assert_array_equal(np.asarray(lens), lengths)
    with pytest.raises(ValueError, match="4 slices of mesh axis 'data'.*6 rows"):
        distributed.global_batch(mesh, prompts[:6])


_WORKER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from hsd_jax import distributed
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
assert distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
import numpy as np
from jax.experimental import multihost_utils
from hsd_jax.decoding.ar import ar_generate
from hsd_jax.parallel.sharding import parse_mesh, shard_model
from test_sharding import NEW, _prompts, _target
mesh = parse_mesh("data=2,model=4")  # data spans the two processes, model the 4 devices of each
model = shard_model(_target("llama"), mesh)
prompts, lengths = _prompts()
rows = slice(4 * pid, 4 * pid + 4)
p, n = distributed.global_batch(mesh, prompts[rows], lengths[rows])
run = jax.jit(lambda m, p, n, k: ar_generate(m, p, n, k, max_new_tokens=NEW).tokens)
tokens = multihost_utils.process_allgather(run(model, p, n, jax.random.PRNGKey(0)), tiled=True)
json.dump({"processes": jax.process_count(), "devices": jax.device_count(), "global_rows": p.shape[0],
           "tokens": np.asarray(tokens).tolist()}, open(out, "w"))
jax.distributed.shutdown()
"""


def test_two_processes_tensor_and_data_parallel(tmp_path: Path):
    """Two real processes with 4 CPU devices each join through `distributed.initialize`, build
    the global batch from their own rows and generate the one-device tokens."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent
    env = {**__import__("os").environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": f"{root.parent}:{root}"}
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(pid), str(port), str(tmp_path / f"{pid}.json")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    reference = _reference("llama")
    for pid in range(2):
        result = json.loads((tmp_path / f"{pid}.json").read_text())
        assert (result["processes"], result["devices"], result["global_rows"]) == (2, 8, BATCH)
        np.testing.assert_array_equal(np.asarray(result["tokens"]), reference)
