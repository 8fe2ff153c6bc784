"""One config for every supported decoder family (Llama/Mistral/Qwen2/SmolLM2, GPT-2, GPT-NeoX).

The decoder in `model.py` reads only this dataclass; `from_hf_dict` maps a Hugging Face
`config.json` onto it and is the single place that knows about HF field names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox")
CONFIG_FILE = "hsd_config.json"
# sha256 of the config the weights were written with (`ModelConfig.fingerprint`), saved beside it:
# an edit of hsd_config.json after conversion (rope_theta, the activation, ...) is refused on load.
CONFIG_HASH_FILE = "hsd_config.sha256"


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's `model_type` is not one the decoder implements."""


class ConfigMismatchError(ValueError):
    """hsd_config.json is not the config the weights beside it were written with."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm: Literal["rms", "layer"] = "rms"
    norm_eps: float = 1e-6
    positions: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # 0 means the whole head
    rope_scaling: tuple[tuple[str, float], ...] = ()  # llama3 scaling, as sorted (key, value) pairs
    mlp: Literal["gated", "plain"] = "gated"
    activation: Literal["silu", "gelu", "gelu_new"] = "silu"
    parallel_residual: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int = 0  # 0: full attention
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # A distilled draft's head may cover only `head_vocab_size` frequent token ids (the `head_ids`
    # weight); every other logit is the float32 minimum, so the draft gives them q = 0, which
    # speculative verification handles losslessly. 0: a full-vocabulary head.
    head_vocab_size: int = 0
    # A draft may share the (frozen) input embedding of another model directory, given relative
    # to its own, instead of storing a copy; `embedding_sha256` pins the exact table.
    embedding_source: str = ""
    embedding_sha256: str = ""

    def __post_init__(self):
        if not (0 <= self.rotary_dim and 2 * ((self.rotary_dims + 1) // 2) <= self.head_dim):
            raise ValueError(f"rotary_dim={self.rotary_dim} does not fit head_dim={self.head_dim} (it "
                             f"rotates 2 * ceil(rotary_dim / 2) dimensions of each head)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_vocab_size and (
            self.tie_word_embeddings or not 0 < self.head_vocab_size <= self.vocab_size
        ):
            raise ValueError(f"head_vocab_size={self.head_vocab_size} needs an untied head and must be in "
                             f"(0, vocab_size={self.vocab_size}]")

    @property
    def rotary_dims(self) -> int:
        """The rotary width as configured (transformers' `int(head_dim * partial_rotary_factor)`).
        An odd width d rotates 2 * ceil(d / 2) dimensions, as transformers does (`llama3_inv_freq`)."""
        return self.rotary_dim or self.head_dim

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def fingerprint(self) -> str:
        """sha256 of the config's content (key order and whitespace do not matter)."""
        canonical = json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        raw = json.loads(text)
        raw["rope_scaling"] = tuple(tuple(kv) for kv in raw.get("rope_scaling", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)} in hsd-jax config")
        return cls(**raw)

    def save(self, directory: str | Path) -> None:
        """Write hsd_config.json and the hash that pins it to the weights written beside it."""
        Path(directory, CONFIG_FILE).write_text(self.to_json())
        Path(directory, CONFIG_HASH_FILE).write_text(self.fingerprint() + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> ModelConfig:
        path = Path(directory, CONFIG_FILE)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: {directory} is not an hsd-jax model directory "
                "(convert a Hugging Face model first with `hsd-jax convert SOURCE OUT_DIR`)"
            )
        config = cls.from_json(path.read_text())
        pinned = Path(directory, CONFIG_HASH_FILE)
        if pinned.is_file() and pinned.read_text().strip() != config.fingerprint():
            raise ConfigMismatchError(
                f"{path} was edited after the weights in {directory} were written ({CONFIG_HASH_FILE} holds "
                "the sha256 of the config they were written with): the weights would run under another "
                "architecture. Restore the original hsd_config.json, or re-convert the model with "
                "`hsd-jax convert SOURCE OUT_DIR --overwrite`")
        return config


def _first_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """transformers v5 writes `rope_parameters`; v4 wrote `rope_theta` and `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    for key, value in legacy.items():
        params.setdefault(key, value)
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    return params


def _llama3_scaling(rope: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    rope_type = rope.get("rope_type", "default")
    if rope_type in (None, "default"):
        return ()
    if rope_type != "llama3":
        raise UnsupportedArchitectureError(
            f"rope_type={rope_type!r} is not supported (supported: default, llama3)"
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return tuple(sorted((k, float(rope[k])) for k in keys))


def from_hf_dict(hf: dict[str, Any]) -> ModelConfig:
    """Map a Hugging Face config dict onto ModelConfig, or raise a ValueError naming the unknown
    model_type, the missing field or the value of the wrong type."""
    if not isinstance(hf, dict):
        raise ValueError(f"a Hugging Face config must be a JSON object, got {type(hf).__name__}")
    try:
        return _from_hf_dict(hf)
    except KeyError as e:
        raise ValueError(f"config.json has no {e.args[0]!r} field, which a {hf.get('model_type')} model "
                         "needs; use the config.json the checkpoint was saved with") from None
    except (TypeError, ZeroDivisionError, AttributeError) as e:
        raise ValueError(f"config.json has a missing or wrongly typed value ({type(e).__name__}: {e}); "
                         "use the config.json the checkpoint was saved with") from None


def _from_hf_dict(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"unknown architecture model_type={model_type!r}; hsd-jax supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Convert a model of one of these families."
        )
    ids = dict(bos_token_id=_first_id(hf.get("bos_token_id")), eos_token_id=_first_id(hf.get("eos_token_id")))
    if model_type == "gpt2":
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
            raise UnsupportedArchitectureError(
                "GPT-2 attention without plain 1/sqrt(head_dim) scaling (scale_attn_weights=False or "
                "scale_attn_by_inverse_layer_idx=True) is not supported")
        hidden = hf["n_embd"]
        return ModelConfig(
            model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hidden,
            intermediate_size=hf.get("n_inner") or 4 * hidden, num_layers=hf["n_layer"],
            num_heads=hf["n_head"], num_kv_heads=hf["n_head"], head_dim=hidden // hf["n_head"],
            max_position_embeddings=hf["n_positions"], norm="layer",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), positions="learned", mlp="plain",
            activation=_activation(hf.get("activation_function", "gelu_new")), qkv_bias=True,
            out_bias=True, mlp_bias=True, tie_word_embeddings=hf.get("tie_word_embeddings", True),
            **ids,
        )
    rope = _rope_parameters(hf)
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    if model_type == "gpt_neox":
        partial = rope.get("partial_rotary_factor", hf.get("rotary_pct", 1.0))
        bias = hf.get("attention_bias", True)
        return ModelConfig(
            model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=num_heads, num_kv_heads=num_heads, head_dim=head_dim,
            max_position_embeddings=hf["max_position_embeddings"], norm="layer",
            norm_eps=hf.get("layer_norm_eps", 1e-5), rope_theta=float(rope["rope_theta"]),
            rotary_dim=int(head_dim * partial), rope_scaling=_llama3_scaling(rope), mlp="plain",
            activation=_activation(hf.get("hidden_act", "gelu")),
            parallel_residual=hf.get("use_parallel_residual", True), qkv_bias=bias, out_bias=bias,
            mlp_bias=True, tie_word_embeddings=hf.get("tie_word_embeddings", False), **ids,
        )
    # Llama family: llama (incl. SmolLM2, Llama 2/3), mistral, qwen2.
    sliding = _sliding_window(model_type, hf)
    qkv_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
    return ModelConfig(
        model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim, max_position_embeddings=hf["max_position_embeddings"], norm="rms",
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope["rope_theta"]),
        rope_scaling=_llama3_scaling(rope), mlp="gated",
        activation=_activation(hf.get("hidden_act", "silu")), qkv_bias=qkv_bias,
        out_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=hf.get("tie_word_embeddings", False), sliding_window=sliding, **ids,
    )


def _sliding_window(model_type: str, hf: dict[str, Any]) -> int:
    """The window of every layer (0: none). Qwen2 slides only from layer `max_window_layers` on."""
    window = int(hf.get("sliding_window") or 0)
    if model_type == "mistral":
        return window
    if not window or not hf.get("use_sliding_window"):
        return 0
    num_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 0) else "full_attention"
        for i in range(num_layers)]
    if all(t == "full_attention" for t in layer_types):
        return 0
    if all(t == "sliding_attention" for t in layer_types):
        return window
    raise UnsupportedArchitectureError(
        "models mixing sliding-window and full-attention layers are not supported")


def _activation(name: str) -> str:
    aliases = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_new",
               "gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new"}
    if name not in aliases:
        raise UnsupportedArchitectureError(f"activation {name!r} is not supported")
    return aliases[name]


def llama3_inv_freq(config: ModelConfig) -> list[float]:
    """Rotary inverse frequencies, with Llama 3.1 frequency scaling when configured."""
    dims = config.rotary_dims  # transformers: arange(0, dims, 2) / dims, so an odd width rounds up
    inv_freq = [1.0 / config.rope_theta ** (2 * i / dims) for i in range((dims + 1) // 2)]
    if not config.rope_scaling:
        return inv_freq
    s = dict(config.rope_scaling)
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    scaled = []
    for f in inv_freq:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            scaled.append(f)
        elif wavelen > low_wavelen:
            scaled.append(f / s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            scaled.append((1 - smooth) * f / s["factor"] + smooth * f)
    return scaled
