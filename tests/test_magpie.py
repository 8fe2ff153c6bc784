"""Self-generated data (`hsd-jax make-data`): the cached top-k is the target's own distribution,
generation matches `ar_generate` token for token, cleaning refuses near-duplicates of the eval
prompts, and a stopped run (also one interrupted while a shard is being written) resumes to the
same shards an unstopped run writes."""

from __future__ import annotations

import itertools
import time

import jax
import numpy as np
import pytest
from families import family

from hsd_jax.decoding.ar import ar_generate
from hsd_jax.decoding.sampling import SamplingParams
from hsd_jax.io.checkpoint import load_tokenizer
from hsd_jax.io.prompts import eval_prompts_path, instructions_path, load_prompts
from hsd_jax.train import magpie
from hsd_jax.train.dataset import load_dataset, teacher_top_k
from hsd_jax.train.magpie import (
    NgramIndex,
    chat_prefix,
    clean_instruction,
    generate_with_top_k,
    make_corpus,
    shard_paths,
)

VOCAB = 64


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_matches_ar_and_caches_the_teacher_forced_top_k(temperature):
    target = family(vocab=VOCAB, layers=3)[-1]
    prompts = np.array([[5, 6, 7, 8], [9, 10, 0, 0]], np.int32)
    lengths = np.array([4, 2], np.int32)
    key, eos, new = jax.random.PRNGKey(3), 1, 12
    tokens, counts, ids, logp = generate_with_top_k(
        target, prompts, lengths, key, max_new_tokens=new, sampling=SamplingParams(temperature),
        eos_token_id=eos, top_k=8, cache_size=32)
    want = ar_generate(target, prompts, lengths, key, max_new_tokens=new, temperature=temperature,
                       eos_token_id=eos, cache_size=32)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(want.num_tokens))
    assert int(np.asarray(counts).sum()) > 2 * 2  # something was generated to compare
    for row in range(2):
        n, p = int(counts[row]), int(lengths[row])
        seq = np.concatenate([prompts[row, :p], np.asarray(tokens)[row, :n]])[None].astype(np.int32)
        forced_ids, forced_logp = teacher_top_k(target, seq, np.array([len(seq[0])]), 8, batch_size=1,
                                                progress=False)
        # the distribution of answer token j is the teacher-forced one at position p - 1 + j
        np.testing.assert_allclose(np.asarray(logp)[row, :n], forced_logp[0, p - 1:p - 1 + n], atol=2e-5)
        np.testing.assert_array_equal(np.asarray(ids)[row, :n, :3], forced_ids[0, p - 1:p - 1 + n, :3])


def test_a_paraphrased_eval_prompt_is_caught_and_unrelated_text_is_not():
    evals = load_prompts(eval_prompts_path())
    index = NgramIndex(3, evals)
    first = evals[0]  # "Write a Python function that checks whether a number is prime."
    assert index.similarity(first) == (1.0, 1.0)
    reworded = "Please " + first.lower().replace("checks whether", "checks whether or not")
    assert index.similarity(reworded)[0] >= 0.5
    asked = "Could you write a python function that checks whether a number is prime or not?"
    assert index.similarity(asked)[0] >= 0.5
    quoted = f"My teacher gave us homework about loops, recursion and sets. {first} Explain each line too."
    assert index.similarity(quoted)[0] < 0.5 and index.similarity(quoted)[1] >= magpie.EVAL_CONTAINED
    assert max(index.similarity("Tell me about the history of the violin in eighteenth century Italy.")) < 0.5
    # a shared template ("Write a Python function that ...") is not a near-duplicate
    assert index.similarity("Write a Python function that reverses a linked list.")[0] < 0.5
    # the shipped seed instructions never come near the evaluation prompts
    worst = max(index.similarity(p)[0] for p in load_prompts(instructions_path()))
    assert worst < 0.5, worst


def test_clean_instruction_limits():
    assert clean_instruction("  How do I bake bread?  ") == "How do I bake bread?"
    assert clean_instruction("Hi there") is None  # two words
    assert clean_instruction("word " * 200) is None
    assert clean_instruction("¿Cómo está usted, señor? ¡Qué día más bonito hace hoy!") is None


def test_chat_prefix_stops_where_the_user_writes(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    prefix, stop = chat_prefix(tokenizer)
    text = tokenizer.decode(prefix)
    assert text.endswith("<|im_start|>user\n") and "<|im_start|>assistant" not in text
    assert tokenizer.convert_ids_to_tokens(stop) == "<|im_end|>"


def _fake_instructions(model, tokenizer, key, batch_size, max_tokens):
    """Magpie instructions from a random model are noise; these depend on the key alone, like the
    real ones, with duplicates and an eval prompt among them to be filtered."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())
    topics = ["bread", "rivers", "stars", "taxes", "chess", "violins", "glaciers", "poems", "engines", "tea"]
    for i in itertools.count():
        if i % 7 == 3:
            yield load_prompts(eval_prompts_path())[0]
        a, b = rng.choice(topics, 2, replace=False)
        yield f"Explain how {a} relate to {b} in example number {int(rng.integers(0, 10**6))}."


def test_a_stopped_run_resumes_to_the_same_shards(tiny_chat_model, tmp_path, monkeypatch):
    monkeypatch.setattr(magpie, "_instructions", _fake_instructions)
    evals = load_prompts(eval_prompts_path())
    seeds = ["How do I bake bread?", "How do I bake bread??", "Name three rivers in Europe please."]
    kwargs = dict(eval_prompts=evals, seed_instructions=seeds, batch_size=4, max_answer_tokens=6, top_k=4,
                  progress=False)
    whole = make_corpus(tiny_chat_model, tmp_path / "whole", answer_tokens=60, **kwargs)
    part = make_corpus(tiny_chat_model, tmp_path / "split", answer_tokens=20, **kwargs)
    rest = make_corpus(tiny_chat_model, tmp_path / "split", answer_tokens=60, **kwargs)
    assert part["shards"] < whole["shards"] == rest["shards"] and rest["resumed_at_shard"] == part["shards"]
    assert rest["answer_tokens"] == whole["answer_tokens"] >= 60
    # where the time went: every phase ran, and the phases fit inside the run
    assert set(whole["seconds"]) >= {"instructions", "cleaning", "answers"}
    phases = whole["seconds"].values()
    assert all(s >= 0 for s in phases) and sum(phases) <= whole["wall_s"]
    _assert_same_shards(tmp_path / "whole", tmp_path / "split", whole["shards"])
    assert whole["stopped_by"] == "answer tokens"
    # out of time before a first shard could end: nothing written, and the run says why it stopped
    late = make_corpus(tiny_chat_model, tmp_path / "late", answer_tokens=60, max_seconds=1e-9, **kwargs)
    assert late["stopped_by"] == "time" and late["shards"] == 0 and not magpie.shard_paths(tmp_path / "late")
    data = load_dataset(tmp_path / "whole")
    prompts = [str(p) for p in data["prompts"]]
    # "??" is a duplicate
    assert prompts[:2] == ["How do I bake bread?", "Name three rivers in Europe please."]
    assert evals[0] not in prompts and len(set(prompts)) == len(prompts)
    assert set(np.unique(data["temperature"])) == {0.0, 1.0}
    # every answer position carries a teacher distribution; prompt positions carry none
    for row in range(len(prompts)):
        start, end = int(data["answer_start"][row]), int(data["lengths"][row])
        mass = np.exp(data["teacher_logp"][row].astype(np.float64)).sum(-1)
        assert ((mass[start - 1:end - 1] > 0.0) & (mass[start - 1:end - 1] <= 1.0 + 1e-3)).all()
        assert (data["teacher_ids"][row, :start - 1] == 0).all()
        assert (data["teacher_logp"][row, :start - 1] == 0).all()


def _assert_same_shards(a_dir, b_dir, count):
    for index in range(count):
        name = magpie.SHARD.format(index)
        a, b = np.load(a_dir / name), np.load(b_dir / name)
        assert sorted(a.files) == sorted(b.files)
        for field in a.files:
            np.testing.assert_array_equal(a[field], b[field], err_msg=f"{name}:{field}")


def test_an_interrupt_keeps_the_shard_being_written(tiny_chat_model, tmp_path, monkeypatch):
    """Shards are written on a second thread while the next is generated: Ctrl-C during generation
    still finishes the shard in flight, and the rerun resumes after it to the unstopped result."""
    monkeypatch.setattr(magpie, "_instructions", _fake_instructions)
    kwargs = dict(eval_prompts=load_prompts(eval_prompts_path()), seed_instructions=["How do I bake bread?"],
                  batch_size=4, max_answer_tokens=6, top_k=4, progress=False)
    whole = make_corpus(tiny_chat_model, tmp_path / "whole", answer_tokens=60, **kwargs)
    generate, write = magpie._generate, magpie._write_shard
    calls = itertools.count(1)

    def generate_then_interrupt(*args, **kw):
        if next(calls) == 3:  # shards 0 and 1 handed to the writer; 1 is still being written
            raise KeyboardInterrupt
        return generate(*args, **kw)

    def slow_write(*args, **kw):
        time.sleep(0.5)
        write(*args, **kw)

    monkeypatch.setattr(magpie, "_generate", generate_then_interrupt)
    monkeypatch.setattr(magpie, "_write_shard", slow_write)
    with pytest.raises(KeyboardInterrupt):
        make_corpus(tiny_chat_model, tmp_path / "split", answer_tokens=60, **kwargs)
    assert len(shard_paths(tmp_path / "split")) == 2
    monkeypatch.setattr(magpie, "_generate", generate)
    monkeypatch.setattr(magpie, "_write_shard", write)
    rest = make_corpus(tiny_chat_model, tmp_path / "split", answer_tokens=60, **kwargs)
    assert rest["resumed_at_shard"] == 2 and rest["shards"] == whole["shards"] > 2
    _assert_same_shards(tmp_path / "whole", tmp_path / "split", whole["shards"])
