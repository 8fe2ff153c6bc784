"""Distillation: a few optax steps on a tiny model, orbax resume, the saved draft loads and runs in
a hierarchy with the exact greedy output; vocabulary-subset heads, shared embeddings, int8."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import family

from hsd_jax.decoding.ar import ar_generate
from hsd_jax.decoding.hsd import Hierarchy, hsd_generate
from hsd_jax.io.checkpoint import load_model, save_model
from hsd_jax.models.layouts import quantize_int8
from hsd_jax.train.dataset import frequent_token_ids, teacher_top_k
from hsd_jax.train.distill import DraftSpec, TrainConfig, distill, distill_loss, init_draft

VOCAB = 64


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    target = family(vocab=VOCAB, layers=4)[-1]
    return save_model(tmp_path_factory.mktemp("distill") / "target", target)


@pytest.fixture(scope="module")
def data_path(target_dir, tmp_path_factory):
    rng = np.random.default_rng(0)
    n, width = 24, 20
    tokens = rng.integers(0, VOCAB // 2, (n, width)).astype(np.int32)  # half the vocab is never used
    lengths = rng.integers(12, width + 1, n).astype(np.int32)
    ids, logp = teacher_top_k(load_model(target_dir, layout="stacked"), tokens, lengths, 8, progress=False)
    path = tmp_path_factory.mktemp("data") / "data.npz"
    np.savez(path, tokens=tokens, lengths=lengths, answer_start=np.full(n, 5, np.int32),
             teacher_ids=ids, teacher_logp=logp.astype(np.float16), prompts=np.array(["p"] * n))
    return path


def test_subset_head_gives_zero_probability_outside(target_dir):
    target = load_model(target_dir, layout="stacked")
    head_ids = np.arange(0, VOCAB, 2, dtype=np.int32)
    draft = init_draft(target, DraftSpec((0, 3), len(head_ids)), head_ids, embedding_source="../target")
    logits, _ = draft.step(jnp.array([[1, 2, 3]]), draft.init_cache(1, 8))
    probs = jax.nn.softmax(logits, axis=-1)
    assert float(jnp.max(probs[..., 1::2])) == 0.0
    np.testing.assert_allclose(np.asarray(jnp.sum(probs[..., ::2], -1)), 1.0, rtol=1e-5)
    # the covered logits are exactly the target's head restricted to head_ids (same layers 0, 3)
    full = target.params["embed"]
    assert draft.params["lm_head"].shape == (full.shape[1], len(head_ids))


def _loss(model, data) -> float:
    """The distillation loss of `model` on the whole tiny dataset."""
    frozen = {k: model.params[k] for k in ("embed", "head_ids")}
    trainable = {k: v for k, v in model.params.items() if k not in frozen}
    width = data["tokens"].shape[1]
    mask = ((np.arange(width)[None] >= data["answer_start"][:, None] - 1)
            & (np.arange(width)[None] < data["lengths"][:, None] - 1)).astype(np.float32)
    return float(distill_loss(trainable, frozen, model.config, jnp.asarray(data["tokens"]), jnp.asarray(mask),
                              jnp.asarray(data["teacher_ids"]), jnp.asarray(data["teacher_logp"])))


def test_distill_runs_resumes_lowers_the_loss_and_loads(target_dir, data_path, tmp_path):
    out, work = tmp_path / "draft", tmp_path / "work"
    spec = DraftSpec(layers=(0,), head_vocab_size=40)
    data = dict(np.load(data_path))
    initial = init_draft(
        load_model(target_dir, layout="stacked"),
        spec,
        frequent_token_ids(data, 40, always=[0]),
        embedding_source="../target",
    )
    train = dict(batch_size=6, warmup_steps=1, learning_rate=3e-3, checkpoint_every=2)
    first = distill(
        target_dir, data_path, out, spec, TrainConfig(steps=4, **train), work_dir=work, progress=False
    )
    assert first["resumed_from"] == 0 and len(first["loss"]) == 1
    assert sorted(int(p.name) for p in work.iterdir() if p.name.isdigit()) == [2, 4]
    second = distill(target_dir, data_path, out, spec, TrainConfig(steps=16, **train), work_dir=work,
                     progress=False, overwrite=True)
    assert second["resumed_from"] == 4
    assert json.loads((out / "distill_summary.json").read_text())["steps"] == 16
    assert _loss(load_model(out, layout="stacked"), data) < 0.8 * _loss(initial, data)

    assert load_model(out).dtype == jnp.bfloat16  # stored bfloat16, loaded as stored
    draft = load_model(out, dtype=jnp.float32)  # without the embedding: upcast and re-joined
    assert draft.dtype == jnp.float32
    assert not (out / "params" / "embed").exists()
    np.testing.assert_array_equal(np.asarray(draft.params["embed"]),
                                  np.asarray(load_model(target_dir).params["embed"]))
    assert draft.config.head_vocab_size == 40 and draft.config.num_layers == 1

    target = load_model(target_dir)
    prompt, lengths = np.array([[1, 2, 3, 4, 5]]), np.array([5])
    want = ar_generate(target, prompt, lengths, jax.random.PRNGKey(0), max_new_tokens=16)
    got = hsd_generate(Hierarchy([draft, quantize_int8(target), target], (3, 4)), prompt, lengths,
                       jax.random.PRNGKey(0), max_new_tokens=16)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    # an int8 copy of the subset-head draft is a family member too (`int8:DIR`)
    draft8 = quantize_int8(draft)
    logits8, _ = draft8.step(prompt, draft8.init_cache(1, 8))
    assert (
        float(
            jnp.max(
                jax.nn.softmax(logits8, -1)[..., np.setdiff1d(np.arange(VOCAB), draft.params["head_ids"])]
            )
        )
        == 0
    )
    got8 = hsd_generate(
        Hierarchy([draft8, target], (3,)), prompt, lengths, jax.random.PRNGKey(0), max_new_tokens=16
    )
    np.testing.assert_array_equal(np.asarray(got8.tokens), np.asarray(want.tokens))


def test_frequent_ids_cover_the_answers_and_keep_eos(data_path):
    data = dict(np.load(data_path))
    ids = frequent_token_ids(data, 10, always=[VOCAB - 1])
    assert len(ids) == 10 and VOCAB - 1 in ids and list(ids) == sorted(ids)


def test_bad_layers_and_missing_embedding_source(target_dir, tmp_path):
    target = load_model(target_dir, layout="stacked")
    with pytest.raises(ValueError, match="target layers \\[7\\] do not exist"):
        init_draft(target, DraftSpec((0, 7), 8), np.arange(8), embedding_source="../target")
    draft = init_draft(
        target, DraftSpec((0,), 8), np.arange(8, dtype=np.int32), embedding_source="../nowhere"
    )
    save_model(tmp_path / "lonely", draft)
    with pytest.raises(FileNotFoundError, match="shares the input embedding"):
        load_model(tmp_path / "lonely")
    with pytest.raises(ValueError, match="comma-separated"):
        DraftSpec.parse("a,b", 8)


def test_length_bucketed_batches_cover_each_epoch_once_and_are_reproducible():
    from hsd_jax.train.distill import _bucket_width, length_bucketed_batches

    bucket = TrainConfig().width_bucket  # the default: 32
    lengths = np.random.default_rng(1).integers(5, 200, 100)
    batches = length_bucketed_batches(lengths, 4, 60, seed=3)
    assert batches.shape == (60, 4)
    np.testing.assert_array_equal(batches, length_bucketed_batches(lengths, 4, 60, seed=3))  # resume-safe
    epoch = batches[:25].ravel()  # 100 rows, batch 4: the first epoch is 25 batches, each row once
    np.testing.assert_array_equal(np.sort(epoch), np.arange(100))
    # batches of length-sorted pools pad far less than random ones
    padded = sum(_bucket_width(int(lengths[b].max()), 256, bucket) * len(b) for b in batches[:25])
    shuffled = np.random.default_rng(0).permutation(100).reshape(25, 4)
    padded_random = sum(_bucket_width(int(lengths[b].max()), 256, bucket) * len(b) for b in shuffled)
    assert padded < 0.8 * padded_random
    assert _bucket_width(33, 256, bucket) == 64 and _bucket_width(250, 240, bucket) == 240
    assert _bucket_width(33, 256, bucket=1024) == 256 and _bucket_width(33, 256, bucket=1) == 33


def test_several_data_files_train_as_one(data_path, tmp_path):
    from hsd_jax.train.dataset import load_dataset

    one = dict(np.load(data_path))
    narrow = {k: (v[:, :15] if k in ("tokens", "teacher_ids", "teacher_logp") else v) for k, v in one.items()}
    narrow["lengths"] = np.minimum(one["lengths"], 15)
    np.savez(tmp_path / "narrow.npz", **narrow)
    both = load_dataset([data_path, tmp_path / "narrow.npz"])
    n, width = one["tokens"].shape
    assert both["tokens"].shape == (2 * n, width) and both["teacher_logp"].shape[:2] == (2 * n, width)
    np.testing.assert_array_equal(both["tokens"][:n], one["tokens"])
    np.testing.assert_array_equal(both["tokens"][n:, :15], narrow["tokens"])
    assert not both["tokens"][n:, 15:].any()  # the narrower file is zero-padded
    np.testing.assert_array_equal(both["lengths"][n:], narrow["lengths"])
    with pytest.raises(ValueError, match="no distillation data"):
        load_dataset([])


def test_distill_removes_its_default_work_dir(target_dir, data_path, tmp_path):
    """Without --work-dir the checkpoints live in OUT_DIR.work, removed once the draft is written."""
    out = tmp_path / "draft"
    spec = DraftSpec(layers=(0,), head_vocab_size=40)
    distill(target_dir, data_path, out, spec, TrainConfig(steps=2, batch_size=6, warmup_steps=0,
                                                          checkpoint_every=1), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft"]
    load_model(out)


def test_milestones_and_resuming_from_a_committed_draft(target_dir, data_path, tmp_path, monkeypatch):
    """A run writes its bf16 draft every `milestone_every` steps; another run (no work dir: another
    machine) continues from that draft's weights and step count with a fresh optimizer."""
    import hsd_jax.train.distill as distill_module

    written = []
    real_write_json = distill_module.write_json

    def record(path, data, *args, **kwargs):
        written.append(data["steps_done"])
        return real_write_json(path, data, *args, **kwargs)

    monkeypatch.setattr(distill_module, "write_json", record)
    spec = DraftSpec(layers=(0,), head_vocab_size=40)
    train = dict(batch_size=6, warmup_steps=1, learning_rate=3e-3, checkpoint_every=2)
    milestone = tmp_path / "milestone"
    first = distill(target_dir, data_path, milestone, spec,
                    TrainConfig(steps=6, milestone_every=2, **train), progress=False)
    assert written == [2, 4, 6] and first["steps_done"] == 6 and first["resumed_with"] == "nothing"
    assert not (tmp_path / "milestone.work").exists()  # the default work dir is gone: the draft remains

    data = dict(np.load(data_path))
    committed = load_model(milestone, layout="stacked")
    resumed = distill(target_dir, data_path, tmp_path / "resumed", spec,
                      TrainConfig(steps=14, rewarm_steps=3, **train), resume_from=milestone, progress=False)
    assert resumed["resumed_from"] == 6
    assert resumed["resumed_with"] == "draft weights at step 6, fresh optimizer"
    assert [step for step, _ in resumed["loss"]] == [10, 14]
    assert [(h["resumed_from"], h["steps_done"]) for h in resumed["history"]] == [(0, 6), (6, 14)]
    after = load_model(tmp_path / "resumed", layout="stacked")
    np.testing.assert_array_equal(np.asarray(after.params["head_ids"]),
                                  np.asarray(committed.params["head_ids"]))
    assert _loss(after, data) < _loss(committed, data)
    with pytest.raises(ValueError, match="already trained 6 steps"):
        distill(target_dir, data_path, tmp_path / "again", spec, TrainConfig(steps=6, **train),
                resume_from=milestone, progress=False)
    with pytest.raises(ValueError, match="has 1 layers but --layers names 2"):
        distill(target_dir, data_path, tmp_path / "again", DraftSpec((0, 1), 40),
                TrainConfig(steps=8, **train), resume_from=milestone, progress=False)


def test_kept_milestones_are_drafts_of_their_own(target_dir, data_path, tmp_path):
    spec = DraftSpec(layers=(0,), head_vocab_size=40)
    train = dict(batch_size=6, warmup_steps=1, learning_rate=3e-3, checkpoint_every=2, milestone_every=2)
    distill(target_dir, data_path, tmp_path / "d", spec, TrainConfig(steps=4, keep_milestones=True, **train),
            progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("d")) == ["d", "d-step2"]
    # the embedding link holds; the stored layout (a bf16 draft on a CPU runs packed for the kernel)
    kept, final = (load_model(tmp_path / name, layout="stacked") for name in ("d-step2", "d"))
    assert json.loads((tmp_path / "d-step2" / "distill_summary.json").read_text())["steps_done"] == 2
    assert not np.array_equal(np.asarray(kept.params["lm_head"]), np.asarray(final.params["lm_head"]))
    with pytest.raises(ValueError, match="--keep-milestones needs --milestone-every"):
        TrainConfig(steps=4, warmup_steps=1, keep_milestones=True)


def test_the_rewarm_schedule_continues_the_cosine():
    from hsd_jax.train.distill import learning_rate

    cfg = TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3, rewarm_steps=4)
    fresh, resumed = learning_rate(cfg), learning_rate(cfg, rewarm_from=50)
    assert float(fresh(0)) == 0.0 and float(fresh(10)) == pytest.approx(1e-3)
    assert float(resumed(0)) == pytest.approx(float(fresh(50)) / 4)
    assert float(resumed(3)) == pytest.approx(float(fresh(53)))
    assert float(resumed(30)) == pytest.approx(float(fresh(80)))


def test_bf16_products_train_the_float32_master(target_dir, data_path):
    data = dict(np.load(data_path))
    target = load_model(target_dir, layout="stacked")
    draft = init_draft(target, DraftSpec((0, 1), 40), frequent_token_ids(data, 40, always=[0]),
                       embedding_source="../target")
    frozen = {k: draft.params[k] for k in ("embed", "head_ids")}
    trainable = {k: v for k, v in draft.params.items() if k not in frozen}
    width = data["tokens"].shape[1]
    mask = ((np.arange(width)[None] >= data["answer_start"][:, None] - 1)
            & (np.arange(width)[None] < data["lengths"][:, None] - 1)).astype(np.float32)
    args = (draft.config, jnp.asarray(data["tokens"]), jnp.asarray(mask), jnp.asarray(data["teacher_ids"]),
            jnp.asarray(data["teacher_logp"]))
    grad = jax.grad(distill_loss)
    f32, bf16 = grad(trainable, frozen, *args), grad(trainable, frozen, *args, jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(f32), jax.tree.leaves(bf16)):
        assert b.dtype == jnp.float32
        cosine = float(jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30))
        assert cosine > 0.98, cosine
    loss32 = float(distill_loss(trainable, frozen, *args))
    loss16 = float(distill_loss(trainable, frozen, *args, jnp.bfloat16))
    assert abs(loss16 - loss32) < 0.03 * loss32


def test_resuming_on_grown_data_keeps_the_heads_token_ids(target_dir, data_path, tmp_path):
    """The work dir resumes with the ids the head was trained on, even when the (grown) data would
    pick other frequent tokens today."""
    data = dict(np.load(data_path))
    shifted = {**data, "teacher_ids": (data["teacher_ids"] + 17) % VOCAB}
    other = tmp_path / "other.npz"
    np.savez(other, **shifted)
    assert set(frequent_token_ids(shifted, 20, always=[0])) != set(frequent_token_ids(data, 20, always=[0]))
    spec, work = DraftSpec(layers=(0,), head_vocab_size=20), tmp_path / "work"
    train = dict(batch_size=6, warmup_steps=1, checkpoint_every=2)
    distill(target_dir, data_path, tmp_path / "a", spec, TrainConfig(steps=4, **train), work_dir=work,
            progress=False)
    first = np.asarray(load_model(tmp_path / "a").params["head_ids"])
    resumed = distill(target_dir, [data_path, other], tmp_path / "b", spec, TrainConfig(steps=6, **train),
                      work_dir=work, progress=False)
    assert resumed["resumed_from"] == 4 and resumed["resumed_with"] == "optimizer state"
    np.testing.assert_array_equal(np.asarray(load_model(tmp_path / "b").params["head_ids"]), first)


def test_a_shipped_copy_at_another_depth_keeps_its_shared_embedding(target_dir, data_path, tmp_path):
    """`scripts/ship_draft.py` re-points the relative embedding link of a draft copied elsewhere;
    the copy loads to the same weights and carries the training summary (with its machine)."""
    made = tmp_path / "runs" / "gpu" / "draft"
    distill(target_dir, data_path, made, DraftSpec(layers=(0,), head_vocab_size=40),
            TrainConfig(steps=2, batch_size=6, warmup_steps=0), progress=False)
    shipped = tmp_path / "shipped"
    subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts" / "ship_draft.py"), str(made),
                    str(shipped)], check=True, capture_output=True)
    a, b = load_model(made), load_model(shipped)
    assert b.config.embedding_source == os.path.relpath(target_dir, shipped)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a.params, b.params))
    summary = json.loads((shipped / "distill_summary.json").read_text())
    assert summary == json.loads((made / "distill_summary.json").read_text()) and summary["machine"]
