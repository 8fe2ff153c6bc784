"""Passes over the vocabulary on our CPU kernel against XLA's: alone, and inside generation.

    .venv/bin/python scripts/vocab_kernel_ab.py [--plans checkpoints/plan.json,checkpoints/plan-hsd.json] \
        [--temperature 1] [--num-prompts 8] [--rounds 3] [--json docs/vocab-kernel-ab-t1.json]

Alone, over [rows, 49152] float32 logits, the kernel's and XLA's: greedy, the argmax (which must
agree); at a temperature, the distribution (softmax), the draw, and one verification of
`rows - 1` drafts; each timed inside a compiled loop (`_loop_us`, no dispatch; the argmax
figures in docs/argmax-ab.json were timed call by call). Inside generation: each plan's hierarchy
and its target's plain AR, traced twice, once with `sampling.on_kernel` forced off (XLA) and once
as shipped, then timed prompt by prompt in one process, every variant in turn on each prompt,
`--rounds` times (64 new tokens, one key). Greedy tokens must be identical; at a temperature the
two variants draw from laws an ulp apart with the same uniforms, and the share of identical
outputs is reported. CPU only. (Before the sampling kernel this script was scripts/argmax_ab.py,
greedy only; docs/argmax-ab.json is its run.)"""

from __future__ import annotations

import argparse
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

import hsd_jax.decoding.ar as ar_module
import hsd_jax.decoding.hsd as hsd_module
import hsd_jax.decoding.sampling as sampling
from hsd_jax.decoding.verify import verify
from hsd_jax.io.checkpoint import encode_prompt, load_tokenizer
from hsd_jax.io.files import write_json
from hsd_jax.io.prompts import load_prompts, pad_prompts
from hsd_jax.models import cpu_kernel
from hsd_jax.planning import hierarchy_from_plan, load_plan
from hsd_jax.planning.timing import median_seconds, time_once

AR_STATIC = ("max_new_tokens", "sampling", "eos_token_id", "cache_size", "pad_id")


def _loop_us(fn, x, *rest, iterations: int = 100, repeats: int = 7) -> float:
    """Microseconds a call of fn(x, *rest) takes inside a compiled loop (no dispatch): x is nudged
    by a carried scalar each iteration, and every output folded into it, so nothing is hoisted or
    dropped (the nudge, an add over x, is in both variants' times). Median of `repeats` runs."""
    def run(x, *rest):
        def body(_, nudge):
            outputs = jax.tree.leaves(fn(x + nudge, *rest))
            return nudge + 1e-30 * sum(leaf.reshape(-1)[0].astype(jnp.float32) for leaf in outputs)
        return jax.lax.fori_loop(0, iterations, body, jnp.float32(0))

    return 1e6 * median_seconds(jax.jit(run), x, *rest, repeats=repeats) / iterations


def alone(rows: int, temperature: float) -> dict:
    x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, 49152)), jnp.float32)
    out = {"rows": rows}
    if temperature == 0:
        for name, kernel in (("xla", False), ("kernel", True)):
            out[f"{name}_argmax_us"] = _loop_us(lambda x, k=kernel: sampling.argmax(x, kernel=k), x)
        assert np.array_equal(np.asarray(cpu_kernel.argmax(x)), np.asarray(jnp.argmax(x, -1)))
        return out
    params = sampling.SamplingParams(temperature=temperature)
    probs = sampling.distribution(x, params)
    key = jax.random.PRNGKey(0)
    width = max(rows - 1, 1)
    drafts, draft_len = jnp.zeros((1, width), jnp.int32), jnp.full((1,), width, jnp.int32)
    q, p = probs[None, :width], jnp.concatenate([probs, probs[:1]])[None, :width + 1]
    for name, kernel in (("xla", False), ("kernel", True)):
        out[f"{name}_distribution_us"] = _loop_us(
            lambda x, k=kernel: sampling.distribution(x, params, kernel=k), x)
        out[f"{name}_sample_us"] = _loop_us(lambda p, k=kernel: sampling.sample(key, p, kernel=k), probs)
        out[f"{name}_verify_us"] = _loop_us(
            lambda q, p, k=kernel: verify("tokenwise", key, drafts, draft_len, q, p, kernel=k), q, p)
    return out


def programs(hierarchy, prompts: np.ndarray, lengths: np.ndarray, kernel: bool, temperature: float):
    """(hsd, ar) one-prompt runners traced with the vocabulary kernel on or off (fresh jits, so
    each variant is traced apart)."""
    original = sampling.on_kernel
    forced = (lambda models: original(models)) if kernel else (lambda models: False)
    static = hsd_module.prepare_hsd(hierarchy, prompts[:1], lengths[:1], max_new_tokens=64,
                                    temperature=temperature)
    hsd = jax.jit(lambda *a, **k: hsd_module._run(*a, **k), static_argnames=hsd_module._STATIC)
    ar = jax.jit(lambda *a, **k: ar_module._ar_generate.__wrapped__(*a, **k), static_argnames=AR_STATIC)
    ar_static = dict(max_new_tokens=64, sampling=static["sampling"], eos_token_id=None,
                     cache_size=static["cache_size"], pad_id=0)
    key = jax.random.PRNGKey(0)

    def run_hsd(i):
        return hsd(hierarchy, jnp.asarray(prompts[i:i + 1]), jnp.asarray(lengths[i:i + 1]), key, trace=True,
                   **static).tokens

    def run_ar(i):
        return ar(hierarchy.target, jnp.asarray(prompts[i:i + 1]), jnp.asarray(lengths[i:i + 1]), key,
                  **ar_static).tokens

    for module in (hsd_module, ar_module):
        module.on_kernel = forced
    try:  # trace now, with the choice in force
        run_hsd(0).block_until_ready()
        run_ar(0).block_until_ready()
    finally:
        for module in (hsd_module, ar_module):
            module.on_kernel = original
    return run_hsd, run_ar


def in_generation(plan_path: str, num_prompts: int, rounds: int, temperature: float) -> dict:
    plan = load_plan(plan_path)
    hierarchy = hierarchy_from_plan(plan, allow_outside_plan_dir=True)  # loaded once, traced twice
    tokenizer = load_tokenizer(plan.directory())
    texts = load_prompts("hsd_jax/io/data/eval_prompts.jsonl")[:num_prompts]
    prompts, lengths = pad_prompts([encode_prompt(tokenizer, t) for t in texts])
    variants = {name: programs(hierarchy, prompts, lengths, kernel, temperature)
                for name, kernel in (("xla", False), ("kernel", True))}
    times = {(v, m): [] for v in variants for m in ("hsd", "ar")}
    tokens: dict = {}
    for _ in range(rounds):
        for i in range(len(texts)):
            for name, (run_hsd, run_ar) in variants.items():
                for method, run in (("hsd", run_hsd), ("ar", run_ar)):
                    seconds, out = time_once(run, i)
                    times[(name, method)].append(seconds)
                    tokens.setdefault((method, i), []).append(np.asarray(out).tolist())
    rate = {f"{v}_{m}_tokens_per_s": 64 / statistics.median(t) for (v, m), t in times.items()}
    return {"plan": plan.label, **rate,
            "hsd_kernel_over_xla": rate["kernel_hsd_tokens_per_s"] / rate["xla_hsd_tokens_per_s"],
            "ar_kernel_over_xla": rate["kernel_ar_tokens_per_s"] / rate["xla_ar_tokens_per_s"],
            "temperature": temperature,
            "identical": float(np.mean([all(t == runs[0] for t in runs) for runs in tokens.values()]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plans", default="checkpoints/plan.json,checkpoints/plan-hsd.json")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not cpu_kernel.rows_available():
        print(f"no CPU kernel here: {cpu_kernel.build_error()}", file=sys.stderr)
        return 1
    result = {"alone": [alone(rows, args.temperature) for rows in (1, 4, 16)],
              "in_generation": [in_generation(plan, args.num_prompts, args.rounds, args.temperature)
                                for plan in args.plans.split(",")]}
    for row in result["alone"]:
        steps = [k[len("xla_"):-len("_us")] for k in row if k.startswith("xla_")]
        print(f"{row['rows']:2d} x 49152: " + ", ".join(
            f"{step} XLA {row[f'xla_{step}_us']:.0f} us, kernel {row[f'kernel_{step}_us']:.0f} us"
            for step in steps))
    for row in result["in_generation"]:
        print(f"{row['plan']}: hsd {row['xla_hsd_tokens_per_s']:.1f} -> "
              f"{row['kernel_hsd_tokens_per_s']:.1f} tokens/s ({row['hsd_kernel_over_xla']:.2f}x), "
              f"its target's AR {row['xla_ar_tokens_per_s']:.1f} -> {row['kernel_ar_tokens_per_s']:.1f} "
              f"({row['ar_kernel_over_xla']:.2f}x), identical: {row['identical']}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
