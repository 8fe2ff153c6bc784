"""`hsd-jax profile`: the planner's stats (forward costs c_i(k) and pairwise acceptances) for a family."""

from __future__ import annotations

import argparse

from hsd_jax.cli.common import (
    add_dtype_argument,
    add_mesh_argument,
    int_list,
    mesh_from_args,
    progress_printer,
)
from hsd_jax.io.files import check_output_file, write_json
from hsd_jax.io.prompts import load_prompts
from hsd_jax.planning.profile import profile_family


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile", help="measure forward costs c_i(k) and pairwise acceptances for the planner"
    )
    p.add_argument("--models", nargs="+", required=True,
                   help="family members smallest first, target last: model dirs or int8:DIR")
    p.add_argument("--ngram", type=int, default=0, help="add the n-gram drafter with this n")
    p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field per line (held-out prompts)")
    p.add_argument("--num-prompts", type=int, default=0, help="use only the first N prompts (0: all)")
    p.add_argument("--out", required=True)
    p.add_argument("--temperature", type=float, default=1.0, help="for the sampling acceptance sum min(p, q)")
    p.add_argument("--max-k", type=int, default=16, help="measure c(k) for every k up to this")
    p.add_argument("--sparse-k", type=int_list, default=[],
                   help="larger k to measure too, e.g. 16,24,32,48 (the k between are interpolated)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--cache-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15,
                   help="timed rounds (each runs every member at every k once); the median is kept")
    add_dtype_argument(p)
    add_mesh_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    check_output_file(args.out)  # before the run, not after it
    sources = list(args.models)
    if args.ngram:
        sources.insert(0, f"ngram:{args.ngram}")
    prompts = load_prompts(args.prompts)[:args.num_prompts or None]
    if not prompts:
        raise ValueError(f"{args.prompts} holds no prompts; give a JSONL file with a \"prompt\" field "
                         "per line")
    stats = profile_family(sources, prompts, temperature=args.temperature, max_k=args.max_k, dtype=args.dtype,
                           sparse_ks=args.sparse_k, max_new_tokens=args.max_new_tokens,
                           cache_size=args.cache_size, repeats=args.repeats, mesh=mesh_from_args(args),
                           progress=progress_printer)
    write_json(args.out, stats)
    for m in stats["models"]:
        costs = m["cost_s"]
        print(
            f"{m['name']:>28}: c(1) = {costs[0] * 1e3:7.2f} ms, "
            f"c(8) = {costs[min(7, len(costs) - 1)] * 1e3:7.2f} ms"
        )
    print(f"wrote {args.out}")
    return 0
