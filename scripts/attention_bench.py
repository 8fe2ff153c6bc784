"""Our CPU kernel's attention alone: one layer of SmolLM2-135M's shapes (9 query heads, 3 KV heads,
head width 64) against a float32 cache of 512 positions, 300 of them cached.

    HSD_JAX_KERNEL_THREADS=1 .venv/bin/python scripts/attention_bench.py [--rows 1,16] [--json OUT]

Thirty layers' calls in one jit (each its own layer of the cache), 100 calls of that program
per timing, best of 7 timings; printed per layer call. Set HSD_JAX_KERNEL_THREADS=1 to time the
arithmetic without the thread pool's scheduling on two shared cores.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from hsd_jax.io.files import write_json
from hsd_jax.models import cpu_kernel
from hsd_jax.planning.timing import timed_runs

LAYERS, SIZE, CACHED = 30, 512, 300


def layer_us(rows: int, repeats: int = 7, calls: int = 100) -> float:
    rng = np.random.default_rng(rows)
    q = jnp.asarray(rng.standard_normal((1, rows, 9, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((LAYERS, 1, SIZE, 3, 64)), jnp.float32) for _ in range(2))
    positions = CACHED + np.arange(rows)
    mask = jnp.asarray(np.arange(SIZE)[None, None, :] <= positions[None, :, None])
    program = jax.jit(lambda q, k, v, mask: sum(
        cpu_kernel.cached_attention(q + layer * 1e-9, k, v, layer, mask)[0, 0, 0, 0]
        for layer in range(LAYERS)))

    def batch_of_calls():
        for _ in range(calls):
            jax.block_until_ready(program(q, k, v, mask))

    times, _ = timed_runs(batch_of_calls, repeats=repeats)
    return 1e6 * min(times) / calls / LAYERS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,16")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not cpu_kernel.rows_available():
        print(f"no CPU kernel here: {cpu_kernel.build_error()}", file=sys.stderr)
        return 1
    result = {f"rows_{rows}_us": layer_us(rows) for rows in map(int, args.rows.split(","))}
    for name, value in result.items():
        print(f"{name}: {value:.1f} µs a layer call")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
