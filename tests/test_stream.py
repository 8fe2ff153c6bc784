"""Streaming: chunks concatenate to exactly the one-shot output (greedy and sampled, AR and HSD,
rows finishing at different times), and nothing recompiles between chunks."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from families import LENGTHS, NEW, PROMPTS, SMALL_VOCAB

from hsd_jax.decoding.ar import ar_generate
from hsd_jax.decoding.hsd import Hierarchy, hsd_generate
from hsd_jax.decoding.ngram import NGramDrafter
from hsd_jax.decoding.stream import Streamer, stream

VOCAB = SMALL_VOCAB


@pytest.fixture(scope="module")
def models(small_family):
    return small_family


@pytest.fixture(scope="module")
def eos(models):
    """A token row 0 produces early in greedy AR, so rows finish at different times."""
    ref = ar_generate(models[-1], PROMPTS, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=NEW)
    return int(ref.tokens[0, 5])


def _collect(source, key, **kwargs):
    gen = stream(source, PROMPTS, LENGTHS, key, **kwargs)
    rows = [[] for _ in range(len(PROMPTS))]
    chunks = 0
    while True:
        try:
            chunk = next(gen)
        except StopIteration as stop:
            final = stop.value
            break
        assert len(chunk) == len(PROMPTS) and all(c.dtype == np.int32 and c.ndim == 1 for c in chunk)
        assert sum(len(c) for c in chunk) > 0
        chunks += 1
        for b, c in enumerate(chunk):
            rows[b].extend(c.tolist())
    return rows, chunks, final


def _assert_same(rows, out):
    for b, row in enumerate(rows):
        n = int(out.num_tokens[b])
        assert row == np.asarray(out.tokens[b, :n]).tolist(), f"row {b}"


CASES = [  # (chain spec, buffers); -1 = target, "ng" = n-gram; () = the target alone (AR)
    ((-1,), ()), ((0, -1), (3,)), (("ng", 1, -1), (2, 3)), ((0, 2, -1), (2, 2))]


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
@pytest.mark.parametrize("spec,buffers", CASES, ids=str)
def test_stream_equals_one_shot(models, eos, spec, buffers, temperature):
    chain = [NGramDrafter(2, VOCAB) if s == "ng" else models[s] for s in spec]
    key = jax.random.PRNGKey(3)
    kwargs = dict(max_new_tokens=NEW, temperature=temperature, eos_token_id=eos)
    if len(chain) == 1:
        source, out = chain[0], ar_generate(chain[0], PROMPTS, LENGTHS, key, **kwargs)
    else:
        source = Hierarchy(chain, buffers, "block")
        out = hsd_generate(source, PROMPTS, LENGTHS, key, **kwargs)
    lengths = np.asarray(out.num_tokens)
    if temperature == 0:
        assert len(set(lengths.tolist())) > 1 and lengths.min() < NEW  # rows finish at different times
    rows, chunks, final = _collect(source, key, rounds_per_chunk=2, **kwargs)
    _assert_same(rows, out)
    np.testing.assert_array_equal(final.tokens, out.tokens)
    if len(chain) > 1:
        np.testing.assert_array_equal(final.stats.target_rounds, out.stats.target_rounds)
    assert chunks >= 2


def test_depth_zero_hierarchy_streams_as_ar(models):
    key = jax.random.PRNGKey(1)
    out = ar_generate(models[-1], PROMPTS, LENGTHS, key, max_new_tokens=NEW)
    rows, _, _ = _collect(Hierarchy([models[-1]]), key, max_new_tokens=NEW, rounds_per_chunk=5)
    _assert_same(rows, out)


@pytest.mark.parametrize("spec", [(-1,), (0, 2, -1)], ids=["ar", "hsd"])
def test_no_recompilation_between_chunks_or_requests(models, spec):
    source = models[-1] if len(spec) == 1 else Hierarchy([models[s] for s in spec], (2, 2))

    def make(key, prompts, r):
        return Streamer(source, prompts, LENGTHS, key, max_new_tokens=NEW, temperature=1.0,
                        rounds_per_chunk=r)

    first = make(jax.random.PRNGKey(0), PROMPTS, 1)
    first.warm_up()
    compiled = first.compiled_programs()
    chunks = list(first)
    assert len(chunks) > 3
    # new prompts, key and chunk size: the same programs
    again = list(make(jax.random.PRNGKey(5), (PROMPTS + 1) % VOCAB, 3))
    assert again and first.compiled_programs() == compiled


def test_bad_rounds_per_chunk(models):
    with pytest.raises(ValueError, match="rounds_per_chunk"):
        Streamer(models[-1], PROMPTS, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=4, rounds_per_chunk=0)
    with pytest.raises(TypeError, match="Hierarchy or Model"):
        Streamer("x", PROMPTS, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=4)
