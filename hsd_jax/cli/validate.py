"""`hsd-jax validate-plan`: run hierarchies for real and print measured decode ms/token beside the
planner's prediction (`bench.validate`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from hsd_jax.bench.plots import plot_validation
from hsd_jax.bench.validate import candidates, format_rows, measure, profile_workload, summarise
from hsd_jax.cli.common import progress_printer
from hsd_jax.io.files import check_output_file, write_text
from hsd_jax.planning import load_plan, load_stats


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "validate-plan", help="measure hierarchies and compare with the planner's predictions"
    )
    p.add_argument("--stats", required=True, help="stats.json written by `hsd-jax profile`")
    p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field per line")
    p.add_argument("--plan", help="plan.json: measured too, and checked against the best measured")
    p.add_argument("--grid", action="store_true", help="measure the grid of small hierarchies (see `grid`)")
    p.add_argument("--top", type=int, default=6, help="also measure the planner's N best plans")
    p.add_argument("--num-prompts", type=int,
                   help="prompts to run (default: as many as the profile measured acceptances on, else 6)")
    p.add_argument("--max-new-tokens", type=int,
                   help="tokens per prompt (default: the profile's answer length, else 48)")
    p.add_argument("--json", dest="json_out")
    p.add_argument("--plot")
    return p


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers for json."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def run(args: argparse.Namespace) -> int:
    for out in (args.json_out, args.plot):
        if out:
            check_output_file(out)  # before the run, not after it
    stats = load_stats(args.stats)
    plan = load_plan(args.plan) if args.plan else None
    hierarchies = candidates(stats, plan, top=args.top, use_grid=args.grid)
    num_prompts, max_new_tokens = profile_workload(stats)
    rows = measure(stats, hierarchies, args.prompts,
                   num_prompts=num_prompts if args.num_prompts is None else args.num_prompts,
                   max_new_tokens=max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
                   progress=progress_printer)
    summary = summarise(rows, plan.label if plan else None)
    print(format_rows(rows))
    print(json.dumps(summary, indent=1, default=_plain))
    if args.json_out:
        write_text(args.json_out, json.dumps({"summary": summary, "rows": rows, "stats": args.stats,
                                              "hardware": stats.hardware}, indent=1, default=_plain))
    if args.plot:
        plot_validation(rows, args.plot)
    return 0
