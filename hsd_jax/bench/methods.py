"""Benchmarks that measure ratios side by side in one run, and return them (the CLI prints).

`run_bench`: our jitted AR decode against transformers' `generate` (torch, CPU) on the same
prompts, both fp32 greedy batch 1, plus the memory roofline: the model's weight bytes divided by
a measured memory bandwidth (a matrix-vector product streaming a buffer far larger than the
caches, the same access pattern as decoding one token).

`run_methods`: every decoding method (ar, sd, hsd, hf-ar, hf-assisted) on the same chat prompts.

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
from hsd_jax.decoding.ar import ar_generate, default_cache_size
from hsd_jax.decoding.hsd import Hierarchy, hsd_generate
from hsd_jax.io.checkpoint import encode_prompt, load_model, load_tokenizer
from hsd_jax.io.prompts import load_prompts, pad_prompts
from hsd_jax.io.sources import from_source, parse_source
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
    timed_runs,
)

__all__ = [
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
    minus a prefill-plus-one-token run with the same cache size), tokens, token ids."""
    prompt = np.asarray([prompt_ids], np.int32)
    lengths = np.asarray([len(prompt_ids)], np.int32)
    cache_size = default_cache_size(len(prompt_ids), max_new_tokens)

    def run(new_tokens):
        return ar_generate(model, prompt, lengths, jax.random.PRNGKey(0), max_new_tokens=new_tokens,
                           cache_size=cache_size)

    times, out = timed_runs(run, max_new_tokens, repeats=repeats)
    total = statistics.median(times)
    first = statistics.median(timed_runs(run, 1, repeats=repeats)[0])
    n = int(out.num_tokens[0])
    return total, (total - first) / max(n - 1, 1), n, np.asarray(out.tokens[0, :n]).tolist()


def weight_bytes(model) -> int:
    """Bytes a decode step must read: every weight once (`Model.num_params`: a tied embedding once)."""
    return model.num_params * model.dtype.itemsize


def run_bench(model_dir: str, *, prompts_file: str | None = None, max_new_tokens: int = 64,
              repeats: int = 3) -> dict[str, Any]:
    """Our AR against transformers' `generate` on the same weights (`load_hf_reference`), and
    against the memory roofline."""
    texts = list(DEFAULT_PROMPTS) if prompts_file is None else load_prompts(prompts_file)
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

METHODS = ("ar", "sd", "hsd", "hf-ar", "hf-assisted")


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
    jax.block_until_ready(generate(prompts[:1], lengths[:1]))
    rows = []
    for i in range(len(prompts)):
        seconds, out = time_once(generate, prompts[i:i + 1], lengths[i:i + 1])
        n = int(out.num_tokens[0])
        rows.append((seconds, np.asarray(out.tokens[0, :n]).tolist(), out.stats))
    return rows


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


def run_methods(plan_path: str, stats_path: str, prompts_file: str, *, methods: Sequence[str] = METHODS,
                max_new_tokens: int = 64, temperature: float = 0.0, num_prompts: int = 0,
                hf_draft_dir: str | None = None, seed: int = 0, mesh: Any = None,
                progress: Progress = None, allow_outside_plan_dir: bool = False) -> dict[str, Any]:
    """Every method on the same prompts in one process: tokens/s (median over prompts), per-prompt
    seconds and tokens, speed-up over our AR and, at temperature 0, token identity with our AR.
    With a `mesh` our methods run on it (`sharding.family_rules`); transformers' stay on the CPU.
    `progress(message)` is called as each method starts."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
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

    def hierarchical(h):
        if mesh is not None:
            h = shard_hierarchy(h, mesh, rule=None)
            return lambda p, n: hsd_generate(h, *shard_batch(mesh, p, n), key, max_new_tokens=max_new_tokens,
                                             temperature=temperature)
        return lambda p, n: hsd_generate(h, p, n, key, max_new_tokens=max_new_tokens, temperature=temperature)

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
        "plan": plan.label,
        "sd": f"{sd_name}[{sd_buffer}] > {plan.chain[-1]}",
        "methods": {},
    }
    runs: dict[str, list] = {}
    for method in methods:
        if progress:
            progress(f"bench: {method} on {len(texts)} prompts")
        if method == "ar":
            runs[method] = time_jax_method(hierarchical(Hierarchy([target])), prompts, lengths)
        elif method == "sd":
            draft = from_source(sd_source, vocab_size=target.vocab_size)
            runs[method] = time_jax_method(
                hierarchical(Hierarchy([draft, target], [sd_buffer])), prompts, lengths
            )
        elif method == "hsd":
            runs[method] = time_jax_method(hierarchical(hierarchy), prompts, lengths)
        else:
            runs[method] = _time_hf_method(
                method,
                parse_source(target_dir).directory(),
                hf_draft_dir,
                encoded,
                max_new_tokens,
                temperature,
                seed,
            )
    reference = runs.get("ar")
    for method, rows in runs.items():
        per_prompt = [{"seconds": s, "tokens": len(t)} for s, t, _ in rows]
        entry = {"tokens_per_s": statistics.median(len(t) / s for s, t, _ in rows), "per_prompt": per_prompt}
        if method in ("sd", "hsd") and rows[0][2] is not None:
            entry["tokens_per_target_call"] = float(np.mean([np.asarray(r[2].tokens_per_target_call)[0]
                                                             for r in rows]))
        if temperature == 0 and reference is not None:
            entry["identical_to_ar"] = all(t == r[1] for (_, t, _), r in zip(rows, reference))
        results["methods"][method] = entry
    if "ar" in results["methods"]:
        base = results["methods"]["ar"]["tokens_per_s"]
        for entry in results["methods"].values():
            entry["speedup_vs_ar"] = entry["tokens_per_s"] / base
    m = results["methods"]
    for a, b in (("hsd", "sd"), ("hsd", "hf-assisted"), ("hsd", "hf-ar")):
        if a in m and b in m:
            results[f"{a}_over_{b}"] = m[a]["tokens_per_s"] / m[b]["tokens_per_s"]
    return results
