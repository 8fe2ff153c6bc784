"""Write an hsd-jax model directory back out as a Hugging Face (transformers, torch) model.

The output directory holds `config.json`, `model.safetensors` (torch `nn.Linear` layout, the
names transformers expects) and the tokenizer / `generation_config.json` files of the source.

Nothing here re-states the weight layout: `convert.py`'s rules map each HF tensor onto our
leaves through reshapes, transposes and slices only, so running them on an array of *element
indices* (`np.arange(n).reshape(hf_shape)`) tells, for every element of every leaf, where it
sits in the HF tensor; the export scatters the leaves back through those indices. The HF names
and shapes come from the transformers class itself (instantiated on the meta device), and every
element of every HF tensor must be written exactly once, so a rule that does not fit fails
loudly instead of leaving a tensor half-filled. Likewise the config: `hf_config_dict` is the
inverse of `config.from_hf_dict`, and an export is refused when reading the written config back
with `from_hf_dict` would not give the same `ModelConfig` (e.g. a llama with a sliding window,
which no transformers llama config can express).

A vocabulary-subset draft head (`head_vocab_size` > 0: its logits cover the ids in `head_ids`,
all other logits are the float32 minimum) is written as a full-vocabulary `lm_head` whose rows
for the missing ids are zero: transformers' heads have no bias, so those logits are 0 rather
than -inf. Greedy decoding agrees with hsd-jax whenever the best in-subset logit is positive
(it is the argmax in both); when every in-subset logit is negative a missing id (logit 0) wins
in transformers. Sampling from the exported head gives the missing ids a little mass.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import jax
import numpy as np

from hsd_jax.io.checkpoint import copy_tokenizer_files, corrupt_error, load_model
from hsd_jax.io.convert import get_leaf, plan
from hsd_jax.io.files import atomic_directory, check_output_dir
from hsd_jax.io.tensors import TensorSource
from hsd_jax.models import Params, stack_layers
from hsd_jax.models.config import CONFIG_FILE, ModelConfig, UnsupportedArchitectureError, from_hf_dict

EXPORT_DTYPES = ("float32", "bfloat16")
WEIGHTS_FILE = "model.safetensors"
# ModelConfig fields that describe how hsd-jax stores a model, not what it computes.
_STORAGE_DEFAULTS = {"head_vocab_size": 0, "embedding_source": "", "embedding_sha256": ""}


# ----------------------------------------------------------------------------- config


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """The inverse of `config.from_hf_dict`: a Hugging Face config dict for `config`.

    Features a family's transformers config cannot express are dropped here and caught by
    `check_expressible`, which reads the dict back."""
    # Our activation names (silu, gelu, gelu_new) are also transformers' own (ACT2FN).
    builders = {"gpt2": _gpt2_dict, "gpt_neox": _gpt_neox_dict}
    out = builders.get(config.model_type, _llama_dict)(config)
    return {"model_type": config.model_type, **out, "vocab_size": config.vocab_size,
            "tie_word_embeddings": config.tie_word_embeddings,
            "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}


def _rope_dict(config: ModelConfig) -> dict[str, Any]:
    """transformers v5 `rope_parameters` (from_hf_dict also reads them)."""
    rope: dict[str, Any] = {"rope_type": "llama3" if config.rope_scaling else "default",
                            "rope_theta": config.rope_theta}
    for key, value in config.rope_scaling:
        rope[key] = int(value) if key == "original_max_position_embeddings" else value
    return rope


def _llama_dict(c: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = dict(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps,
        hidden_act=c.activation, rope_parameters=_rope_dict(c))
    if c.model_type == "llama":
        out |= dict(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    elif c.model_type == "mistral":
        out |= dict(sliding_window=c.sliding_window or None)
    elif c.model_type == "qwen2":  # max_window_layers=0: every layer slides, as in our decoder
        out |= dict(use_sliding_window=bool(c.sliding_window), sliding_window=c.sliding_window or None,
                    max_window_layers=0)
    return out


def _gpt2_dict(c: ModelConfig) -> dict[str, Any]:
    return dict(n_embd=c.hidden_size, n_inner=c.intermediate_size, n_layer=c.num_layers, n_head=c.num_heads,
                n_positions=c.max_position_embeddings, layer_norm_epsilon=c.norm_eps,
                activation_function=c.activation)


def _gpt_neox_dict(c: ModelConfig) -> dict[str, Any]:
    rope = _rope_dict(c) | {"partial_rotary_factor": c.rotary_dims / c.head_dim}
    return dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                max_position_embeddings=c.max_position_embeddings, layer_norm_eps=c.norm_eps,
                hidden_act=c.activation, rope_parameters=rope,
                use_parallel_residual=c.parallel_residual, attention_bias=c.qkv_bias)


def computed_config(config: ModelConfig) -> ModelConfig:
    """`config` without the storage-only fields (a subset head is exported full-vocabulary)."""
    return dataclasses.replace(config, **_STORAGE_DEFAULTS)


def check_expressible(config: ModelConfig, hf: dict[str, Any]) -> None:
    """Raise naming every field that `hf` (read back by `from_hf_dict`) does not reproduce."""
    want = computed_config(config)
    try:
        got = from_hf_dict(hf)
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"cannot export a {config.model_type} model: {e}") from e
    diffs = [f"{f.name}={getattr(want, f.name)!r} (a {config.model_type} config.json gives "
             f"{getattr(got, f.name)!r})" for f in dataclasses.fields(ModelConfig)
             if getattr(want, f.name) != getattr(got, f.name)]
    if diffs:
        raise UnsupportedArchitectureError(
            f"cannot export this model as a transformers {config.model_type} model: "
            f"{'; '.join(diffs)}")


def _source_token_ids(config: ModelConfig, source_hf: dict[str, Any]) -> dict[str, Any]:
    """pad_token_id, and the source's full bos/eos values (e.g. a list of eos ids) where they
    agree with `config`, from the config.json that `convert` kept next to the weights."""
    out = {}
    for key in ("bos_token_id", "eos_token_id"):
        value = source_hf.get(key)
        first = value[0] if isinstance(value, list) and value else value
        if value is not None and first == getattr(config, key):
            out[key] = value
    pad = source_hf.get("pad_token_id")
    if isinstance(pad, int) and 0 <= pad < config.vocab_size:
        out["pad_token_id"] = pad
    return out


def transformers_config(config: ModelConfig, dtype: str = "float32", source_hf: dict[str, Any] | None = None):
    """The transformers `PretrainedConfig` of a causal LM computing what `config` computes."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    hf = hf_config_dict(config) | _source_token_ids(config, source_hf or {})
    check_expressible(config, hf)
    hf_config = CONFIG_MAPPING[config.model_type](**{k: v for k, v in hf.items() if k != "model_type"})
    hf_config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    hf_config.dtype = dtype
    check_expressible(config, hf_config.to_dict())  # what transformers kept of it
    return hf_config


# ----------------------------------------------------------------------------- weights


def hf_tensor_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor transformers saves for `hf_config`, in its order; a tied
    head is left out (it shares the embedding's storage)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    shapes, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:  # tied weights are one Parameter under two names
            seen.add(id(tensor))
            shapes[name] = tuple(tensor.shape)
    return shapes


class _IndexSource(TensorSource):
    """Each HF tensor as the flat indices of its own elements: a convert rule applied to it
    tells where each element of our leaf comes from."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], location: str):
        super().__init__(Path(location))
        self.shapes = shapes

    def names(self) -> Collection[str]:
        return self.shapes.keys()

    def load(self, name: str) -> np.ndarray:
        size = int(np.prod(self.shapes[name]))
        return np.arange(size, dtype=np.int32 if size < 2**31 else np.int64).reshape(self.shapes[name])


def _full_vocab_head(params: Params, config: ModelConfig) -> Params:
    """A subset head [D, K] with `head_ids` as a full [D, V] head, zero outside the subset."""
    if not config.head_vocab_size:
        return params
    subset, ids = np.asarray(params["lm_head"], np.float32), np.asarray(params["head_ids"])
    head = np.zeros((subset.shape[0], config.vocab_size), np.float32)
    head[:, ids] = subset
    return {**{k: v for k, v in params.items() if k != "head_ids"}, "lm_head": head}


def hf_state_dict(params: Params, config: ModelConfig, hf_config) -> dict[str, np.ndarray]:
    """Our (stacked or unstacked) params as transformers float32 tensors, by HF name."""
    full = computed_config(config)
    params = jax.tree.map(np.asarray, _full_vocab_head(stack_layers(params, config), config))
    shapes = hf_tensor_shapes(hf_config)
    source = _IndexSource(shapes, f"transformers' {hf_config.architectures[0]}")
    try:
        entries = plan(full, source)
    except ValueError as e:  # a weight of ours with no place in the transformers model
        raise UnsupportedArchitectureError(
            f"cannot export this model: {source.location} has no place for one of its weights ({e})") from e
    out = {name: np.zeros(int(np.prod(shape)), np.float32) for name, shape in shapes.items()}
    written = {name: np.zeros(len(flat), bool) for name, flat in out.items()}
    indices = functools.lru_cache(maxsize=1)(source.load)
    for entry in entries:
        leaf = get_leaf(params, entry.dest)
        value = leaf[entry.layer] if entry.layer is not None else leaf
        where = entry.transform(indices(entry.source))
        if where.shape != value.shape or written[entry.source][where].any():
            raise ValueError(f"internal error: {'.'.join(entry.dest)} does not map one-to-one onto "
                             f"{entry.source} {shapes[entry.source]}")
        out[entry.source][where] = value
        written[entry.source][where] = True
    missing = [name for name, done in written.items() if not done.all()]
    if missing:
        raise UnsupportedArchitectureError(
            f"cannot export this model: {source.location} also expects {', '.join(missing)}, "
            "which the hsd-jax model has no weights for")
    return {name: flat.reshape(shapes[name]) for name, flat in out.items()}


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    save_file({name: torch.from_numpy(value).to(torch_dtype).contiguous() for name, value in tensors.items()},
              str(path), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- entry point


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ValueError(f"exporting to transformers needs torch and transformers ({e}); "
                         "pip install 'hsd-jax[test]'") from e


def export_hf(model_dir: str | Path, out_dir: str | Path, *, dtype: str = "float32",
              overwrite: bool = False) -> Path:
    """Write the hsd-jax model in MODEL_DIR as a Hugging Face model directory OUT_DIR.

    OUT_DIR gets `config.json`, `model.safetensors` (in `dtype`: float32 or bfloat16) and the
    tokenizer and `generation_config.json` files of MODEL_DIR; it is written atomically and an
    existing non-empty OUT_DIR is refused unless `overwrite`. Raises `UnsupportedArchitectureError`
    (a ValueError) naming what transformers cannot express. A vocabulary-subset head is exported
    with zero rows outside the subset: see the module docstring for what that changes.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(EXPORT_DTYPES)}")
    model_dir = Path(model_dir)
    check_output_dir(out_dir, overwrite)
    if not (model_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{model_dir} is not an hsd-jax model directory (no {CONFIG_FILE}); "
                                "convert a model first with `hsd-jax convert SOURCE OUT_DIR`")
    _require_torch()
    try:
        config = ModelConfig.load(model_dir)
    except (OSError, ValueError, TypeError) as e:
        raise corrupt_error(model_dir, f"cannot read {CONFIG_FILE}: {e}") from e
    source_json = model_dir / "config.json"
    source_hf = json.loads(source_json.read_text()) if source_json.is_file() else {}
    hf_config = transformers_config(config, dtype, source_hf)  # refuses before any weight is read
    model = load_model(model_dir, dtype=np.float32, layout="stacked")
    tensors = hf_state_dict(model.params, model.config, hf_config)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        _save_safetensors(tensors, tmp / WEIGHTS_FILE, dtype)
        hf_config.to_json_file(str(tmp / "config.json"))
        copy_tokenizer_files(model_dir, tmp)
    return Path(out_dir)
