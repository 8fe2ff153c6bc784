"""Conversion of tiny random Hugging Face models, checked against torch, plus failure modes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from families import tiny_config
from reference import compare_with_torch

import hsd_jax.models.decoder as decoder
from hsd_jax.io import convert as convert_mod
from hsd_jax.io.checkpoint import PARAMS_DIR, load_model, save_model
from hsd_jax.io.convert import convert
from hsd_jax.models import Model, abstract_params
from hsd_jax.models.config import CONFIG_FILE, UnsupportedArchitectureError

VOCAB = 96
TOL = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=64)
_NEOX = dict(_LLAMA_LIKE, rotary_pct=0.5)
CASES: dict[str, tuple[type, dict]] = {
    "llama-gqa-llama3-untied": (
        transformers.LlamaConfig,
        dict(_LLAMA_LIKE, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False),
    ),
    "llama-tied-biases": (
        transformers.LlamaConfig,
        dict(_LLAMA_LIKE, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    ),
    "mistral-sliding": (
        transformers.MistralConfig,
        dict(_LLAMA_LIKE, num_key_value_heads=2, sliding_window=6),
    ),
    "qwen2": (transformers.Qwen2Config, dict(_LLAMA_LIKE, num_key_value_heads=2)),
    "gpt2": (
        transformers.GPT2Config,
        dict(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
        ),
    ),
    "gpt_neox-parallel": (transformers.GPTNeoXConfig, dict(_NEOX, use_parallel_residual=True)),
    "gpt_neox-sequential": (transformers.GPTNeoXConfig, dict(_NEOX, use_parallel_residual=False)),
}


def tiny_model(case: str, seed: int = 0) -> torch.nn.Module:
    """A random float32 model with weights large enough that every mistake shows in the logits."""
    config_cls, kwargs = CASES[case]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**kwargs), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:  # embeddings ~ N(0, 1); projections ~ N(0, 1/hidden)
                embedding = any(k in name for k in ("embed", "wte", "wpe"))
                p.normal_(0.0, 1.0 if embedding else 0.125)
            elif ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def _save(torch_model: torch.nn.Module, directory: Path, **kwargs) -> Path:
    torch_model.save_pretrained(directory, **kwargs)
    return directory


def _convert(source: Path, out: Path, **kwargs) -> Model:
    convert(source, out, progress=False, **kwargs)
    return load_model(out)


def _assert_same_params(a: Model, b: Model) -> None:
    assert a.config == b.config
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.params, b.params)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(case: str, tmp_path: Path):
    torch_model = tiny_model(case)
    model = _convert(_save(torch_model, tmp_path / "hf"), tmp_path / "out")
    assert model.config.model_type == torch_model.config.model_type
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, VOCAB, n)) for n in (5, 9, 7)]
    diff = compare_with_torch(model, torch_model, prompts, VOCAB)
    print(f"{case}: max abs logit diff {diff:.2e}")
    assert diff <= TOL


def test_rotary_angles_computed_in_the_graph_match_torch(tmp_path: Path, monkeypatch):
    """A model of more than `ROTARY_TABLE_POSITIONS` positions computes cos and sin in the graph
    instead of reading tables built at trace time: the same logits as torch (Llama 3 frequency
    scaling, GQA)."""
    monkeypatch.setattr(decoder, "ROTARY_TABLE_POSITIONS", 8)
    torch_model = tiny_model("llama-gqa-llama3-untied")
    model = _convert(_save(torch_model, tmp_path / "hf"), tmp_path / "out")
    positions = jnp.zeros((1, 2), jnp.int32)
    assert "cos" in str(jax.make_jaxpr(lambda p: decoder._rotary_cos_sin(model.config, p, 41))(positions))
    prompts = [list(np.random.default_rng(1).integers(0, VOCAB, n)) for n in (6, 3)]
    # a cache size no other test traces with, so no compiled step from the table path is reused
    assert compare_with_torch(model, torch_model, prompts, VOCAB, cache_size=41) <= TOL


@pytest.mark.parametrize("table_positions", [16384, 80, 8])
def test_a_positions_rotary_angles_do_not_depend_on_the_cache_size(monkeypatch, table_positions: int):
    """AR and HSD size their caches differently: a position's cos and sin must be the same bits
    whatever the cache size (64 or 100 positions), from the tables (16384), in the graph (8), and
    where the two cache sizes fall on either side of the bound (80)."""
    monkeypatch.setattr(decoder, "ROTARY_TABLE_POSITIONS", table_positions)
    config = tiny_config(max_position_embeddings=64)
    positions = jnp.arange(64, dtype=jnp.int32)[None]
    small, large = (jax.jit(lambda p, size=size: decoder._rotary_cos_sin(config, p, size))(positions)
                    for size in (64, 100))
    for a, b in zip(small, large):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_features_are_exercised(tmp_path: Path):
    """The cases above really cover GQA, llama3 scaling, sliding window, biases, partial rotary."""
    configs = {case: convert_mod.from_hf_dict(tiny_model(case).config.to_dict()) for case in CASES}
    assert configs["llama-gqa-llama3-untied"].num_kv_heads == 2
    assert configs["llama-gqa-llama3-untied"].rope_scaling
    assert not configs["llama-gqa-llama3-untied"].tie_word_embeddings
    assert configs["llama-tied-biases"].tie_word_embeddings and configs["llama-tied-biases"].mlp_bias
    assert configs["mistral-sliding"].sliding_window == 6
    assert configs["qwen2"].qkv_bias and not configs["qwen2"].out_bias
    assert configs["gpt_neox-parallel"].rotary_dims == 8 and configs["gpt_neox-parallel"].parallel_residual
    assert not configs["gpt_neox-sequential"].parallel_residual


def test_sharded_and_torch_bin_convert_identically(tmp_path: Path):
    torch_model = tiny_model("llama-gqa-llama3-untied")
    reference = _convert(_save(torch_model, tmp_path / "single"), tmp_path / "out-single")
    sharded = _save(torch_model, tmp_path / "sharded", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    _assert_same_params(reference, _convert(sharded, tmp_path / "out-sharded"))

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    torch.save(torch_model.state_dict(), bin_dir / "pytorch_model.bin")
    _assert_same_params(reference, _convert(bin_dir, tmp_path / "out-bin"))


def test_gpt2_without_transformer_prefix(tmp_path: Path):
    torch_model = tiny_model("gpt2")
    reference = _convert(_save(torch_model, tmp_path / "hf"), tmp_path / "out")
    base_dir = tmp_path / "base"
    torch_model.transformer.save_pretrained(base_dir)  # GPT2Model: names without `transformer.`
    _assert_same_params(reference, _convert(base_dir, tmp_path / "out-base"))


def test_bfloat16_and_dtype_on_load(tmp_path: Path):
    source = _save(tiny_model("qwen2"), tmp_path / "hf")
    f32 = _convert(source, tmp_path / "f32")
    convert(source, tmp_path / "bf16", progress=False, dtype="bfloat16")
    assert load_model(tmp_path / "bf16", dtype=jnp.bfloat16).dtype == jnp.bfloat16
    assert load_model(tmp_path / "bf16").dtype == jnp.bfloat16  # as stored, on every backend
    upcast = load_model(tmp_path / "bf16", dtype=jnp.float32)
    assert upcast.dtype == jnp.float32
    expected = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), f32.params)
    _assert_same_params(Model(expected, f32.config), upcast)
    with pytest.raises(ValueError, match="float16.*float32, bfloat16"):
        convert(source, tmp_path / "bad", dtype="float16")


def test_load_with_sharding(tmp_path: Path):
    model = _convert(_save(tiny_model("gpt2"), tmp_path / "hf"), tmp_path / "out")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    loaded = load_model(tmp_path / "out", sharding=sharding)
    assert all(leaf.sharding == sharding for leaf in jax.tree.leaves(loaded.params))
    tree = jax.tree.map(lambda _: sharding, abstract_params(model.config))  # the stored layout
    _assert_same_params(model, load_model(tmp_path / "out", sharding=tree))


def test_save_model_round_trip(tmp_path: Path):
    source = _save(tiny_model("mistral-sliding"), tmp_path / "hf")
    (source / "tokenizer_config.json").write_text("{}")
    model = _convert(source, tmp_path / "out")
    save_model(tmp_path / "copy", model, tokenizer_source_dir=source)
    assert (tmp_path / "copy" / "tokenizer_config.json").exists()
    _assert_same_params(model, load_model(tmp_path / "copy"))
    with pytest.raises(FileExistsError):
        save_model(tmp_path / "copy", model)
    save_model(tmp_path / "copy", model, overwrite=True)
    _assert_same_params(model, load_model(tmp_path / "copy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "hf", "out"]


def test_refuses_to_overwrite(tmp_path: Path):
    source = _save(tiny_model("gpt2"), tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert(source, out, progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    convert(source, out, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists()
    load_model(out)


def test_unknown_model_type(tmp_path: Path):
    source = tmp_path / "hf"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(UnsupportedArchitectureError, match="bert"):
        convert(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_tensor(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    source = _save(tiny_model("qwen2"), tmp_path / "hf")
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias.*model\.safetensors"):
        convert(source, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_shape_mismatch(tmp_path: Path):
    source = _save(tiny_model("gpt_neox-parallel"), tmp_path / "hf")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(ValueError, match=r"mlp\.dense_.*\.weight.*has shape.*implied by the config"):
        convert(source, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# Orbax / TensorStore leave asyncio callbacks behind when a read fails; they are harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["delete-metadata", "truncate-metadata", "truncate-weights",
                                    "delete-params", "delete-config", "garbage-config"])
def test_corrupt_checkpoint(tmp_path: Path, damage: str):
    out = tmp_path / "out"
    _convert(_save(tiny_model("gpt2"), tmp_path / "hf"), out)
    params = out / PARAMS_DIR
    if damage == "delete-metadata":
        (params / "_METADATA").unlink()
    elif damage.startswith("truncate"):
        data = params / ("d" if damage == "truncate-metadata" else "ocdbt.process_0/d")
        files = [f for f in data.iterdir() if f.is_file()]
        assert files
        for f in files:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    elif damage == "delete-params":
        shutil.rmtree(params)
    elif damage == "delete-config":
        (out / CONFIG_FILE).unlink()
    else:
        (out / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{out}.*re-convert"):
        load_model(out)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_conversion_leaves_nothing(tmp_path: Path, monkeypatch, error: type[BaseException]):
    source = _save(tiny_model("llama-tied-biases"), tmp_path / "hf")
    real_save = convert_mod.save_params

    def save_then_die(path, params):
        real_save(path, params)
        raise error("interrupted")

    monkeypatch.setattr(convert_mod, "save_params", save_then_die)
    with pytest.raises(error):
        convert(source, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
