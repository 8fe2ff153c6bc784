"""Benchmarks that print ratios measured side by side in one run.

`run_bench`: our jitted AR decode against transformers' `generate` (torch, CPU) on the same
prompts, both fp32 greedy batch 1, plus the memory roofline: the model's weight bytes divided by
a measured memory bandwidth (a matrix-vector product streaming a buffer far larger than the
caches, the same access pattern as decoding one token).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_PROMPTS = (
    "Write a Python function that checks whether a number is prime.",
    "Explain in three sentences why the sky is blue.",
    "List five tips for writing clear documentation.",
)


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


def load_prompts(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            if "prompt" not in record:
                raise ValueError(f"{path}:{number} has no 'prompt' field")
            prompts.append(record["prompt"])
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def measure_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes per second streamed by an fp32 matrix-vector product over a `megabytes` matrix."""
    cols = 8192
    rows = megabytes * 2**20 // (4 * cols)
    matrix = jnp.ones((rows, cols), jnp.float32) / cols
    vector = jnp.ones((rows,), jnp.float32)
    matvec = jax.jit(lambda v, m: v @ m)
    matvec(vector, matrix).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matvec(vector, matrix).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return matrix.size * 4 / best


def _time_ours(model, prompt_ids: list[int], max_new_tokens: int, repeats: int) -> tuple[float, float, int, list[int]]:
    """Median seconds of a whole generation, median seconds per decode step (the generation
    minus a prefill-plus-one-token run with the same cache size), tokens, token ids."""
    from hsd_jax.decoding.ar import ar_generate, default_cache_size

    prompt = np.asarray([prompt_ids], np.int32)
    lengths = np.asarray([len(prompt_ids)], np.int32)
    cache_size = default_cache_size(len(prompt_ids), max_new_tokens)

    def run(new_tokens):
        return jax.block_until_ready(ar_generate(model, prompt, lengths, jax.random.PRNGKey(0),
                                                 max_new_tokens=new_tokens, cache_size=cache_size))

    def median_seconds(new_tokens):
        run(new_tokens)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = run(new_tokens)
            times.append(time.perf_counter() - start)
        return statistics.median(times), out

    total, out = median_seconds(max_new_tokens)
    first, _ = median_seconds(1)
    n = int(out.num_tokens[0])
    return total, (total - first) / max(n - 1, 1), n, np.asarray(out.tokens[0, :n]).tolist()


def _time_hf(hf_model, prompt_ids: list[int], max_new_tokens: int, repeats: int) -> tuple[float, int, list[int]]:
    import torch

    input_ids = torch.tensor([prompt_ids])
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        hf_model.generate(input_ids, **kwargs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = hf_model.generate(input_ids, **kwargs)
            times.append(time.perf_counter() - start)
    new = out[0, len(prompt_ids):].tolist()
    return statistics.median(times), len(new), new


def load_hf_reference(model_dir: str):
    """transformers' torch model for a converted directory (from the GGUF it came from, or the
    HF config + our weights exported back)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise ValueError("the transformers comparison needs torch: pip install 'hsd-jax[test]'") from err
    from hsd_jax.io.convert import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


def run_bench(model_dir: str, *, prompts_file: str | None = None, max_new_tokens: int = 64,
              repeats: int = 3) -> dict[str, Any]:
    from hsd_jax.io.checkpoint import load_model, load_tokenizer
    from hsd_jax.io.checkpoint import encode_prompt

    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    prompts = [encode_prompt(tokenizer, text, chat=True) for text in load_prompts(prompts_file)]
    hf_model = load_hf_reference(model_dir)

    from hsd_jax.models.decoder import param_shapes

    # bytes a decode step must read: every stored weight once (a tied embedding once, as the head)
    weight_bytes = model.dtype.itemsize * sum(
        int(np.prod(s)) for s in jax.tree.leaves(param_shapes(model.config), is_leaf=lambda x: isinstance(x, tuple)))
    bandwidth = measure_bandwidth()
    roofline_s = weight_bytes / bandwidth

    rows = []
    for ids in prompts:
        ours_s, ours_step_s, ours_n, ours_tokens = _time_ours(model, ids, max_new_tokens, repeats)
        hf_s, hf_n, hf_tokens = _time_hf(hf_model, ids, max_new_tokens, repeats)
        rows.append({"prompt_tokens": len(ids), "ours_seconds": ours_s, "ours_decode_step_seconds": ours_step_s,
                     "ours_tokens": ours_n,
                     "hf_seconds": hf_s, "hf_tokens": hf_n,
                     "identical": ours_tokens == hf_tokens[:ours_n]})
    ours_tps = statistics.median(r["ours_tokens"] / r["ours_seconds"] for r in rows)
    hf_tps = statistics.median(r["hf_tokens"] / r["hf_seconds"] for r in rows)
    per_token = statistics.median(r["ours_decode_step_seconds"] for r in rows)
    results = {
        "machine": machine_name(), "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
        "jax": jax.__version__, "dtype": str(model.dtype), "batch": 1, "max_new_tokens": max_new_tokens,
        "prompts": len(prompts), "weight_bytes": weight_bytes, "bandwidth_GBps": bandwidth / 1e9,
        "roofline_ms_per_token": roofline_s * 1e3, "ours_decode_ms_per_token": per_token * 1e3,
        "ours_over_roofline": per_token / roofline_s,
        "ours_tokens_per_s": ours_tps, "hf_tokens_per_s": hf_tps, "ours_over_hf": ours_tps / hf_tps,
        "greedy_identical_to_hf": all(r["identical"] for r in rows), "per_prompt": rows,
    }
    print(f"{results['machine']}, {results['cpu_count']} cores, jax {jax.__version__} on {jax.default_backend()}")
    print(f"weights {weight_bytes / 1e6:.1f} MB, measured bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"-> roofline {roofline_s * 1e3:.1f} ms/token")
    print(f"hsd-jax AR      {ours_tps:7.1f} tokens/s end to end; decode step {per_token * 1e3:.1f} ms "
          f"= {per_token / roofline_s:.2f}x roofline")
    print(f"transformers AR {hf_tps:7.1f} tokens/s")
    print(f"ratio hsd-jax / transformers: {ours_tps / hf_tps:.2f}x; greedy identical: "
          f"{results['greedy_identical_to_hf']}")
    return results


# --------------------------------------------------------------- methods side by side (issue 6)

METHODS = ("ar", "sd", "hsd", "hf-ar", "hf-assisted")


def best_single_draft(stats, mode: str, n_max: int = 16) -> tuple[str, int, float]:
    """(drafter, buffer, predicted s/token) of the best K = 1 hierarchy by the exact model (i.i.d.
    acceptance, as `planner.solve` by default)."""
    from hsd_jax.planning.planner import expected_latency

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


def _pad_prompts(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = -(-max(len(p) for p in prompts) // 16) * 16
    out = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        out[i, :len(p)] = p
    return out, np.array([len(p) for p in prompts], np.int32)


def _time_jax_method(generate, prompts: np.ndarray, lengths: np.ndarray) -> list[tuple[float, list[int], Any]]:
    """Per prompt: (seconds, tokens, stats) of `generate(prompt[1, W], lengths[1])`, after one
    compiling run; every prompt has the same padded width, so nothing recompiles."""
    jax.block_until_ready(generate(prompts[:1], lengths[:1]))
    rows = []
    for i in range(len(prompts)):
        start = time.perf_counter()
        out = jax.block_until_ready(generate(prompts[i:i + 1], lengths[i:i + 1]))
        seconds = time.perf_counter() - start
        n = int(out.num_tokens[0])
        rows.append((seconds, np.asarray(out.tokens[0, :n]).tolist(), out.stats))
    return rows


def run_methods(plan_path: str, stats_path: str, prompts_file: str, *, methods=METHODS, max_new_tokens: int = 64,
                temperature: float = 0.0, num_prompts: int = 0, hf_draft_dir: str | None = None,
                seed: int = 0, mesh: Any = None, progress: bool = True) -> dict[str, Any]:
    """Every method on the same prompts in one process: tokens/s (median over prompts), per-prompt
    seconds and tokens, speed-up over our AR and, at temperature 0, token identity with our AR.
    With a `mesh` our methods run on it (`sharding.family_rules`); transformers' stay on the CPU."""
    from hsd_jax.io.checkpoint import encode_prompt, load_tokenizer
    from hsd_jax.io.prompts import load_prompts as load_prompt_file
    from hsd_jax.decoding.hsd import Hierarchy, hsd_generate
    from hsd_jax.planning.planner import hierarchy_from_plan, load_plan, load_stats
    from hsd_jax.planning.profile import load_level

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    plan, stats = load_plan(plan_path), load_stats(stats_path)
    hierarchy = hierarchy_from_plan(plan)
    target, target_dir = hierarchy.target, plan.sources[-1]
    tokenizer = load_tokenizer(target_dir)
    texts = load_prompt_file(prompts_file)[:num_prompts or None]
    encoded = [encode_prompt(tokenizer, t) for t in texts]
    prompts, lengths = _pad_prompts(encoded)
    mode = "greedy" if temperature == 0 else "sampled"
    sd_name, sd_buffer, sd_predicted = best_single_draft(stats, mode)
    sd_source = stats.model(sd_name).source
    key = jax.random.PRNGKey(seed)

    def hierarchical(h):
        if mesh is not None:
            from hsd_jax.parallel.sharding import shard_batch, shard_hierarchy

            h = shard_hierarchy(h, mesh, rule=None)
            return lambda p, l: hsd_generate(h, *shard_batch(mesh, p, l), key, max_new_tokens=max_new_tokens,
                                             temperature=temperature)
        return lambda p, l: hsd_generate(h, p, l, key, max_new_tokens=max_new_tokens, temperature=temperature)

    results: dict[str, Any] = {"machine": machine_name(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
                               "backend": jax.default_backend(), "batch": 1, "temperature": temperature,
                               "max_new_tokens": max_new_tokens, "prompts": len(texts), "prompts_file": prompts_file,
                               "mesh": None if mesh is None else dict(mesh.shape),
                               "plan": plan.label, "sd": f"{sd_name}[{sd_buffer}] > {plan.chain[-1]}",
                               "methods": {}}
    runs: dict[str, list] = {}
    for method in methods:
        if progress:
            print(f"bench: {method} on {len(texts)} prompts", flush=True)
        if method == "ar":
            runs[method] = _time_jax_method(hierarchical(Hierarchy([target])), prompts, lengths)
        elif method == "sd":
            draft = load_level(sd_source, vocab_size=target.vocab_size)
            runs[method] = _time_jax_method(hierarchical(Hierarchy([draft, target], [sd_buffer])), prompts, lengths)
        elif method == "hsd":
            runs[method] = _time_jax_method(hierarchical(hierarchy), prompts, lengths)
        else:
            runs[method] = _time_hf_method(method, target_dir, hf_draft_dir, stats, encoded, max_new_tokens,
                                           temperature, seed)
    reference = runs.get("ar")
    for method, rows in runs.items():
        per_prompt = [{"seconds": s, "tokens": len(t)} for s, t, _ in rows]
        entry = {"tokens_per_s": statistics.median(len(t) / s for s, t, _ in rows), "per_prompt": per_prompt}
        if method in ("sd", "hsd") and rows[0][2] is not None:
            st = rows[0][2]
            passes = np.mean([np.asarray(r[2].tokens_per_target_call)[0] for r in rows])
            entry["tokens_per_target_call"] = float(passes)
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


def _time_hf_method(method: str, target_dir: str, hf_draft_dir: str | None, stats, encoded, max_new_tokens: int,
                    temperature: float, seed: int) -> list:
    """transformers' generate on our target exported to HF format, with the draft exported too
    for assisted generation."""
    import tempfile

    from hsd_jax.io.export import export_hf
    from hsd_jax.bench.hf_baseline import hf_generate_timed, load_hf_causal_lm

    workdir = Path(tempfile.mkdtemp(prefix="hsd-bench-"))
    model = load_hf_causal_lm(export_hf(target_dir, workdir / "target"))
    assistant = None
    if method == "hf-assisted":
        if hf_draft_dir is None:
            raise ValueError("hf-assisted needs a neural draft: pass --hf-draft DIR")
        assistant = load_hf_causal_lm(export_hf(hf_draft_dir, workdir / "draft"))
    hf_generate_timed(model, encoded[0], max_new_tokens, assistant=assistant, temperature=temperature, seed=seed)
    rows = []
    for ids in encoded:
        seconds, tokens = hf_generate_timed(model, ids, max_new_tokens, assistant=assistant,
                                            temperature=temperature, seed=seed)
        rows.append((seconds, list(tokens), None))
    return rows


def plot_methods(results: dict[str, Any], path: str | Path) -> Path:
    """A labelled bar chart of tokens/s per method, with the speed-up over our AR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["methods"])
    values = [results["methods"][n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, values, color=["#888" if n.startswith("hf") else "#2a6" for n in names])
    for bar, name in zip(bars, names):
        ratio = results["methods"][name].get("speedup_vs_ar")
        label = f"{bar.get_height():.1f}" + (f"\n{ratio:.2f}x AR" if ratio else "")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("tokens/s (median over prompts)")
    ax.set_title(f"batch 1, T={results['temperature']}, {results['prompts']} prompts, {results['machine']}", fontsize=8)
    ax.set_ylim(0, max(values) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
