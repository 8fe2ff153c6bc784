"""The bench's llama.cpp peers (`bench.llamacpp`) and the weight bytes each method reads per token.

Only `test_llamacpp_ar_runs_the_gguf` needs llama-cpp-python (`pip install -e ".[peers]"`); it is
skipped without it. The rest checks the pure helpers and the error that says how to install it.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import pytest
from families import family

from hsd_jax.bench.llamacpp import (
    LLAMACPP_METHODS,
    gguf_weight_bytes,
    prefix_match_fraction,
    time_llamacpp_method,
)
from hsd_jax.bench.methods import ALL_METHODS, METHODS, _per_token_bytes, weight_bytes
from hsd_jax.cli.bench import methods_lines
from hsd_jax.cli.main import main
from hsd_jax.decoding.ngram import NGramDrafter
from hsd_jax.models import quantize_int8


def test_llamacpp_methods_are_opt_in():
    assert set(LLAMACPP_METHODS) <= set(ALL_METHODS)
    assert not set(LLAMACPP_METHODS) & set(METHODS)


def test_prefix_match_fraction():
    ours = [list(range(20)), list(range(20)), [1, 2, 3]]
    theirs = [list(range(16)) + [0, 0, 0, 0], list(range(15)) + [99], [1, 2, 3]]
    assert prefix_match_fraction(theirs, ours) == pytest.approx(2 / 3)
    assert prefix_match_fraction(theirs, ours, length=15) == 1.0
    with pytest.raises(ValueError):
        prefix_match_fraction(theirs[:2], ours)


def test_weight_bytes_follow_the_stored_dtype():
    target = family()[-1]
    assert weight_bytes(target) == target.num_params * target.dtype.itemsize
    bf16 = target.replace(params=jax.tree.map(lambda x: x.astype(jnp.bfloat16), target.params))
    assert weight_bytes(bf16) == target.num_params * 2
    int8 = quantize_int8(target)
    assert weight_bytes(int8) < weight_bytes(target) / 2
    assert weight_bytes(NGramDrafter(3, 32)) == 0


def test_per_token_bytes_count_each_levels_passes():
    class Stats:
        forward_passes = [[40, 10]]  # 40 draft steps and 10 target passes for 20 tokens

    rows = [(1.0, list(range(20)), Stats()), (1.0, list(range(10)), {"forward_passes": 10})]
    assert _per_token_bytes(rows[:1], [100, 1000]) == pytest.approx((40 * 100 + 10 * 1000) / 20)
    assert _per_token_bytes(rows[1:], [1000]) == pytest.approx(1000)
    assert _per_token_bytes([(1.0, [1, 2], None)], [1000]) == 1000  # transformers' AR: one pass a token
    assert _per_token_bytes([(1.0, [1, 2], None)], [1000, 10]) is None  # assisted: passes unknown


def test_gguf_weight_bytes_is_the_tensor_data(smollm2_gguf):
    size = smollm2_gguf.stat().st_size
    data = gguf_weight_bytes(smollm2_gguf)
    assert 0.9 * size < data < size  # the file less its metadata (vocabulary, alignment)


def test_report_lines_show_bytes_and_prefix_match():
    results = {"machine": "m", "temperature": 0.0, "prompts": 2, "max_new_tokens": 8, "plan": "p", "sd": "s",
               "gguf": "x.gguf", "llama_cpp": "0.3", "hsd_over_llamacpp-ar": 0.5,
               "methods": {"ar": {"tokens_per_s": 10.0, "speedup_vs_ar": 1.0, "weight_bytes": 2e8,
                                  "weight_bytes_per_token": 2e8, "identical_to_ar": True},
                           "llamacpp-ar": {"tokens_per_s": 20.0, "speedup_vs_ar": 2.0, "weight_bytes": 1e8,
                                           "weight_bytes_per_token": 1e8, "identical_to_ar": False,
                                           "first_16_match_ar": 0.5}}}
    text = "\n".join(methods_lines(results))
    assert "100.0 MB read/token" in text and "first 16 tokens match AR on 50% of prompts" in text
    assert "llama-cpp-python 0.3 on x.gguf" in text and "hsd_over_llamacpp-ar: 0.50x" in text


def test_bench_without_llama_cpp_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    argv = ["bench", "--plan", "plan.json", "--stats", "stats.json", "--prompts", "p.jsonl",
            "--methods", "ar,llamacpp-ar"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hsd-jax bench: error:")
    assert 'pip install -e ".[peers]"' in err and "make bench-peers" in err


def test_bench_names_the_llama_cpp_methods_among_the_choices(capsys):
    argv = ["bench", "--plan", "plan.json", "--stats", "stats.json", "--prompts", "p.jsonl",
            "--methods", "nope"]
    assert main(argv) == 2
    assert "llamacpp-ar" in capsys.readouterr().err


def test_llamacpp_ar_runs_the_gguf(smollm2_gguf):
    pytest.importorskip("llama_cpp")
    prompts = [[1, 504, 3458, 2], [1, 9690, 198, 504, 3458, 314, 2]]
    rows = time_llamacpp_method("llamacpp-ar", smollm2_gguf, prompts, 5, vocab_size=49152, n_threads=1)
    assert len(rows) == 2
    for seconds, tokens, stats in rows:
        assert seconds > 0 and len(tokens) == 5 and all(0 <= t < 49152 for t in tokens)
        assert stats["forward_passes"] == 5  # the prompt's pass gives the first token
    again = time_llamacpp_method("llamacpp-ar", smollm2_gguf, prompts[:1], 5, n_threads=1)
    assert again[0][1] == rows[0][1]  # greedy: the same tokens from an empty cache
    with pytest.raises(ValueError, match="tokens"):
        time_llamacpp_method("llamacpp-ar", smollm2_gguf, prompts, 2, vocab_size=32)
