"""ar_generate: agreement with uncached forward passes, independent rows, sampling exactness
against transformers' logits processors, and input errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import family, tiny_config
from scipy.stats import chisquare

from hsd_jax.decoding.ar import ar_generate
from hsd_jax.decoding.sampling import SamplingParams, distribution, sample_logits
from hsd_jax.models import Model, forward, init_params

PROMPTS = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 0, 0], [5, 0, 0, 0, 0]], np.int32)
LENGTHS = np.array([5, 3, 1], np.int32)


@pytest.fixture(scope="module")
def model():
    return family(vocab=32)[-1]


_full_forward = jax.jit(
    lambda model, tokens: forward(model.params, model.config, tokens, model.init_cache(1, 32))[0]
)


def _greedy_by_full_forward(model: Model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding that recomputes the whole (right-padded, causal) sequence every step."""
    seq = list(prompt)
    for _ in range(steps):
        logits = _full_forward(model, jnp.asarray([seq + [0] * (32 - len(seq))]))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_greedy_matches_uncached_forward(model):
    out = ar_generate(model, PROMPTS, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=10)
    for row in range(3):
        expected = _greedy_by_full_forward(model, PROMPTS[row, :LENGTHS[row]].tolist(), 10)
        assert np.asarray(out.tokens[row]).tolist() == expected
    np.testing.assert_array_equal(out.num_tokens, [10, 10, 10])


def test_stacked_and_unstacked_layouts_agree(model):
    a = ar_generate(model.with_layout("stacked"), PROMPTS, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=8)
    b = ar_generate(model.with_layout("unstacked"), PROMPTS, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_eos_finishes_rows_independently(model):
    free = ar_generate(model, PROMPTS, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=10)
    eos = int(free.tokens[1, 3])
    out = ar_generate(model, PROMPTS, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=10, eos_token_id=eos)
    for row in range(3):
        row_tokens = np.asarray(free.tokens[row]).tolist()
        n = row_tokens.index(eos) + 1 if eos in row_tokens else 10
        assert int(out.num_tokens[row]) == n
        assert np.asarray(out.tokens[row, :n]).tolist() == row_tokens[:n]
        assert (np.asarray(out.tokens[row, n:]) == eos).all()  # padded with the EOS id


def _hf_processed_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The exact probabilities transformers' sampling draws from (its own warpers, torch)."""
    import torch
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = torch.tensor(logits[None], dtype=torch.float64)
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    for w in warpers:
        scores = w(None, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


ROWS = 200_000  # see the power argument in test_chi_square_harness_detects_a_one_percent_bias


def _assert_matches(counts: np.ndarray, expected: np.ndarray) -> None:
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token the processors exclude"
    result = chisquare(counts[support], expected[support] / expected[support].sum() * counts.sum())
    assert result.pvalue > 1e-3, result


def _first_token_logits(model) -> jax.Array:
    logits, _ = forward(model.params, model.config, jnp.asarray(PROMPTS[:1]), model.init_cache(1, 16))
    return logits[0, -1]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0),
                                                     (1.0, 0, 0.8), (0.9, 8, 0.7)])
def test_sampling_matches_exact_processed_distribution(model, temperature, top_k, top_p):
    """Our processed probabilities equal transformers' warpers, and 200k draws from them pass a
    chi-square test against those exact probabilities."""
    logits = _first_token_logits(model)
    expected = _hf_processed_probs(np.asarray(logits, np.float64), temperature, top_k, top_p)
    params = SamplingParams(temperature, top_k, top_p)
    np.testing.assert_allclose(np.asarray(distribution(logits, params), np.float64), expected, atol=2e-6)
    tokens, _ = jax.jit(jax.vmap(lambda key: sample_logits(key, logits, params)))(
        jax.random.split(jax.random.PRNGKey(1), ROWS))
    _assert_matches(np.bincount(np.asarray(tokens), minlength=model.vocab_size), expected)


def test_ar_generate_samples_the_processed_distribution(model):
    """The same check end to end: 200k rows of one ar_generate call, first new token."""
    temperature, top_k, top_p = 0.9, 8, 0.7
    expected = _hf_processed_probs(
        np.asarray(_first_token_logits(model), np.float64), temperature, top_k, top_p
    )
    out = ar_generate(
        model,
        np.repeat(PROMPTS[:1], ROWS, 0),
        np.full(ROWS, 5, np.int32),
        jax.random.PRNGKey(1),
        max_new_tokens=1,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    _assert_matches(np.bincount(np.asarray(out.tokens[:, 0]), minlength=model.vocab_size), expected)


def test_chi_square_harness_detects_a_one_percent_bias(model):
    """Power: moving 1% of the mass between two tokens gives a chi-square non-centrality of
    n * 0.01^2 * (1/p_a + 1/p_b) >= 200k * 1e-4 * 2 = 40 (p_a, p_b <= 1), far past the p = 0.001
    critical value for 31 degrees of freedom (61.1). The harness fed such a sampler must fail."""
    exact = np.asarray(distribution(_first_token_logits(model), SamplingParams(1.0)), np.float64)
    exact /= exact.sum()
    biased = exact.copy()
    a, b = np.argsort(exact)[-2:]
    biased[a] -= 0.01
    biased[b] += 0.01
    draws = np.random.default_rng(0).choice(len(exact), size=ROWS, p=biased)
    counts = np.bincount(draws, minlength=len(exact))
    with pytest.raises(AssertionError):
        _assert_matches(counts, exact)


# ----------------------------------------------------------------------------- bad input


def _call(model, **kwargs):
    args = dict(prompt_tokens=PROMPTS, prompt_lengths=LENGTHS, key=jax.random.PRNGKey(0), max_new_tokens=4)
    args.update(kwargs)
    return ar_generate(model, args.pop("prompt_tokens"), args.pop("prompt_lengths"), args.pop("key"), **args)


def test_negative_temperature(model):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        _call(model, temperature=-0.5)


def test_nan_temperature(model):
    with pytest.raises(ValueError, match="temperature must be"):
        _call(model, temperature=float("nan"))


def test_bad_top_k(model):
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        _call(model, top_k=-1)
    with pytest.raises(ValueError, match="top_k=33 exceeds the vocabulary size 32"):
        _call(model, top_k=33)


def test_bad_top_p(model):
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            _call(model, top_p=bad)


def test_prompt_longer_than_cache(model):
    with pytest.raises(ValueError, match="needs a cache of 9 positions but cache_size=8"):
        _call(model, cache_size=8)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_prompt_beyond_the_context_length(positions):
    """Every model's context length is checked, not only learned-position ones."""
    config = tiny_config(positions=positions, max_position_embeddings=8)
    model = Model(init_params(config, jax.random.PRNGKey(0)), config)
    with pytest.raises(ValueError, match="more than the model's context length of 8 positions"):
        _call(model, max_new_tokens=6)


def test_out_of_vocab_token(model):
    bad = PROMPTS.copy()
    bad[0, 4] = 32
    with pytest.raises(
        ValueError, match=r"prompt token id 32 \(row 0, position 4\) is outside the vocabulary \[0, 32\)"
    ):
        _call(model, prompt_tokens=bad)
    bad[0, 4] = -3
    with pytest.raises(ValueError, match="prompt token id -3"):
        _call(model, prompt_tokens=bad)


def test_padding_beyond_prompt_length_is_not_checked(model):
    padded = PROMPTS.copy()
    padded[2, 1:] = -1  # row 2 has length 1: its padding may hold anything
    _call(model, prompt_tokens=padded)


def test_bad_lengths(model):
    with pytest.raises(ValueError, match=r"prompt_lengths must be in \[1, 5\]"):
        _call(model, prompt_lengths=np.array([5, 0, 1]))
    with pytest.raises(ValueError, match="prompt_lengths has 2 rows but prompt_tokens has 3"):
        _call(model, prompt_lengths=np.array([5, 3]))


def test_bad_max_new_tokens(model):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        _call(model, max_new_tokens=0)


def test_bad_eos(model):
    with pytest.raises(ValueError, match=r"eos_token_id=40 is outside the vocabulary"):
        _call(model, eos_token_id=40)
