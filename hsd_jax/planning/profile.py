"""Profile a model family for the planner (research.md §1, "Inputs to profile").

* c_i(k): median wall time of one k-token forward at a realistic cache size, after compilation;
* alpha_ij for every ordered pair (drafter i cheaper than verifier j): greedy argmax agreement
  and sampling sum_v min(p_i, p_j) at a temperature, over the target's real greedy
  continuations of held-out prompts (teacher-forced, so every model sees the same contexts).
  Both measures are symmetric in (i, j); they are recorded for every ordered pair.

A family member is named by a *source* (`io.sources`): a model directory, `ngram:N` (the n-gram
drafter) or `int8:DIR` (an int8 copy of the model in DIR). The result is a `stats.Stats`.
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hsd_jax.decoding.ar import ar_generate
from hsd_jax.decoding.drafter import Drafter
from hsd_jax.decoding.ngram import NGramDrafter
from hsd_jax.decoding.sampling import SamplingParams, distribution
from hsd_jax.io.checkpoint import encode_prompt, load_tokenizer
from hsd_jax.io.prompts import pad_prompts
from hsd_jax.io.sources import from_source, parse_source
from hsd_jax.models import Model
from hsd_jax.parallel.sharding import shard_levels
from hsd_jax.planning.stats import ModelStats, Stats
from hsd_jax.planning.timing import interleaved_median_seconds

PROMPT_BUCKET = 32  # prompts are right-padded to a multiple of this: few recompiles, same tokens
SCORE_BUCKET = 64  # teacher-forced sequences likewise

Progress = Callable[[str], None] | None
"""Called with a message as each long step starts (the CLI prints them); None: silent."""


def _scorer(level: Drafter, batch: int, size: int, context: int) -> tuple[Callable, Any]:
    """`fn(level, seq [B, size], ends [B, C], state) -> logits [B, C, V]` of the tokens at positions
    `ends` given `seq[:, :ends]`, and the state to call it with (`context` positions already
    cached). A model runs one forward of the C tokens at `ends - 1` (`Model.step`); the n-gram
    drafter has no state and looks them up (its one-hot law as logits 0 / -inf)."""
    if isinstance(level, NGramDrafter):
        return (lambda lv, seq, ends, _: jnp.log(lv.distributions(seq, ends))), None
    cache = level.init_cache(batch, size).with_lengths(jnp.full((batch,), context, jnp.int32))
    return (lambda lv, seq, ends, c: lv.step(jnp.take_along_axis(seq, ends - 1, axis=1), c)[0]), cache


def measure_costs(level: Drafter, max_k: int, *, cache_size: int = 256, context: int = 128,
                  batch: int = 1, repeats: int = 7, sparse_ks: Sequence[int] = ()) -> list[float]:
    """c(k) for k = 1..max(max_k, *sparse_ks): median seconds of one k-token forward (n-gram: its
    lookup) with `context` tokens already cached in a cache of `cache_size` positions, every k
    timed once per round over `repeats` rounds (`interleaved_median_seconds`). Every k up
    to `max_k` is measured; beyond it only `sparse_ks` are, and the k between them are linearly
    interpolated (a table the planner reads densely, without one compile per k)."""
    return measure_family_costs([level], max_k, cache_size=cache_size, context=context, batch=batch,
                                repeats=repeats, sparse_ks=sparse_ks)[0]


def measure_family_costs(levels: Sequence[Drafter], max_k: int, *, cache_size: int = 256,
                         context: int = 128, batch: int = 1, repeats: int = 7,
                         sparse_ks: Sequence[int] = ()) -> list[list[float]]:
    """`measure_costs` of every level, all timed in the same rounds (each round runs every level at
    every k once): a slow spell of the machine, which on 2 shared cores lasts seconds and moved one
    model's c(1) by up to 2x between runs, then falls on every member alike, so the ratios the
    planner reads hold even when the absolute costs move. Each round starts every level's ks one
    k later than the round before, so the call that finds a small model's weights pushed out of
    cache by the others' is a different k each round, not always c(1): in decoding only a draft's
    first forward of a round is such a call, and its single-token steps run warm."""
    ks = cost_ks(max_k, sparse_ks)
    measured = _measure_each(levels, ks, cache_size=cache_size, context=context, batch=batch, repeats=repeats)
    return [np.interp(np.arange(1, ks[-1] + 1), ks, m).tolist() for m in measured]


def cost_ks(max_k: int, sparse_ks: Sequence[int] = ()) -> list[int]:
    """The k whose c(k) `measure_costs` times: 1..max_k, then the sparse ones beyond it."""
    return sorted(set(range(1, max_k + 1)) | {int(k) for k in sparse_ks if k > max_k})


def _forward_as_decoding_runs_it(level: Drafter, batch: int, size: int, context: int) -> Callable:
    """`fn(level, seq, ends) -> logits` like `_scorer`'s, on a cache updated in place as every
    decode loop updates it (donated to each call and threaded to the next, its fill level reset to
    `context`): a forward that copied the cache first would be priced above what decoding pays."""
    if isinstance(level, NGramDrafter):
        scorer, _ = _scorer(level, batch, size, context)
        return jax.jit(lambda lv, seq, ends: scorer(lv, seq, ends, None))
    lengths = jnp.full((batch,), context, jnp.int32)

    @partial(jax.jit, donate_argnums=3)
    def forward(lv, seq, ends, cache):
        return lv.step(jnp.take_along_axis(seq, ends - 1, axis=1), cache.with_lengths(lengths))

    cache = [level.init_cache(batch, size)]

    def fn(lv, seq, ends):
        logits, cache[0] = forward(lv, seq, ends, cache[0])
        return logits

    return fn


def _measure_each(levels: Sequence[Drafter], ks: Sequence[int], *, cache_size: int, context: int, batch: int,
                  repeats: int) -> list[list[float]]:
    seq = jnp.ones((batch, cache_size), jnp.int32)
    calls = []
    for level in levels:
        fn = _forward_as_decoding_runs_it(level, batch, cache_size, context)  # one compile per k
        ends = [jnp.broadcast_to(context + 1 + jnp.arange(k, dtype=jnp.int32), (batch, k)) for k in ks]
        calls += [(fn, (level, seq, e)) for e in ends]
    seconds = interleaved_median_seconds(calls, repeats=repeats, groups=[len(ks)] * len(levels))
    return [seconds[i:i + len(ks)] for i in range(0, len(seconds), len(ks))]


def _score_all(level: Drafter, seq: jax.Array) -> jax.Array:
    """Next-token logits [1, S, V] at every position of `seq` [1, S]."""
    fn, state = _scorer(level, 1, seq.shape[1], 0)
    return fn(level, seq, jnp.arange(1, seq.shape[1] + 1, dtype=jnp.int32)[None], state)


_score_all_compiled = jax.jit(_score_all)


def _teacher_forced(level: Drafter, tokens: np.ndarray, vocab: int) -> jax.Array:
    """Next-token logits [S, vocab] of one sequence, at every position. A model scores the
    sequence right-padded to a multiple of SCORE_BUCKET in one compiled forward (causal: padding
    after a position does not change its logits), so nearby lengths share a program; the n-gram
    drafter's lookup runs as it is."""
    if isinstance(level, NGramDrafter):
        return _score_all(level, jnp.asarray(tokens, jnp.int32)[None])[0, :, :vocab]
    padded = np.zeros((1, -(-len(tokens) // SCORE_BUCKET) * SCORE_BUCKET), np.int32)
    padded[0, :len(tokens)] = tokens
    return _score_all_compiled(level, jnp.asarray(padded))[0, :len(tokens), :vocab]


def measure_acceptance(levels: Sequence[Drafter], sequences: Sequence[np.ndarray], starts: Sequence[int], *,
                       temperature: float, vocab: int, max_positions: int = 16,
                       progress: Progress = None) -> dict[str, Any]:
    """alpha[i][j] for i < j (greedy agreement and sum min(p_i, p_j)) over answer positions, and
    the greedy per-position profiles of `greedy_position_profile` for every pair. A ValueError
    when the sequences hold no answer position (nothing to average)."""
    n = len(levels)
    greedy = np.zeros((n, n))
    sampled = np.zeros((n, n))
    agreements: dict[tuple[int, int], list[np.ndarray]] = {}
    total = 0
    greedy_sampling, hot = SamplingParams(), SamplingParams(temperature=temperature or 1.0)
    for number, (seq, start) in enumerate(zip(sequences, starts), 1):
        if progress:
            progress(f"acceptance: sequence {number}/{len(sequences)}")
        answer = slice(start - 1, len(seq) - 1)
        tops, probs = [], []
        for level in levels:
            logits = _teacher_forced(level, seq, vocab)[answer]
            tops.append(np.asarray(jnp.argmax(distribution(logits, greedy_sampling), -1)))
            probs.append(distribution(logits, hot))
        for i in range(n):
            for j in range(i + 1, n):
                greedy[i, j] += np.sum(tops[i] == tops[j])
                agreements.setdefault((i, j), []).append(tops[i] == tops[j])
                sampled[i, j] += float(jnp.sum(jnp.minimum(probs[i], probs[j])))
        total += len(seq) - start
    if total <= 0:
        raise ValueError(f"no answer positions to measure acceptance on ({len(sequences)} sequences); "
                         "give prompts whose continuations are not empty")
    profiles = {pair: greedy_position_profile(runs, max_positions) for pair, runs in agreements.items()}
    return {"greedy": greedy / total, "sampled": sampled / total, "positions": total,
            "greedy_profiles": profiles}


def greedy_position_profile(
    agreements: Sequence[np.ndarray], length: int, min_count: int = 20
) -> list[float]:
    """P(draft position j accepted | positions 1..j-1 accepted), j = 1..length, for greedy drafts.

    At temperature 0 a draft block starting at answer position s is accepted exactly as long as
    the drafter's argmax agrees with the target's along the target's own continuation: r_s, the
    run of agreements from s. Blocks do not start everywhere, though: the first starts at the
    answer's first position and each later one right after the position the verifier corrected,
    i.e. after a disagreement (a long buffer's walk). Over those starts position j's rate is
    #{r_s >= j} / #{r_s >= j - 1}. Real agreement comes in runs (easy spans: code, lists,
    copies), which one i.i.d. rate misses. A rate backed by fewer than `min_count` blocks repeats
    the last reliable one."""
    counts = np.zeros(length + 1)
    for agree in agreements:
        agree = np.asarray(agree, bool)
        runs = np.zeros(agree.size + 1, np.int64)
        for s in range(agree.size - 1, -1, -1):
            runs[s] = runs[s + 1] + 1 if agree[s] else 0
        starts = np.concatenate([[0], np.flatnonzero(~agree) + 1])
        for s in starts[starts < agree.size]:
            counts[:min(runs[s], length) + 1] += 1
    profile: list[float] = []
    for j in range(1, length + 1):
        if counts[j - 1] < min_count:
            profile.append(profile[-1] if profile else float(counts[1] / max(counts[0], 1)))
        else:
            profile.append(float(counts[j] / counts[j - 1]))
    return profile


def machine_name() -> str:
    """CPU model and architecture, e.g. 'AMD EPYC (x86_64)'."""
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({platform.machine()})"


def package_versions() -> dict[str, str]:
    """Python's version and the installed jax, jaxlib, flax and hsd-jax versions."""
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "hsd-jax"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _symmetric_pairs(names: Sequence[str], matrix: np.ndarray) -> dict[str, dict[str, float]]:
    """drafter -> verifier -> rate for every ordered pair, from the upper triangle of `matrix`."""
    full = matrix + matrix.T
    return {names[i]: {names[j]: float(full[i, j]) for j in range(len(names)) if j != i}
            for i in range(len(names))}


def _symmetric_profiles(names: Sequence[str], profiles: dict) -> dict[str, dict[str, list[float]]]:
    """Agreement is symmetric: both orders of a pair share its profile."""
    out: dict[str, dict[str, list[float]]] = {}
    for (i, j), profile in profiles.items():
        out.setdefault(names[i], {})[names[j]] = profile
        out.setdefault(names[j], {})[names[i]] = profile
    return out


def target_continuations(target: Model, tokenizer, prompts: Sequence[str],
                         max_new_tokens: int) -> tuple[list[np.ndarray], list[int]]:
    """Each chat prompt followed by the target's greedy answer (token ids), and where it starts:
    the positions every acceptance is measured on."""
    sequences, starts = [], []
    for text in prompts:
        ids = encode_prompt(tokenizer, text)
        padded, lengths = pad_prompts([ids], bucket=PROMPT_BUCKET)
        out = ar_generate(target, padded, lengths, jax.random.PRNGKey(0),
                          max_new_tokens=max_new_tokens, eos_token_id=target.config.eos_token_id)
        answer = np.asarray(out.tokens[0, :int(out.num_tokens[0])]).tolist()
        sequences.append(np.array(ids + answer, np.int32))
        starts.append(len(ids))
    return sequences, starts


def profile_family(sources: Sequence[str], prompts: Sequence[str], *, names: Sequence[str] | None = None,
                   temperature: float = 1.0, max_k: int = 16, sparse_ks: Sequence[int] = (),
                   max_new_tokens: int = 64, cache_size: int = 256, repeats: int = 7,
                   mesh: Any = None, dtype: Any = None, progress: Progress = None) -> dict[str, Any]:
    """Profile every source (the last is the target) into the planner's stats JSON (built as a
    `Stats`, returned as its `to_json()`; `io.files.write_json` writes it, `load_stats` reads it);
    with a `mesh`, on it (`sharding.family_rules`: drafts replicated, the target tensor-parallel).
    `dtype` casts every model's weights (default: as stored) and is recorded in the stats, so that
    plans made from them load their models in it. `progress(message)` is called as each long
    step starts."""
    if not prompts:
        raise ValueError("profiling needs at least one prompt: the acceptances are measured on the "
                         "target's continuations of the prompts, and the prompt list is empty")
    parsed = [parse_source(s) for s in sources]
    if not parsed or parsed[-1].kind != "model":
        raise ValueError(
            f"the last model must be the target's directory, got {sources[-1] if sources else None!r}"
        )
    names = list(names) if names else [s.name for s in parsed]
    if len(names) != len(parsed):
        raise ValueError(f"{len(names)} names for {len(parsed)} sources; give one name per source")
    target = from_source(parsed[-1], dtype=dtype)
    vocab = target.vocab_size
    levels = [from_source(s, vocab_size=vocab, dtype=dtype) for s in parsed[:-1]] + [target]
    if mesh is not None:
        levels = shard_levels(levels, mesh)
        target = levels[-1]
    if progress:
        progress(f"target continuations of {len(prompts)} prompts")
    sequences, starts = target_continuations(target, load_tokenizer(parsed[-1].directory()), prompts,
                                             max_new_tokens)
    acceptance = measure_acceptance(levels, sequences, starts, temperature=temperature, vocab=vocab,
                                    max_positions=max([max_k, *sparse_ks]), progress=progress)
    if progress:
        beyond = "".join(f", {k}" for k in sparse_ks if k > max_k)
        progress(f"timing every member for k = 1..{max_k}{beyond}, {repeats} rounds")
    costs = measure_family_costs(levels, max_k, cache_size=cache_size, repeats=repeats,
                                 sparse_ks=sparse_ks)
    models = [ModelStats(name, source, level.num_params, tuple(c))
              for name, source, level, c in zip(names, sources, levels, costs)]
    stats = Stats(
        hardware=machine_name(),
        dtype=str(target.dtype),
        batch_size=1,
        temperature=float(temperature),
        versions=package_versions(),
        target=names[-1],
        models=tuple(models),
        acceptance={
            "greedy": _symmetric_pairs(names, acceptance["greedy"]),
            "sampled": _symmetric_pairs(names, acceptance["sampled"]),
        },
        position_acceptance={"greedy": _symmetric_profiles(names, acceptance["greedy_profiles"])},
        mesh=None if mesh is None else dict(mesh.shape),
        cache_size=cache_size,
        measured_k=tuple(cost_ks(max_k, sparse_ks)),
        prompts=len(prompts),
        answer_positions=acceptance["positions"],
    )
    return stats.to_json()
