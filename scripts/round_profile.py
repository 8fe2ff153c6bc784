"""Where one HSD round's time goes: measured seconds per target round, split by level.

    .venv/bin/python scripts/round_profile.py [--plan checkpoints/plan-hsd.json] \
        [--stats checkpoints/stats.json]

Greedy, batch 1, on held-out prompts. Per prompt it measures the decode time (prefill
subtracted, as `hsd-jax validate-plan`) and the per-level forward-pass counts from
`hsd_generate`'s stats. Each level's share is its passes per round times its profiled cost c(k)
at the width it runs (`decoding.schedule`: M_0 one catch-up forward then 1-token steps per
batch; M_i its fixed verify width). What the costs do not explain is the recursion's own
overhead (sampling, buffers, masks, loop control).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from hsd_jax.bench.validate import measure
from hsd_jax.decoding.schedule import Schedule
from hsd_jax.planning import forward_cost, load_plan, load_stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", default="checkpoints/plan-hsd.json")
    p.add_argument("--stats", default="checkpoints/stats.json")
    p.add_argument("--prompts", default="hsd_jax/io/data/eval_prompts.jsonl")
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)

    stats, plan = load_stats(args.stats), load_plan(args.plan)
    row = measure(stats, [(plan.chain, plan.buffers)], args.prompts, num_prompts=args.num_prompts,
                  max_new_tokens=args.max_new_tokens, progress=False)[0]
    depth = len(plan.chain) - 1
    schedule = Schedule.of(plan.buffers)
    passes, rounds, tokens = np.asarray(row["forward_passes"]), row["target_rounds"], row["tokens"]
    per_round_ms = 1e3 * row["measured_s"] * tokens / rounds
    print(
        f"{plan.label}: {tokens / rounds:.2f} tokens per round, {per_round_ms:.1f} ms per round measured "
        f"({1e3 * row['measured_s']:.2f} ms/token; {args.num_prompts} prompts, "
        f"{args.max_new_tokens} new tokens)"
    )
    explained = 0.0
    for level, name in enumerate(plan.chain):
        table = stats.model(name).cost_s
        per_round = passes[level] / rounds
        if level == 0 and depth:  # per batch of T_0 drafts: one catch-up forward, then 1-token steps
            widths = schedule.draft_widths()
            ms = 1e3 * per_round / len(widths) * sum(forward_cost(table, w) for w in widths)
            how = f"{per_round:.2f} drafting steps"
        elif level == 0:  # the target alone: 1-token steps
            ms = 1e3 * per_round * forward_cost(table, 1)
            how = f"{per_round:.2f} decoding steps"
        else:
            width = schedule.verify_width(level)
            ms = 1e3 * per_round * forward_cost(table, width)
            how = f"{per_round:.2f} passes of {width} tokens"
        explained += ms
        print(f"  level {level} {name:<28} {how:<26} {ms:7.1f} ms  ({100 * ms / per_round_ms:4.1f}%)")
    rest = per_round_ms - explained
    print(f"  not explained by c(k) (overhead of the recursion, cost-model error) {rest:7.1f} ms  "
          f"({100 * rest / per_round_ms:4.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
