"""Where a forward pass's time goes: one model's k-token step, traced with JAX's profiler.

    .venv/bin/python scripts/step_trace.py --model checkpoints/smollm2-135m-instruct \
        [--model int8:checkpoints/smollm2-135m-instruct] [--dtype bfloat16] [--widths 1,8,16] \
        [--cached 299] [--json docs/step-trace-bf16.json]

Each model runs a jitted `step` of k tokens after `--cached` cached positions (cache of 512), ten
times under `jax.profiler`; the trace's events are summed per step: our kernel's FFI calls by
target (projections, attention, norm sums, ...), and XLA's own ops by kind. XLA's `copy` is the
returned cache, copied because this jit does not donate it (decoding updates its cache in place).
The wall time per step is timed apart (median of 30, dispatch and that copy included). CPU only.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from hsd_jax.io.files import write_json
from hsd_jax.io.sources import from_source
from hsd_jax.planning.timing import median_seconds

TRACED_STEPS = 10


def _events(trace_dir: str) -> list[dict]:
    path = sorted(Path(trace_dir).glob("**/*.trace.json.gz"))[-1]
    with gzip.open(path) as f:
        return json.load(f)["traceEvents"]


def trace_step(model, width: int, cached: int) -> dict:
    cache = model.init_cache(1, 512).with_lengths(jnp.full((1,), cached, jnp.int32))
    tokens = jnp.ones((1, width), jnp.int32)
    step = jax.jit(model.step)
    wall = median_seconds(step, tokens, cache, repeats=30, warmup=5)
    targets = dict(re.findall(r'(ffi_call[.\d]*) = .*custom_call_target="(\w+)"',
                              step.lower(tokens, cache).compile().as_text()))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(TRACED_STEPS):
            jax.block_until_ready(step(tokens, cache))
        jax.profiler.stop_trace()
        events = _events(trace_dir)
    kernel_ms, xla_ms = collections.Counter(), collections.Counter()
    calls = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or "dur" not in event:
            continue
        if name in targets:
            kernel_ms[targets[name]] += event["dur"] / 1e3 / TRACED_STEPS
            calls[targets[name]] += 1 / TRACED_STEPS
        elif re.fullmatch(r"[a-z][\w-]*(\.\d+)?", name) and not name.startswith("end"):
            xla_ms[re.sub(r"\.\d+$", "", name)] += event["dur"] / 1e3 / TRACED_STEPS
    return {"width": width, "wall_ms": 1e3 * wall,
            "kernel_ms": dict(kernel_ms.most_common()),
            "kernel_calls": {k: round(v) for k, v in calls.items()},
            "xla_ms": dict(xla_ms.most_common(12)), "xla_total_ms": sum(xla_ms.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="a model source (repeatable)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--widths", default="1,8,16")
    p.add_argument("--cached", type=int, default=299)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if jax.default_backend() != "cpu":
        print("step_trace.py traces the CPU path", file=sys.stderr)
        return 1
    result = []
    for source in args.model:
        model = from_source(source, dtype=jnp.dtype(args.dtype))
        for width in map(int, args.widths.split(",")):
            row = {"model": source, **trace_step(model, width, args.cached)}
            result.append(row)
            kernel = ", ".join(f"{k} {v:.2f} ms ({row['kernel_calls'][k]})"
                               for k, v in row["kernel_ms"].items())
            print(f"{source} k={width}: {row['wall_ms']:.2f} ms a step; kernel: {kernel}; "
                  f"XLA ops {row['xla_total_ms']:.2f} ms")
    if args.json:
        write_json(args.json, {"dtype": args.dtype, "cached": args.cached, "steps": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
