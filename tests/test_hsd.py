"""HSD core: greedy identity with the target's AR decoding, batch behaviour, the Python-loop
reference, compilation reuse and input errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import LENGTHS, NEW, PROMPTS, SMALL_VOCAB, tiny_config

from hsd_jax.decoding.ar import ar_generate
from hsd_jax.decoding.hsd import Hierarchy, _run_jit, hsd_generate
from hsd_jax.decoding.ngram import NGramDrafter
from hsd_jax.models import Model, init_params

VOCAB = SMALL_VOCAB


@pytest.fixture(scope="module")
def models(small_family):
    return small_family


@pytest.fixture(scope="module")
def reference(models):
    return ar_generate(models[-1], PROMPTS, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=NEW)


def _chain(models, spec):
    """spec: indices into the family (-1 = target) or 'ng' for the n-gram drafter."""
    return [NGramDrafter(2, VOCAB) if s == "ng" else models[s] for s in spec]


GREEDY_CASES = [  # (chain, buffers, verifier per level); every rule appears at every depth
    ((0, -1), (1,), "tokenwise"), ((0, -1), (5,), "block"), (("ng", -1), (4,), "tokenwise"),
    ((0, 2, -1), (1, 1), "block"), ((0, 2, -1), (3, 2), ("tokenwise", "block")),
    (("ng", 1, -1), (3, 3), ("block", "tokenwise")),
    ((0, 1, 2, -1), (2, 2, 2), "tokenwise"), ((0, 1, 2, -1), (1, 3, 1), ("block", "tokenwise", "block")),
    (("ng", 0, 2, -1), (4, 2, 3), "block"),
]


@pytest.mark.parametrize("spec,buffers,verifier", GREEDY_CASES, ids=lambda x: str(x))
def test_greedy_hsd_equals_target_ar(models, reference, spec, buffers, verifier):
    hierarchy = Hierarchy(_chain(models, spec), buffers, verifier)
    out = hsd_generate(hierarchy, PROMPTS, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=NEW)
    np.testing.assert_array_equal(out.num_tokens, reference.num_tokens)
    np.testing.assert_array_equal(out.tokens, reference.tokens)
    stats = out.stats
    assert (stats.accepted <= stats.proposed).all()
    assert (stats.tokens_per_target_call >= 1).all()
    # every committed token came out of a target round: rounds <= tokens, and rounds >= tokens / (cap + 1)
    assert (stats.target_rounds <= out.num_tokens).all()
    assert (stats.target_rounds * (hierarchy.capacities[-1] + 1) >= out.num_tokens).all()


def test_hierarchy_accepts_drafts(models, reference):
    """The family is not degenerate: the 3-layer draft's proposals are often accepted."""
    out = hsd_generate(Hierarchy([models[2], models[-1]], (4,)), PROMPTS, LENGTHS, jax.random.PRNGKey(0),
                       max_new_tokens=NEW)
    assert out.stats.accepted.sum() > 0.25 * out.stats.proposed.sum()
    assert float(out.stats.tokens_per_target_call.mean()) > 1.5


def test_greedy_with_eos_rows_finish_independently(models, reference):
    eos = int(reference.tokens[0, 5])
    ar = ar_generate(
        models[-1], PROMPTS, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=NEW, eos_token_id=eos
    )
    assert int(ar.num_tokens[0]) <= 6 and len(set(np.asarray(ar.num_tokens).tolist())) > 1
    for spec, buffers in [((0, -1), (4,)), ((0, 2, -1), (2, 3)), (("ng", 1, 2, -1), (2, 2, 2))]:
        out = hsd_generate(Hierarchy(_chain(models, spec), buffers), PROMPTS, LENGTHS, jax.random.PRNGKey(0),
                           max_new_tokens=NEW, eos_token_id=eos)
        np.testing.assert_array_equal(out.num_tokens, ar.num_tokens)
        np.testing.assert_array_equal(out.tokens, ar.tokens)


def test_rows_do_not_disturb_each_other(models):
    """A row's output does not depend on which other rows share its batch."""
    hierarchy = Hierarchy([models[0], models[2], models[-1]], (2, 3))
    together = hsd_generate(hierarchy, PROMPTS, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=NEW)
    for row in range(len(PROMPTS)):
        alone = hsd_generate(hierarchy, PROMPTS[row:row + 1], LENGTHS[row:row + 1], jax.random.PRNGKey(0),
                             max_new_tokens=NEW)
        np.testing.assert_array_equal(alone.tokens[0], together.tokens[row])


def test_python_reference_agrees_with_jit(models):
    """Same key, same tokens and stats. (This caught block verification drawing τ from a
    round-off-negative probability: NaN won the argmax in the compiled program only.)"""
    hierarchy = Hierarchy([NGramDrafter(2, VOCAB), models[0], models[2], models[-1]], (2, 2, 3),
                          ("tokenwise", "block", "block"))
    kwargs = dict(max_new_tokens=8, temperature=0.8, top_k=5)
    compiled = hsd_generate(hierarchy, PROMPTS, LENGTHS, jax.random.PRNGKey(7), **kwargs)
    python = hsd_generate(hierarchy, PROMPTS, LENGTHS, jax.random.PRNGKey(7), trace=False, **kwargs)
    np.testing.assert_array_equal(compiled.tokens, python.tokens)
    np.testing.assert_array_equal(compiled.num_tokens, python.num_tokens)
    for name in ("forward_passes", "proposed", "accepted", "target_rounds"):
        np.testing.assert_array_equal(
            getattr(compiled.stats, name), getattr(python.stats, name), err_msg=name
        )


def test_second_call_with_new_prompts_does_not_recompile(models):
    hierarchy = Hierarchy([models[0], models[-1]], (3,))
    hsd_generate(hierarchy, PROMPTS, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=8, temperature=1.0)
    compiled = _run_jit._cache_size()
    other = (PROMPTS + 3) % VOCAB
    hsd_generate(
        hierarchy, other, np.array([3, 8, 2]), jax.random.PRNGKey(5), max_new_tokens=8, temperature=1.0
    )
    assert _run_jit._cache_size() == compiled


def test_hierarchy_is_a_pytree_usable_inside_user_jit(models, reference):
    hierarchy = Hierarchy([models[0], models[2], models[-1]], (2, 3))

    @jax.jit
    def user_program(h, prompts, lengths, key):
        return hsd_generate(h, prompts, lengths, key, max_new_tokens=NEW).tokens

    np.testing.assert_array_equal(
        user_program(hierarchy, PROMPTS, LENGTHS, jax.random.PRNGKey(0)), reference.tokens
    )
    leaves, treedef = jax.tree.flatten(hierarchy)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert rebuilt.buffers == hierarchy.buffers and rebuilt.verifiers == hierarchy.verifiers


def test_depth_zero_is_ar(models, reference):
    out = hsd_generate(Hierarchy([models[-1]]), PROMPTS, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=NEW)
    np.testing.assert_array_equal(out.tokens, reference.tokens)


def test_padded_vocab_of_the_same_tokenizer_is_sliced(models, reference):
    """A draft whose embedding/head is padded to a larger vocabulary (as Qwen2.5 0.5B vs 7B)."""
    draft = models[1]
    pad = 8
    params = dict(draft.params)
    params["embed"] = jnp.concatenate([params["embed"], jnp.zeros((pad, params["embed"].shape[1]))])
    padded = Model(params, tiny_config(vocab=VOCAB + pad, layers=2))
    with pytest.raises(ValueError, match="different vocabulary sizes"):
        Hierarchy([padded, models[-1]], (3,))
    hierarchy = Hierarchy([padded, models[-1]], (3,), shared_vocab_size=VOCAB)
    out = hsd_generate(hierarchy, PROMPTS, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=NEW)
    np.testing.assert_array_equal(out.tokens, reference.tokens)


# ----------------------------------------------------------------------------- bad input


def test_wrong_number_of_buffers(models):
    with pytest.raises(ValueError, match="need 2 buffer targets"):
        Hierarchy([models[0], models[1], models[-1]], (3,))


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_buffer_below_one(models, bad):
    with pytest.raises(ValueError, match=r"buffer T_0 must be an integer in \[1, "):
        Hierarchy([models[0], models[-1]], (bad,))


def test_different_vocab_sizes(models):
    other = Model(
        init_params(tiny_config(vocab=40, layers=1), jax.random.PRNGKey(1)), tiny_config(vocab=40, layers=1)
    )
    with pytest.raises(ValueError, match=r"different vocabulary sizes \[40, 32\]"):
        Hierarchy([other, models[-1]], (3,))


def test_target_not_last(models):
    with pytest.raises(ValueError, match="order models smallest"):
        Hierarchy([models[-1], models[0]], (3,))
    with pytest.raises(ValueError, match="target .* must be a neural Model"):
        Hierarchy([models[0], NGramDrafter(2, VOCAB)], (3,))


def test_unknown_and_inexact_verifiers(models):
    with pytest.raises(ValueError, match="unknown verifier 'magic'"):
        Hierarchy([models[0], models[-1]], (3,), "magic")
    with pytest.raises(ValueError, match="not lossless.*allow_inexact=True"):
        Hierarchy([models[0], models[-1]], (3,), "zhou")
    assert Hierarchy([models[0], models[-1]], (3,), "zhou", allow_inexact=True).verifiers == ("zhou",)
    with pytest.raises(ValueError, match="one verifier for all levels or one per level"):
        Hierarchy([models[0], models[1], models[-1]], (3, 3), ("block",))


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "temperature must be"),
    (dict(top_k=-2), "top_k must be"),
    (dict(top_k=VOCAB + 1), "exceeds the vocabulary size"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(cache_size=12), "needs a cache of"),
])
def test_sampling_and_length_errors(models, kwargs, message):
    hierarchy = Hierarchy([models[0], models[-1]], (3,))
    kwargs = {"max_new_tokens": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        hsd_generate(hierarchy, PROMPTS, LENGTHS, jax.random.PRNGKey(0), **kwargs)


def test_out_of_vocab_prompt(models):
    bad = PROMPTS.copy()
    bad[1, 2] = VOCAB
    with pytest.raises(ValueError, match=rf"prompt token id {VOCAB} \(row 1, position 2\) is outside"):
        hsd_generate(
            Hierarchy([models[0], models[-1]], (3,)), bad, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=4
        )
