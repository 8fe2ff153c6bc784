"""c(k): the cost of one k-token forward of a model, for each weight dtype and layout, side by side.

    .venv/bin/python scripts/verify_cost.py checkpoints/smollm2-135m-instruct [--ks 1,2,4,8,16]

Every configuration runs in its own process (XLA_FLAGS are read once per process; our CPU
kernel, `hsd_jax.models.cpu_kernel`, is switched off with HSD_JAX_CPU_KERNEL=0 where a row says
so, and float32 weights that are block codes kept as plain float32 with HSD_JAX_BLOCK_CODES=0 in
the "-plain" row), on the same model, cache size and context, timed as the profiler times c(k)
(`planning.profile.measure_costs`: compile excluded, median of repeats, the cache updated in place
as decoding updates it). Prints one table (ms and the ratio to k=1) and, with --json, writes it.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

LLVM_GEMM_FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_dot --xla_cpu_multi_thread_eigen=false "
    "--xla_backend_extra_options=xla_force_enable_experimental_llvm_ir_gemm,"
    "xla_llvm_ir_gemm_tile_size=16:4:1*vectwidth --xla_cpu_prefer_vector_width=512"
)
ON, OFF = {"HSD_JAX_CPU_KERNEL": "1", "HSD_JAX_BLOCK_CODES": "1"}, {"HSD_JAX_CPU_KERNEL": "0"}
PLAIN = {"HSD_JAX_CPU_KERNEL": "1", "HSD_JAX_BLOCK_CODES": "0"}
CONFIGS = {  # name: (dtype, layout, extra XLA flags, environment: our CPU kernel, block codes)
    "f32-stacked": ("float32", "stacked", "", OFF),
    "f32-unstacked-xla": ("float32", "unstacked", "", OFF),
    "f32-unstacked-llvm-gemm": ("float32", "unstacked", LLVM_GEMM_FLAGS, OFF),
    "f32-unstacked-kernel-plain": ("float32", "unstacked", "", PLAIN),
    "f32-unstacked-kernel": ("float32", "unstacked", "", ON),
    "bf16-unstacked-xla": ("bfloat16", "unstacked", "", OFF),
    "bf16-unstacked-llvm-gemm": ("bfloat16", "unstacked", LLVM_GEMM_FLAGS, OFF),
    "bf16-unstacked-kernel": ("bfloat16", "unstacked", "", ON),
    "int8-xla": ("bfloat16", "int8", "", OFF),
    "int8-kernel": ("bfloat16", "int8", "", ON),
}


def child(model_dir: str, dtype: str, layout: str, ks: list[int], repeats: int, context: int) -> dict:
    from hsd_jax.io.checkpoint import load_model
    from hsd_jax.models import INT8
    from hsd_jax.planning.profile import measure_costs

    model = load_model(model_dir, dtype=dtype, layout="unstacked" if layout == "int8" else layout)
    if layout == "int8":
        model = model.with_layout(INT8)
    costs = measure_costs(model, 1, sparse_ks=ks, context=context, repeats=repeats)
    return {k: costs[k - 1] for k in ks}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--ks", default="1,2,4,8,16")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    if args.child:
        dtype, layout, _, _ = CONFIGS[args.child]
        print(json.dumps(child(args.model_dir, dtype, layout, ks, args.repeats, args.context)))
        return 0
    rows = {}
    for name in args.configs.split(","):
        _, _, flags, switches = CONFIGS[name]
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip(), **switches)
        cmd = [sys.executable, __file__, args.model_dir, "--child", name, "--ks", args.ks,
               "--repeats", str(args.repeats), "--context", str(args.context)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            rows[name] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
        else:
            rows[name] = {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
        row = rows[name]
        if "error" in row:
            print(f"{name:<26} error: {row['error']}")
        else:
            cells = "  ".join(f"k={k}: {row[k] * 1e3:6.1f} ms ({row[k] / row[ks[0]]:.2f}x)" for k in ks)
            print(f"{name:<26} {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"model": args.model_dir, "ks": ks, "context": args.context, "configs": rows}, f, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
