"""Distillation data: a target's answers with its cached top-k next-token log-probabilities.

`make_dataset` answers a list of prompts (greedy `ar_generate` in batches, then one
teacher-forced pass for the top-k); `hsd-jax make-data` (`train.magpie`) writes the same rows
as shards while it decodes. `load_dataset` reads a file, a shard directory, or several of them
as one set of rows; `answer_mask` marks the positions whose next token is part of an answer.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hsd_jax.decoding.ar import ar_generate
from hsd_jax.io.checkpoint import encode_prompt, load_model, load_tokenizer
from hsd_jax.io.files import write_bytes
from hsd_jax.io.prompts import pad_prompts
from hsd_jax.models import Model
from hsd_jax.train.magpie import SHARD, shard_paths


def make_dataset(target_dir: str | Path, prompts: Sequence[str], out_path: str | Path, *,
                 max_new_tokens: int = 128, batch_size: int = 32, top_k: int = 32, temperature: float = 0.0,
                 seed: int = 0, progress: bool = True) -> Path:
    """The target's answers to `prompts` (greedy, or sampled at `temperature` for more varied
    text) and its cached top-k log-probabilities.

    Writes an .npz with tokens [N, S] (prompt + answer), lengths [N], answer_start [N] and, for
    every position t, the target's top-k next-token ids and log-probabilities (teacher_ids,
    teacher_logp [N, S, k]).
    """
    target = load_model(target_dir)
    tokenizer = load_tokenizer(target_dir)
    eos = target.config.eos_token_id
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = np.argsort([len(e) for e in encoded], kind="stable")
    sequences, starts = [None] * len(encoded), [0] * len(encoded)
    key = jax.random.PRNGKey(seed)
    bar = tqdm(total=len(encoded), desc="target answers", unit="prompt", disable=not progress)
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        prompt_tokens, prompt_lengths = pad_prompts([encoded[i] for i in batch])
        out = ar_generate(target, prompt_tokens, prompt_lengths, jax.random.fold_in(key, first),
                          max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=eos)
        tokens, counts = np.asarray(out.tokens), np.asarray(out.num_tokens)
        for j, i in enumerate(batch):
            sequences[i] = encoded[i] + tokens[j, :counts[j]].tolist()
            starts[i] = len(encoded[i])
        bar.update(len(batch))
    bar.close()
    tokens, lengths = pad_prompts(sequences, bucket=1)
    teacher_ids, teacher_logp = teacher_top_k(target, tokens, lengths, top_k, batch_size=8, progress=progress)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, tokens=tokens, lengths=lengths, answer_start=np.array(starts, np.int32),
                        teacher_ids=teacher_ids, teacher_logp=teacher_logp.astype(np.float16),
                        prompts=np.array(list(prompts)), temperature=np.float32(temperature))
    return write_bytes(out_path, buffer.getvalue())


def teacher_top_k(target: Model, tokens: np.ndarray, lengths: np.ndarray, k: int, *, batch_size: int = 8,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Top-k next-token (ids, log-probabilities) of the target at every position [N, S, k]."""

    @jax.jit
    def top(model, tokens):
        logits, _ = model.step(tokens, model.init_cache(tokens.shape[0], tokens.shape[1]))
        values, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)
        return ids.astype(jnp.int32), values

    n, width = tokens.shape
    ids_out = np.zeros((n, width, k), np.int32)
    logp_out = np.zeros((n, width, k), np.float32)
    for first in tqdm(range(0, n, batch_size), desc="teacher top-k", disable=not progress):
        chunk = tokens[first:first + batch_size]
        padded = np.zeros((batch_size, width), np.int32)
        padded[:len(chunk)] = chunk
        ids, logp = top(target, jnp.asarray(padded))
        ids_out[first:first + len(chunk)] = np.asarray(ids)[:len(chunk)]
        logp_out[first:first + len(chunk)] = np.asarray(logp)[:len(chunk)]
    return ids_out, logp_out


def frequent_token_ids(data: dict[str, np.ndarray], size: int, always: Sequence[int] = ()) -> np.ndarray:
    """The `size` token ids the target most often puts in its top-k on the answers (ties by id),
    plus the `always` ids (e.g. EOS), sorted."""
    valid = answer_mask(data)
    counts = np.bincount(data["teacher_ids"][valid].ravel(), minlength=1)
    counts = np.pad(counts, (0, max(0, max(always, default=0) + 1 - len(counts))))
    counts[list(always)] = counts.max() + 1
    chosen = np.argsort(-counts, kind="stable")[:size]
    return np.sort(chosen).astype(np.int32)


def answer_mask(data: dict[str, np.ndarray]) -> np.ndarray:
    """Positions whose next token is part of an answer: answer_start-1 .. length-2."""
    pos = np.arange(data["tokens"].shape[1])[None, :]
    return (pos >= data["answer_start"][:, None] - 1) & (pos < data["lengths"][:, None] - 1)


SEQUENCE_ARRAYS = ("tokens", "teacher_ids", "teacher_logp")  # [N, S, ...]: padded along S to concatenate


def load_dataset(path: str | Path | Sequence[str | Path]) -> dict[str, np.ndarray]:
    """One data file, a directory of `hsd-jax make-data` shards, or several of either (e.g. greedy
    and sampled answers) as one set of rows."""
    if isinstance(path, (str, Path)) and Path(path).is_dir():
        shards = shard_paths(path)
        if not shards:
            raise ValueError(f"{path} holds no data shards ({SHARD.format(0)}, ...); make them with "
                             "`hsd-jax make-data`")
        path = shards
    if not isinstance(path, (str, Path)):
        parts = [load_dataset(p) for p in path]
        if not parts:
            raise ValueError("no distillation data files given")
        width = max(p["tokens"].shape[1] for p in parts)
        pad = lambda x: np.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
        return {k: np.concatenate([pad(p[k]) if k in SEQUENCE_ARRAYS else p[k] for p in parts])
                for k in ("tokens", "lengths", "answer_start", "teacher_ids", "teacher_logp", "prompts",
                          "temperature")}
    path = Path(path)
    try:
        with np.load(path) as f:
            data = {k: f[k] for k in f.files}
        # one answer temperature per row (files made before it was recorded hold greedy answers)
        data["temperature"] = np.broadcast_to(data.get("temperature", np.float32(0.0)), data["lengths"].shape)
        return data
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read distillation data {path}: {e}; re-create it with `hsd-jax distill "
                         "--make-data`") from e
