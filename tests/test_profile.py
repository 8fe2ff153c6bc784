"""Profiling for the planner: cost tables and pairwise acceptances on tiny models."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from families import family

from hsd_jax.decoding.ngram import NGramDrafter
from hsd_jax.io.sources import from_source, source_name
from hsd_jax.planning.profile import measure_acceptance, measure_costs

VOCAB = 32


@pytest.fixture(scope="module")
def models():
    return family(vocab=VOCAB)


def test_costs_are_positive_per_k(models):
    costs = measure_costs(models[0], 3, cache_size=32, context=8, repeats=2)
    assert len(costs) == 3 and all(c > 0 for c in costs)
    assert len(measure_costs(NGramDrafter(2, VOCAB), 2, cache_size=32, context=8, repeats=2)) == 2


def test_sparse_costs_are_interpolated(models, monkeypatch):
    import hsd_jax.planning.profile as profile

    seen = []

    def fake(levels, ks, **kwargs):
        seen.extend(ks)
        return [[float(k) ** 2 for k in ks] for _ in levels]

    monkeypatch.setattr(profile, "_measure_each", fake)
    costs = measure_costs(models[0], 3, sparse_ks=[2, 5, 9], repeats=1)
    assert seen == [1, 2, 3, 5, 9]  # every k to max_k, then only the sparse ones beyond it
    assert costs[:3] == [1.0, 4.0, 9.0] and costs[4] == 25.0 and costs[8] == 81.0 and len(costs) == 9
    assert costs[3] == pytest.approx((9 + 25) / 2) and costs[6] == pytest.approx((25 + 81) / 2)


def test_acceptance_matches_a_direct_count(models):
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, VOCAB, 20).astype(np.int32) for _ in range(3)]
    starts = [5, 8, 12]
    small, target = models[0], models[-1]
    result = measure_acceptance([small, small, target], sequences, starts, temperature=1.0, vocab=VOCAB,
                                progress=False)
    assert result["greedy"][0, 1] == pytest.approx(1.0) and result["sampled"][0, 1] == pytest.approx(1.0)
    agree, total, overlap = 0, 0, 0.0
    for seq, start in zip(sequences, starts):
        ls, _ = small.step(seq[None], small.init_cache(1, len(seq)))
        lt, _ = target.step(seq[None], target.init_cache(1, len(seq)))
        ls, lt = np.asarray(ls[0, start - 1:-1]), np.asarray(lt[0, start - 1:-1])
        agree += int(np.sum(ls.argmax(-1) == lt.argmax(-1)))
        overlap += float(np.minimum(jax.nn.softmax(ls), jax.nn.softmax(lt)).sum())
        total += len(seq) - start
    assert result["greedy"][0, 2] == pytest.approx(agree / total)
    assert result["sampled"][0, 2] == pytest.approx(overlap / total, rel=1e-4)
    assert 0 < result["sampled"][0, 2] < 1


def test_sources_and_names(tmp_path):
    assert source_name("ngram:3") == "ngram3" and source_name("int8:checkpoints/t") == "t-int8"
    assert isinstance(from_source("ngram:2", vocab_size=VOCAB), NGramDrafter)
    with pytest.raises(ValueError, match="ngram:N"):
        from_source("ngram:x", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="vocab_size"):
        from_source("ngram:2")


def test_greedy_position_profile_counts_runs():
    from hsd_jax.planning.profile import greedy_position_profile

    agree = np.array([1, 1, 0, 1, 1, 1, 0, 0, 1, 0], bool)
    # blocks start at 0 and after each disagreement (3, 7, 8, 10: past the end): runs 2, 3, 0, 1
    profile = greedy_position_profile([agree], 4, min_count=1)
    # P(r>=1)=3/4; P(r>=2 | r>=1)=2/3; P(r>=3 | r>=2)=1/2; P(r>=4 | r>=3)=0/1
    assert profile == pytest.approx([3 / 4, 2 / 3, 1 / 2, 0.0])
    iid = np.random.default_rng(0).random(200_000) < 0.7
    assert greedy_position_profile([iid], 6) == pytest.approx([0.7] * 6, abs=0.01)
    # too few blocks behind a rate: the last reliable rate is repeated
    assert greedy_position_profile([agree], 4, min_count=3) == pytest.approx([3 / 4, 2 / 3, 2 / 3, 2 / 3])


def test_num_params_counts_each_weight_once(models):
    import dataclasses

    from hsd_jax.models import Model, param_shapes

    def count(config):
        return sum(
            int(np.prod(s))
            for s in jax.tree.leaves(param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
        )

    untied = models[-1]
    assert untied.num_params == count(untied.config)
    config = dataclasses.replace(untied.config, tie_word_embeddings=True)
    tied = Model({k: v for k, v in untied.params.items() if k != "lm_head"}, config)
    assert tied.num_params == count(config) == count(untied.config) - config.vocab_size * config.hidden_size
    # the CPU decode layout materialises the tied embedding as a [D, V] head: the same weights
    cpu = tied.with_layout("unstacked")
    assert "lm_head" in cpu.params and cpu.num_params == count(config)
    from hsd_jax.models.layouts import quantize_int8

    assert quantize_int8(tied).num_params == count(config)  # the planner needs int8 copy <= target


def test_profile_needs_prompts():
    from hsd_jax.planning.profile import profile_family

    with pytest.raises(ValueError, match="at least one prompt"):
        profile_family(["ngram:2", "models/target"], [])


def test_interleaved_timing_times_every_call_once_per_round_after_warm_up():
    from hsd_jax.planning.timing import interleaved_median_seconds

    log = []
    calls = [(lambda name=name: log.append(name), ()) for name in "abc"]
    seconds = interleaved_median_seconds(calls, repeats=3, warmup=1)
    assert log == list("abc") + list("abc") * 3  # one warm-up each, then round-robin rounds
    assert len(seconds) == 3 and all(s >= 0 for s in seconds)
    with pytest.raises(ValueError, match="repeats"):
        interleaved_median_seconds(calls, repeats=0)


def test_interleaved_timing_starts_each_group_one_call_later_every_round():
    """The first call of a group after the other groups' calls finds its model's weights out of
    cache: with groups, that call is a different one each round, so no call's median is always
    the cold one."""
    from hsd_jax.planning.timing import interleaved_median_seconds

    log = []
    calls = [(lambda name=name: log.append(name), ()) for name in "abcde"]
    seconds = interleaved_median_seconds(calls, repeats=4, warmup=0, groups=[3, 2])
    assert log == list("abcde") + list("bcaed") + list("cabde") + list("abced")
    assert len(seconds) == 5
    for bad in ([3, 3], [5, 0]):
        with pytest.raises(ValueError, match="groups"):
            interleaved_median_seconds(calls, repeats=1, groups=bad)


def test_family_costs_are_timed_in_shared_rounds(models, monkeypatch):
    """Every member at every k runs once per round, round after round: a slow spell of the machine
    falls on all of them."""
    import hsd_jax.planning.profile as profile

    order = []

    def fake_interleaved(calls, repeats, groups):
        assert groups == [3, 3]  # each member's ks rotate within its own group, round by round
        for _ in range(repeats):
            order.append([args[2].shape[1] for _, args in calls])
        return [float(i) for i in range(len(calls))]

    monkeypatch.setattr(profile, "interleaved_median_seconds", fake_interleaved)
    costs = profile.measure_family_costs(models[:2], 2, sparse_ks=[4], repeats=3, cache_size=32, context=8)
    assert order == [[1, 2, 4, 1, 2, 4]] * 3
    assert costs[0] == [0.0, 1.0, 1.5, 2.0] and costs[1] == [3.0, 4.0, 4.5, 5.0]
