"""Profile a model family for the planner (research.md §1, "Inputs to profile").

* c_i(k): median wall time of one k-token forward at a realistic cache size, after compilation;
* alpha_ij for every ordered pair (drafter i cheaper than verifier j): greedy argmax agreement
  and sampling sum_v min(p_i, p_j) at a temperature, over the target's real greedy
  continuations of held-out prompts (teacher-forced, so every model sees the same contexts).
  Both measures are symmetric in (i, j); they are recorded for every ordered pair.

A family member is named by a *source*: a model directory, `ngram:N` (the n-gram drafter) or
`int8:DIR` (an int8 copy of the model in DIR).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hsd_jax.io.checkpoint import load_model
from hsd_jax.models.decoder import Model, forward
from hsd_jax.decoding.ngram import NGramDrafter
from hsd_jax.models.quantize import Int8Weight
from hsd_jax.models.layouts import quantize_int8
from hsd_jax.decoding.sampling import SamplingParams, distribution

Level = Model | NGramDrafter


def load_level(source: str, *, vocab_size: int | None = None, base_dir: str | Path = ".", dtype=None) -> Level:
    """The family member a source names: a model directory, `ngram:N` or `int8:DIR`."""
    if source.startswith("ngram:"):
        if vocab_size is None:
            raise ValueError(f"{source}: the n-gram drafter needs the target's vocab_size")
        try:
            n = int(source.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad source {source!r}: expected ngram:N with an integer N >= 2") from None
        return NGramDrafter(n, vocab_size)
    if source.startswith("int8:"):
        return quantize_int8(load_model(Path(base_dir) / source.split(":", 1)[1], dtype=dtype))
    return load_model(Path(base_dir) / source, dtype=dtype)


def default_name(source: str) -> str:
    if source.startswith("ngram:"):
        return f"ngram{source.split(':', 1)[1]}"
    if source.startswith("int8:"):
        return f"{Path(source.split(':', 1)[1]).name}-int8"
    return Path(source).name


def num_params(level: Level) -> int:
    """Distinct weights: the CPU layout's transposed head copy, and a tied head, count once; an
    int8 weight counts as its values (its scales are quantisation metadata), so an int8 copy has
    as many parameters as its source."""
    if isinstance(level, NGramDrafter):
        return 0
    params = {k: v for k, v in level.params.items() if k != "lm_head_t"}
    if level.config.tie_word_embeddings and "head_ids" not in params:
        params.pop("lm_head", None)
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8Weight))
    return int(sum(np.prod((x.q if isinstance(x, Int8Weight) else x).shape) for x in leaves
                   if isinstance(x, Int8Weight) or x.dtype != jnp.int32))


def _timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_costs(level: Level, max_k: int, *, cache_size: int = 256, context: int = 128,
                  batch: int = 1, repeats: int = 7, sparse_ks: Sequence[int] = ()) -> list[float]:
    """c(k) for k = 1..max(max_k, *sparse_ks): median seconds of one k-token forward (n-gram: its
    lookup) with `context` tokens already cached in a cache of `cache_size` positions. Every k up
    to `max_k` is measured; beyond it only `sparse_ks` are, and the k between them are linearly
    interpolated (a table the planner reads densely, without one compile per k)."""
    ks = cost_ks(max_k, sparse_ks)
    measured = _measure_each(level, ks, cache_size=cache_size, context=context, batch=batch, repeats=repeats)
    return np.interp(np.arange(1, ks[-1] + 1), ks, measured).tolist()


def cost_ks(max_k: int, sparse_ks: Sequence[int] = ()) -> list[int]:
    """The k whose c(k) `measure_costs` times: 1..max_k, then the sparse ones beyond it."""
    return sorted(set(range(1, max_k + 1)) | {int(k) for k in sparse_ks if k > max_k})


def _measure_each(level: Level, ks: Sequence[int], *, cache_size: int, context: int, batch: int,
                  repeats: int) -> list[float]:
    costs = []
    for k in ks:
        if isinstance(level, NGramDrafter):
            seq = jnp.ones((batch, cache_size), jnp.int32)
            ends = jnp.full((batch, k), context, jnp.int32) + jnp.arange(k)[None]
            fn = jax.jit(lambda s, e: level.distributions(s, e))
            costs.append(_timed(fn, seq, ends, repeats=repeats))
        else:
            cache = level.init_cache(batch, cache_size).with_lengths(jnp.full((batch,), context, jnp.int32))
            tokens = jnp.ones((batch, k), jnp.int32)
            fn = jax.jit(lambda p, t, c: forward(p, level.config, t, c)[0])
            costs.append(_timed(fn, level.params, tokens, cache, repeats=repeats))
    return costs


def _teacher_forced(level: Level, tokens: np.ndarray, sampling: SamplingParams, vocab: int) -> np.ndarray:
    """Processed next-token distributions [S, V] of one sequence, at every position."""
    seq = jnp.asarray(tokens, jnp.int32)[None]
    if isinstance(level, NGramDrafter):
        return level.distributions(seq, jnp.arange(1, seq.shape[1] + 1)[None])[0, :, :vocab]
    logits, _ = forward(level.params, level.config, seq, level.init_cache(1, seq.shape[1]))
    return distribution(logits[0, :, :vocab], sampling)


def measure_acceptance(levels: Sequence[Level], sequences: Sequence[np.ndarray], starts: Sequence[int], *,
                       temperature: float, vocab: int, max_positions: int = 16,
                       progress: bool = True) -> dict[str, Any]:
    """alpha[i][j] for i < j (greedy agreement and sum min(p_i, p_j)) over answer positions, and
    the greedy per-position profiles of `greedy_position_profile` for every pair."""
    from tqdm import tqdm

    n = len(levels)
    greedy = np.zeros((n, n))
    sampled = np.zeros((n, n))
    agreements: dict[tuple[int, int], list[np.ndarray]] = {}
    total = 0
    greedy_sampling, hot = SamplingParams(), SamplingParams(temperature=temperature or 1.0)
    for seq, start in tqdm(list(zip(sequences, starts)), desc="acceptance", disable=not progress):
        answer = slice(start - 1, len(seq) - 1)
        tops, probs = [], []
        for level in levels:
            tops.append(np.asarray(jnp.argmax(_teacher_forced(level, seq, greedy_sampling, vocab)[answer], -1)))
            probs.append(_teacher_forced(level, seq, hot, vocab)[answer])
        for i in range(n):
            for j in range(i + 1, n):
                greedy[i, j] += np.sum(tops[i] == tops[j])
                agreements.setdefault((i, j), []).append(tops[i] == tops[j])
                sampled[i, j] += float(jnp.sum(jnp.minimum(probs[i], probs[j])))
        total += len(seq) - start
    profiles = {pair: greedy_position_profile(runs, max_positions) for pair, runs in agreements.items()}
    return {"greedy": greedy / max(total, 1), "sampled": sampled / max(total, 1), "positions": total,
            "greedy_profiles": profiles}


def greedy_position_profile(agreements: Sequence[np.ndarray], length: int, min_count: int = 20) -> list[float]:
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


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "hsd-jax"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def profile_family(sources: Sequence[str], prompts: Sequence[str], *, names: Sequence[str] | None = None,
                   temperature: float = 1.0, max_k: int = 16, sparse_ks: Sequence[int] = (),
                   max_new_tokens: int = 64, cache_size: int = 256, repeats: int = 7,
                   mesh: Any = None, progress: bool = True) -> dict[str, Any]:
    """Profile every source (the last is the target) into the planner's stats dict; with a
    `mesh`, on it (`sharding.family_rules`: drafts replicated, the target tensor-parallel)."""
    from hsd_jax.bench.methods import machine_name
    from hsd_jax.io.checkpoint import encode_prompt, load_tokenizer
    from hsd_jax.decoding.ar import ar_generate

    target_source = sources[-1]
    if target_source.startswith(("ngram:", "int8:")):
        raise ValueError(f"the last model must be the target's directory, got {target_source!r}")
    target = load_model(target_source)
    vocab = target.vocab_size
    levels = [load_level(s, vocab_size=vocab) for s in sources[:-1]] + [target]
    if mesh is not None:
        from hsd_jax.parallel.sharding import shard_levels

        levels = shard_levels(levels, mesh)
        target = levels[-1]
    names = list(names) if names else [default_name(s) for s in sources]
    tokenizer = load_tokenizer(target_source)
    sequences, starts = [], []
    for text in prompts:
        ids = encode_prompt(tokenizer, text)
        width = -(-len(ids) // 32) * 32  # right-padded to a bucket: few recompiles, same tokens
        out = ar_generate(target, np.array([ids + [0] * (width - len(ids))]), np.array([len(ids)]), jax.random.PRNGKey(0),
                          max_new_tokens=max_new_tokens, eos_token_id=target.config.eos_token_id)
        answer = np.asarray(out.tokens[0, :int(out.num_tokens[0])]).tolist()
        sequences.append(np.array(ids + answer, np.int32))
        starts.append(len(ids))
    acceptance = measure_acceptance(levels, sequences, starts, temperature=temperature, vocab=vocab,
                                    max_positions=max([max_k, *sparse_ks]), progress=progress)
    models = []
    for name, source, level in zip(names, sources, levels):
        if progress:
            print(f"timing {name} for k = 1..{max_k}", flush=True)
        models.append({"name": name, "source": source, "params": num_params(level),
                       "cost_s": measure_costs(level, max_k, cache_size=cache_size, repeats=repeats,
                                               sparse_ks=sparse_ks)})

    def profile_pairs(profiles):  # agreement is symmetric: both orders share a profile
        out: dict[str, dict[str, list[float]]] = {}
        for (i, j), profile in profiles.items():
            out.setdefault(names[i], {})[names[j]] = profile
            out.setdefault(names[j], {})[names[i]] = profile
        return out

    def pairs(matrix):
        full = matrix + matrix.T
        return {names[i]: {names[j]: float(full[i, j]) for j in range(len(names)) if j != i}
                for i in range(len(names))}

    return {"version": 1, "hardware": machine_name(), "dtype": str(target.dtype), "batch_size": 1,
            "temperature": float(temperature), "versions": _versions(), "target": names[-1],
            "mesh": None if mesh is None else dict(mesh.shape),
            "cache_size": cache_size, "measured_k": cost_ks(max_k, sparse_ks),
            "prompts": len(prompts), "answer_positions": acceptance["positions"],
            "models": models, "acceptance": {"greedy": pairs(acceptance["greedy"]),
                                             "sampled": pairs(acceptance["sampled"])},
            "position_acceptance": {"greedy": profile_pairs(acceptance["greedy_profiles"])}}


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write JSON atomically (temporary sibling, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return path
