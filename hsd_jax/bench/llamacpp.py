"""llama.cpp (`llama-cpp-python`, the optional `peers` extra) as a bench peer, on the GGUF our target
was converted from.

`llamacpp-ar` is llama.cpp's plain decoding; `llamacpp-lookup` its prompt-lookup speculative
decoding (`LlamaPromptLookupDecoding(num_pred_tokens=4)`). Both are timed as `methods.time_jax_method`
times ours:

- the same token ids: our tokenizer's chat template, fed to llama.cpp as ids (no BOS added), so
  both engines see the same input;
- exactly `max_new_tokens` new tokens (EOS does not stop it, as it does not stop ours);
- greedy at temperature 0; above it, plain temperature sampling (top-k, top-p, min-p, typical
  and penalties off), seeded before every prompt;
- `n_threads` (prompt and decode) = `os.cpu_count()`;
- each timed call starts from an empty KV cache (`Llama.reset`: llama-cpp-python would otherwise
  reuse the cached prefix the chat prompts share) and includes prompt processing, as ours
  includes prefill;
- one untimed warm-up call on the first prompt, then one timed call per prompt (in the bench,
  each prompt runs every method in turn); the bench takes the median of tokens/s over prompts.

llama.cpp's Q4_1 x Q8 arithmetic differs from our dequantized weights, so its greedy tokens need
not equal ours; the bench reports how many prompts agree on the first 16 tokens, as information.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gguf import GGUFReader

from hsd_jax.planning.timing import time_once

__all__ = [
    "LLAMACPP_METHODS",
    "PEERS_HINT",
    "gguf_weight_bytes",
    "llamacpp_prompt_timer",
    "prefix_match_fraction",
    "require_llama_cpp",
    "time_llamacpp_method",
]

LLAMACPP_METHODS = ("llamacpp-ar", "llamacpp-lookup")
PEERS_HINT = 'install it with `pip install -e ".[peers]"`, or run `make bench-peers`'
LOOKUP_TOKENS = 4


def require_llama_cpp():
    """The `llama_cpp` module, or a ValueError that says how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ValueError(f"the methods {', '.join(LLAMACPP_METHODS)} need llama-cpp-python, which is not "
                         f"installed; {PEERS_HINT}") from e
    return llama_cpp


def gguf_weight_bytes(path: str | Path) -> int:
    """Bytes of tensor data in a GGUF file: what llama.cpp reads per forward pass (a tied
    embedding is one tensor, read as the output head)."""
    return int(sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors))


def prefix_match_fraction(runs: Sequence[Sequence[int]], reference: Sequence[Sequence[int]],
                          length: int = 16) -> float:
    """The fraction of prompts whose first `length` tokens equal the reference's."""
    if len(runs) != len(reference):
        raise ValueError(f"{len(runs)} runs against {len(reference)} reference runs")
    if not runs:
        return float("nan")
    same = sum(list(a[:length]) == list(b[:length]) for a, b in zip(runs, reference))
    return same / len(runs)


def _load(method: str, gguf_path: str | Path, n_ctx: int, n_threads: int, seed: int):
    llama_cpp = require_llama_cpp()
    if method not in LLAMACPP_METHODS:
        raise ValueError(f"unknown llama.cpp method {method!r}; choose from {', '.join(LLAMACPP_METHODS)}")
    draft = None
    if method == "llamacpp-lookup":
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_TOKENS)
    if not Path(gguf_path).is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    return llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=n_threads,
                           n_threads_batch=n_threads, seed=seed, draft_model=draft, verbose=False)


def time_llamacpp_method(method: str, gguf_path: str | Path, encoded: Sequence[list[int]],
                         max_new_tokens: int, *, temperature: float = 0.0, seed: int = 0,
                         vocab_size: int | None = None,
                         n_threads: int | None = None) -> list[tuple[float, list[int], dict[str, Any]]]:
    """Per prompt: (seconds, tokens, {"forward_passes": llama.cpp eval calls, prompt included})
    of `method` on `gguf_path`, by the rule of `methods.time_jax_method` (module docstring).
    `vocab_size`, when given, must equal the GGUF's."""
    timer = llamacpp_prompt_timer(method, gguf_path, encoded, max_new_tokens, temperature=temperature,
                                  seed=seed, vocab_size=vocab_size, n_threads=n_threads)
    return [timer(i) for i in range(len(encoded))]


def llamacpp_prompt_timer(method: str, gguf_path: str | Path, encoded: Sequence[list[int]],
                          max_new_tokens: int, *, temperature: float = 0.0, seed: int = 0,
                          vocab_size: int | None = None,
                          n_threads: int | None = None) -> Callable[[int], tuple[float, list[int], dict]]:
    """`time_llamacpp_method` one prompt at a time: loads the model and runs the warm-up now, and
    returns `timer(i)`, the row of prompt i (so that a bench can interleave it with other methods)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not encoded:
        raise ValueError("no prompts to run")
    n_threads = n_threads or os.cpu_count() or 1
    n_ctx = max(len(ids) for ids in encoded) + max_new_tokens + LOOKUP_TOKENS + 8
    llm = _load(method, gguf_path, n_ctx, n_threads, seed)
    if vocab_size is not None and llm.n_vocab() != vocab_size:
        raise ValueError(f"{gguf_path} has {llm.n_vocab()} tokens, the target {vocab_size}: the llama.cpp "
                         "methods need the GGUF the target was converted from (--gguf)")
    evals = [0]
    inner_eval = llm.eval

    def counted_eval(tokens):
        evals[0] += 1
        return inner_eval(tokens)

    llm.eval = counted_eval
    sampling = dict(temp=temperature, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, repeat_penalty=1.0,
                    frequency_penalty=0.0, presence_penalty=0.0)

    def generate(ids: list[int]) -> list[int]:
        llm.reset()  # an empty cache: no prefix reuse between prompts
        llm.set_seed(seed)
        evals[0] = 0
        tokens: list[int] = []
        if max_new_tokens < 1:
            return tokens
        for token in llm.generate(list(ids), reset=True, **sampling):
            tokens.append(int(token))
            if len(tokens) >= max_new_tokens:
                break
        return tokens

    generate(encoded[0])

    def timer(i: int) -> tuple[float, list[int], dict[str, Any]]:
        seconds, tokens = time_once(generate, encoded[i])
        return seconds, tokens, {"forward_passes": evals[0]}

    return timer
