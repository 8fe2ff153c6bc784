"""Distil small drafts for a target that has no small sibling (optax, orbax, offline data).

1. the data (`train.dataset`, `train.magpie`): the target's answers and its cached top-k
   next-token log-probabilities.
2. `init_draft`: a draft built from a subset of the target's layers, sharing its (frozen) input
   embedding and predicting only a frequent-token subset of the vocabulary (q = 0 elsewhere,
   which speculative verification handles losslessly).
3. `distill`: minimise KL(p_target || q_draft) over the cached top-k support with AdamW and a
   warmup + cosine schedule, saving an orbax checkpoint every N steps and resuming from the
   latest one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from hsd_jax.io.checkpoint import embedding_fingerprint, load_model, save_model
from hsd_jax.io.files import check_output_dir, write_json
from hsd_jax.models import INTEGER_PARAMS, Model, Params, hidden_states, stack_layers
from hsd_jax.models.ops import dense
from hsd_jax.train.dataset import answer_mask, frequent_token_ids, load_dataset

FROZEN = ("embed",) + INTEGER_PARAMS


# ------------------------------------------------------------------------------ the draft


@dataclasses.dataclass(frozen=True)
class DraftSpec:
    """Which target layers initialise the draft, and how many frequent tokens its head covers."""

    layers: tuple[int, ...]
    head_vocab_size: int = 8192

    @classmethod
    def parse(cls, layers: str, head_vocab_size: int) -> DraftSpec:
        try:
            ids = tuple(int(x) for x in layers.split(",") if x.strip())
        except ValueError:
            raise ValueError(
                f"--layers must be comma-separated target layer indices, got {layers!r}"
            ) from None
        if not ids:
            raise ValueError("--layers needs at least one target layer index")
        return cls(ids, head_vocab_size)


def init_draft(target: Model, spec: DraftSpec, head_ids: np.ndarray, embedding_source: str) -> Model:
    """A draft whose layers copy the target's `spec.layers`, whose head is the target's head
    restricted to `head_ids`, and which shares the target's input embedding."""
    config = target.config
    bad = [i for i in spec.layers if not 0 <= i < config.num_layers]
    if bad:
        raise ValueError(
            f"target layers {bad} do not exist; the target has layers 0..{config.num_layers - 1}"
        )
    params = stack_layers(target.params, config)
    head = params["lm_head"] if "lm_head" in params else params["embed"].T
    draft_config = dataclasses.replace(
        config, num_layers=len(spec.layers), tie_word_embeddings=False, head_vocab_size=len(head_ids),
        embedding_source=embedding_source, embedding_sha256=embedding_fingerprint(params["embed"]))
    index = jnp.asarray(spec.layers)
    draft = {"embed": params["embed"], "layers": jax.tree.map(lambda x: x[index], params["layers"]),
             "final_norm": params["final_norm"], "lm_head": jnp.asarray(head)[:, head_ids],
             "head_ids": jnp.asarray(head_ids, jnp.int32)}
    if "pos_embed" in params:
        draft["pos_embed"] = params["pos_embed"]
    return Model(params=draft, config=draft_config)


# ---------------------------------------------------------------------------- the training


def _split(params: Params) -> tuple[Params, Params]:
    trainable = {k: v for k, v in params.items() if k not in FROZEN}
    frozen = {k: v for k, v in params.items() if k in FROZEN}
    return trainable, frozen


def distill_loss(
    trainable: Params, frozen: Params, config, tokens, mask, teacher_ids, teacher_logp, compute_dtype=None
) -> jax.Array:
    """Mean over answer positions of KL(p || q) on the teacher's top-k support.

    p is the teacher's top-k renormalised over the ids the draft's head covers (the rest of p's
    mass is a constant for the draft); q is the draft's softmax over its head. `compute_dtype`
    (e.g. bfloat16) casts the float weights for the products, which accumulate in float32; the
    gradient flows back to the float32 master weights.
    """
    params = {**trainable, **frozen}
    if compute_dtype is not None:
        cast = lambda x: x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
        params = jax.tree.map(cast, params)
    cache = Model(params, config).init_cache(tokens.shape[0], tokens.shape[1])
    x, _ = hidden_states(params, config, tokens, cache)
    log_q = jax.nn.log_softmax(dense(x, params["lm_head"], out_dtype=jnp.float32), axis=-1)
    to_head = jnp.full((config.vocab_size,), -1, jnp.int32).at[params["head_ids"]].set(
        jnp.arange(config.head_vocab_size, dtype=jnp.int32))
    head_index = to_head[teacher_ids]
    covered = head_index >= 0
    # p renormalised over the covered ids; a position with none covered contributes nothing
    logp = jnp.where(covered, teacher_logp.astype(jnp.float32), -1e30)
    logp = logp - jax.nn.logsumexp(logp, axis=-1, keepdims=True)
    p = jnp.where(covered, jnp.exp(logp), 0.0)
    log_q_at = jnp.take_along_axis(log_q, jnp.maximum(head_index, 0), axis=-1)
    kl = jnp.sum(jnp.where(covered, p * (logp - log_q_at), 0.0), axis=-1)
    mask = mask * jnp.any(covered, axis=-1)
    return jnp.sum(jnp.where(mask > 0, kl, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    checkpoint_every: int = 100
    seed: int = 0
    compute_dtype: str = "float32"  # or "bfloat16": weights cast for the products (f32 master copy)
    milestone_every: int = 0  # > 0: write the bf16 draft to OUT_DIR every this many steps
    keep_milestones: bool = False  # each milestone also stays beside OUT_DIR, as OUT_DIR-stepN
    # batches pad to a multiple of this (few compiles); on an accelerator, where a draft's step costs
    # little more at full width and each compile costs seconds, a large one (one width) is faster
    width_bucket: int = 32
    rewarm_steps: int = 100  # warm-up when resuming from a draft without its optimizer state

    def __post_init__(self):
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute dtype must be float32 or bfloat16, got {self.compute_dtype!r}")
        for name, least in (("milestone_every", 0), ("rewarm_steps", 0), ("steps", 1), ("batch_size", 1),
                            ("checkpoint_every", 1), ("width_bucket", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {least}, got {value!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"--warmup ({self.warmup_steps}) must be in [0, --steps) = [0, {self.steps}); "
                             "lower --warmup or raise --steps")
        if self.keep_milestones and not self.milestone_every:
            raise ValueError("--keep-milestones needs --milestone-every N (the steps to keep a milestone at)")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning-rate must be > 0, got {self.learning_rate}")


def _bucket_width(length: int, full_width: int, bucket: int) -> int:
    """A batch's padded width: its longest row rounded up to a multiple of `bucket` (one compile
    per width: a larger bucket pads more and compiles less)."""
    return min(-(-length // bucket) * bucket, full_width)


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Row indices [steps, batch_size]: each epoch is shuffled, cut into pools of 16 batches, each
    pool sorted by length and split into batches, and the batches shuffled, so a batch pads to
    its own longest row rather than the corpus's. A function of the seed alone: a resumed run
    continues with the same batches."""
    rng = np.random.default_rng(seed)
    n, pool = len(lengths), 16 * batch_size
    batches: list[np.ndarray] = []
    while len(batches) < steps:
        order = rng.permutation(n)
        epoch = []
        for first in range(0, n - batch_size + 1, pool):
            chunk = order[first:first + pool]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            epoch += [chunk[j:j + batch_size] for j in range(0, len(chunk) - batch_size + 1, batch_size)]
        if not epoch:  # fewer rows than one batch: sample with replacement
            epoch = [rng.choice(n, batch_size)]
        batches += [epoch[j] for j in rng.permutation(len(epoch))]
    return np.stack(batches[:steps])


def learning_rate(cfg: TrainConfig, rewarm_from: int | None = None) -> optax.Schedule:
    """Warm-up + cosine over `cfg.steps`. Resumed at step `rewarm_from` without the optimizer's
    moments, the schedule continues from there behind a fresh linear warm-up of `cfg.rewarm_steps`
    (optax counts from 0 again, hence the shift)."""
    base = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps,
                                              end_value=cfg.learning_rate * 0.05)
    if rewarm_from is None:
        return base
    return lambda count: base(count + rewarm_from) * jnp.minimum(1.0, (count + 1) / max(cfg.rewarm_steps, 1))


def _optimizer(cfg: TrainConfig, rewarm_from: int | None = None) -> optax.GradientTransformation:
    schedule = learning_rate(cfg, rewarm_from)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))


def _resume_point(draft_dir: Path, target: Model, spec: DraftSpec) -> tuple[Params, int]:
    """A committed draft's float32 weights and the step it was written at (its summary's
    `steps_done`): the start of a run that has the draft but not its optimizer state."""
    draft = load_model(draft_dir, dtype=jnp.float32, layout="stacked")
    if draft.config.num_layers != len(spec.layers):
        raise ValueError(f"{draft_dir} has {draft.config.num_layers} layers but --layers names "
                         f"{len(spec.layers)}; resume with the draft's own --layers")
    if draft.config.embedding_sha256 != embedding_fingerprint(target.params["embed"]):
        raise ValueError(f"{draft_dir} was trained for another target (its embedding differs); resume it "
                         "with its own target")
    try:
        summary = json.loads((draft_dir / "distill_summary.json").read_text())
        done = int(summary.get("steps_done", summary["steps"]))  # older summaries: written at the end
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{draft_dir}/distill_summary.json does not say how many steps the draft has "
                         f"trained ({e}); it cannot be resumed") from None
    return draft.params, done


# "steps": the cosine's horizon in that run (a run resumed with another --steps re-sizes it)
_SEGMENT_FIELDS = ("resumed_from", "steps_done", "steps", "resumed_with", "answer_tokens_seen", "wall_s",
                   "machine", "data", "data_answer_tokens")


def _segment(summary: dict[str, Any]) -> dict[str, Any]:
    """One run's line in a draft's training history."""
    return {k: summary.get(k, summary.get("steps") if k == "steps_done" else None) for k in _SEGMENT_FIELDS}


def _history(directory: Path, start: int) -> list[dict[str, Any]]:
    """The runs a draft trained in before this one (steps, data, wall time): those the summary in
    `directory` records, when that summary ends at or before the step this run starts from."""
    if not start:
        return []
    try:
        prior = json.loads((directory / "distill_summary.json").read_text())
    except (OSError, ValueError):
        return []
    ended = prior.get("steps_done", prior.get("steps")) if isinstance(prior, dict) else None
    # a work dir resumes at its last checkpoint, which may lie past OUT_DIR's last milestone
    if not isinstance(ended, int) or ended > start:
        return []
    return list(prior.get("history") or [_segment(prior)])


def distill(
    target_dir: str | Path,
    data_path: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    spec: DraftSpec,
    train: TrainConfig,
    *,
    work_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a draft and save it as an hsd-jax model directory.

    Resuming, in order of preference:
    - from `work_dir` (default OUT_DIR.work, removed once the draft is written; a given `work_dir`
      is kept): orbax checkpoints of the weights *and* the optimizer state, every
      `checkpoint_every` steps; the run continues exactly (same data: same batches).
    - from `resume_from`, a draft directory this function wrote (a milestone, e.g. a committed
      one): its bf16 weights and step count, a fresh AdamW state, and the schedule continued from
      that step behind a `rewarm_steps` warm-up. Its head's token ids are kept.

    With `train.milestone_every`, the bf16 draft is written to OUT_DIR every that many steps, so
    OUT_DIR is always a loadable, resumable draft. Returns a summary: steps, tokens seen, wall
    time, losses.
    """
    out_dir = check_output_dir(out_dir, overwrite)  # before the training, not after it
    default_work = work_dir is None
    work_dir = Path(work_dir) if work_dir is not None else out_dir.with_name(out_dir.name + ".work")
    data_paths = [data_path] if isinstance(data_path, (str, Path)) else list(data_path)
    data = load_dataset(data_paths)
    target = load_model(target_dir, layout="stacked")
    embedding_source = os.path.relpath(Path(target_dir).resolve(), out_dir.resolve())
    manager = ocp.CheckpointManager(work_dir.absolute(), options=ocp.CheckpointManagerOptions(
        max_to_keep=2, save_interval_steps=train.checkpoint_every))
    start, origin, resumed_with = 0, 0, "nothing"
    if resume_from is not None and manager.latest_step() is None:
        resumed, start = _resume_point(Path(resume_from), target, spec)
        origin, resumed_with = start, f"draft weights at step {start}, fresh optimizer"
        head_ids = np.asarray(resumed["head_ids"])
    else:
        head_ids = frequent_token_ids(data, spec.head_vocab_size, always=[target.config.eos_token_id or 0])
    draft = init_draft(target, dataclasses.replace(spec, head_vocab_size=len(head_ids)), head_ids,
                       embedding_source=embedding_source)
    del target
    if origin:
        trained = {k: v for k, v in resumed.items() if k not in FROZEN}
        draft = draft.replace(params={**draft.params, **trained})
    trainable, frozen = _split(draft.params)
    # head_ids ride in the checkpoint: resumed on grown data, the head keeps the ids it was trained on
    state = {"params": trainable, "opt_state": _optimizer(train).init(trainable), "origin": jnp.int32(origin),
             "head_ids": frozen["head_ids"]}
    if manager.latest_step() is not None:
        start, resumed_with = manager.latest_step(), "optimizer state"
        state = manager.restore(start, args=ocp.args.StandardRestore(state))
        origin = int(state["origin"])
        head_ids = np.asarray(state["head_ids"])
        frozen = {**frozen, "head_ids": state["head_ids"]}
    if start >= train.steps:
        raise ValueError(f"the draft has already trained {start} steps, not fewer than --steps "
                         f"{train.steps}; raise --steps to train it further")
    optimizer = _optimizer(train, origin or None)

    mask_all = answer_mask(data).astype(np.float32)
    config = draft.config
    compute_dtype = None if train.compute_dtype == "float32" else jnp.dtype(train.compute_dtype)

    @jax.jit
    def step(state, frozen, tokens, mask, ids, logp):
        loss, grads = jax.value_and_grad(distill_loss)(
            state["params"], frozen, config, tokens, mask, ids, logp, compute_dtype
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {**state, "params": params, "opt_state": opt_state}, loss

    n = data["tokens"].shape[0]
    batches = length_bucketed_batches(data["lengths"], train.batch_size, train.steps, train.seed)
    loss_history, tokens_seen, began = [], 0, time.perf_counter()
    device = jax.devices()[0]
    machine = f"{jax.device_count()}x {device.device_kind} (jax {jax.__version__}, {device.platform})"

    earlier = _history(Path(resume_from) if origin and start == origin else out_dir, start)

    def summary(done: int) -> dict[str, Any]:
        record = {
            "steps": train.steps,
            "steps_done": done,
            "resumed_from": start,
            "resumed_with": resumed_with,
            "schedule_origin": origin,  # > 0: the step a fresh optimizer took over at (re-warmed there)
            "answer_tokens_seen": tokens_seen,
            "wall_s": time.perf_counter() - began,
            "machine": machine,
            "loss": loss_history,
            "layers": list(spec.layers),
            "head_vocab_size": len(head_ids),
            "train": dataclasses.asdict(train),
            "data": [str(p) for p in data_paths],
            "data_answer_tokens": int(mask_all.sum()),
            "data_sequences": int(n),
            "data_parts": [
                {"answer_temperature": round(float(t), 6), "sequences": int(np.sum(part)),
                 "answer_tokens": int(mask_all[part].sum())}
                for t, part in ((t, data["temperature"] == t) for t in np.unique(data["temperature"]))
            ],
        }
        return {**record, "history": earlier + [_segment(record)]}

    def write_draft(done: int) -> dict[str, Any]:
        bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x,
                            {**state["params"], **frozen})
        record = summary(done)
        # a sibling sits at OUT_DIR's depth, so the relative link to the shared embedding holds there too
        keep = train.keep_milestones and done < train.steps
        kept = [out_dir.with_name(f"{out_dir.name}-step{done}")] if keep else []
        for directory in [out_dir, *kept]:
            save_model(directory, Model(params=bf16, config=config), tokenizer_source_dir=Path(target_dir),
                       overwrite=True)
            write_json(directory / "distill_summary.json", record)
        return record

    bar = tqdm(range(start, train.steps), initial=start, total=train.steps, desc="distil",
               disable=not progress)
    for i in bar:
        rows = batches[i]
        width = _bucket_width(int(data["lengths"][rows].max()), data["tokens"].shape[1], train.width_bucket)
        mask = mask_all[rows, :width]
        state, loss = step(
            state,
            frozen,
            jnp.asarray(data["tokens"][rows, :width]),
            jnp.asarray(mask),
            jnp.asarray(data["teacher_ids"][rows, :width]),
            jnp.asarray(data["teacher_logp"][rows, :width]),
        )
        tokens_seen += int(mask.sum())
        manager.save(i + 1, args=ocp.args.StandardSave(state))
        if (i + 1) % 10 == 0 or i + 1 == train.steps:
            loss_history.append((i + 1, float(loss)))
            bar.set_postfix(
                loss=f"{float(loss):.3f}", tok_s=f"{tokens_seen / (time.perf_counter() - began):.0f}"
            )
        if train.milestone_every and (i + 1) % train.milestone_every == 0 and i + 1 < train.steps:
            write_draft(i + 1)
    manager.wait_until_finished()
    record = write_draft(train.steps)
    if default_work:
        shutil.rmtree(work_dir, ignore_errors=True)
    return record
