"""The greedy argmax on our CPU kernel against XLA's: alone, and inside generation.

    .venv/bin/python scripts/argmax_ab.py [--plans checkpoints/plan.json,checkpoints/plan-hsd.json] \
        [--num-prompts 8] [--rounds 3] [--json docs/argmax-ab.json]

Alone: a jitted argmax over [rows, 49152] float32 logits (median of 300 calls), the kernel's and
`jnp.argmax`'s, which must agree. Inside generation: each plan's hierarchy and its target's plain
AR, traced twice, once with `sampling.kernel_argmax` forced off (XLA's argmax) and once as shipped,
then timed prompt by prompt in one process, every variant in turn on each prompt, `--rounds`
times (greedy, 64 new tokens); the tokens must be identical. CPU only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import hsd_jax.decoding.ar as ar_module
import hsd_jax.decoding.hsd as hsd_module
import hsd_jax.decoding.sampling as sampling
from hsd_jax.io.checkpoint import encode_prompt, load_tokenizer
from hsd_jax.io.files import write_json
from hsd_jax.io.prompts import load_prompts, pad_prompts
from hsd_jax.models import cpu_kernel
from hsd_jax.planning import hierarchy_from_plan, load_plan

AR_STATIC = ("max_new_tokens", "sampling", "eos_token_id", "cache_size", "pad_id")


def alone(rows: int, repeats: int = 300) -> dict:
    x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, 49152)), jnp.float32)
    out = {}
    for name, fn in (("xla", jax.jit(lambda x: jnp.argmax(x, -1))), ("kernel", jax.jit(cpu_kernel.argmax))):
        fn(x).block_until_ready()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x).block_until_ready()
            times.append(time.perf_counter() - start)
        out[f"{name}_us"] = 1e6 * statistics.median(times)
    assert np.array_equal(np.asarray(cpu_kernel.argmax(x)), np.asarray(jnp.argmax(x, -1)))
    return {"rows": rows, **out}


def programs(hierarchy, prompts: np.ndarray, lengths: np.ndarray, kernel: bool):
    """(hsd, ar) one-prompt runners traced with the kernel argmax on or off (fresh jits, so each
    variant is traced apart)."""
    original = sampling.kernel_argmax
    forced = (lambda models: original(models)) if kernel else (lambda models: False)
    static = hsd_module.prepare_hsd(hierarchy, prompts[:1], lengths[:1], max_new_tokens=64)
    hsd = jax.jit(lambda *a, **k: hsd_module._run(*a, **k), static_argnames=hsd_module._STATIC)
    ar = jax.jit(lambda *a, **k: ar_module._ar_generate.__wrapped__(*a, **k), static_argnames=AR_STATIC)
    ar_static = dict(max_new_tokens=64, sampling=sampling.SamplingParams(), eos_token_id=None,
                     cache_size=static["cache_size"], pad_id=0)
    key = jax.random.PRNGKey(0)

    def run_hsd(i):
        return hsd(hierarchy, jnp.asarray(prompts[i:i + 1]), jnp.asarray(lengths[i:i + 1]), key, trace=True,
                   **static).tokens

    def run_ar(i):
        return ar(hierarchy.target, jnp.asarray(prompts[i:i + 1]), jnp.asarray(lengths[i:i + 1]), key,
                  **ar_static).tokens

    for module in (hsd_module, ar_module):
        module.kernel_argmax = forced
    try:  # trace now, with the choice in force
        run_hsd(0).block_until_ready()
        run_ar(0).block_until_ready()
    finally:
        for module in (hsd_module, ar_module):
            module.kernel_argmax = original
    return run_hsd, run_ar


def in_generation(plan_path: str, num_prompts: int, rounds: int) -> dict:
    plan = load_plan(plan_path)
    hierarchy = hierarchy_from_plan(plan)  # loaded once, traced twice
    tokenizer = load_tokenizer(plan.directory())
    texts = load_prompts("hsd_jax/io/data/eval_prompts.jsonl")[:num_prompts]
    prompts, lengths = pad_prompts([encode_prompt(tokenizer, t) for t in texts])
    variants = {name: programs(hierarchy, prompts, lengths, kernel) for name, kernel in (("xla", False),
                                                                                         ("kernel", True))}
    times = {(v, m): [] for v in variants for m in ("hsd", "ar")}
    tokens: dict = {}
    for _ in range(rounds):
        for i in range(len(texts)):
            for name, (run_hsd, run_ar) in variants.items():
                for method, run in (("hsd", run_hsd), ("ar", run_ar)):
                    start = time.perf_counter()
                    out = run(i).block_until_ready()
                    times[(name, method)].append(time.perf_counter() - start)
                    tokens.setdefault((method, i), []).append(np.asarray(out).tolist())
    rate = {f"{v}_{m}_tokens_per_s": 64 / statistics.median(t) for (v, m), t in times.items()}
    return {"plan": plan.label, **rate,
            "hsd_kernel_over_xla": rate["kernel_hsd_tokens_per_s"] / rate["xla_hsd_tokens_per_s"],
            "ar_kernel_over_xla": rate["kernel_ar_tokens_per_s"] / rate["xla_ar_tokens_per_s"],
            "identical": all(all(t == runs[0] for t in runs) for runs in tokens.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plans", default="checkpoints/plan.json,checkpoints/plan-hsd.json")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not cpu_kernel.rows_available():
        print(f"no CPU kernel here: {cpu_kernel.build_error()}", file=sys.stderr)
        return 1
    result = {"alone": [alone(rows) for rows in (1, 4, 16)],
              "in_generation": [in_generation(plan, args.num_prompts, args.rounds)
                                for plan in args.plans.split(",")]}
    for row in result["alone"]:
        print(f"argmax of {row['rows']:2d} x 49152: XLA {row['xla_us']:7.0f} us, "
              f"kernel {row['kernel_us']:5.0f} us")
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
