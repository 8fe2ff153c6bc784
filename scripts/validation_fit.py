"""Where `validate-plan`'s round-cost errors come from: a least-squares fit of the measured seconds
per target round over the passes each level ran.

    .venv/bin/python scripts/validation_fit.py docs/plan-validation.json checkpoints/stats.json
    .venv/bin/python scripts/validation_fit.py docs/plan-validation-pre-argmax.json \
        <(git show 1d4a49f:checkpoints/stats.json)   # the stats that run was priced with

Each row's round is priced from its measured forward passes per round (M_0: one catch-up forward
per batch, then 1-token steps; M_i: its fixed verify width) with the profiled c(k), split into the
target and its copies ("big": a name starting with the target's, a heuristic that fits the
shipped family's names) and the drafts ("small"). The fits, weighted by 1 / measured so
that every row counts alike: measured ~ s_big * big + s_small * small [+ o_step * M_0 steps per
round] [+ o_mid * middle-level passes per round]. s = 1 and o = 0 is a cost model that prices the
loop exactly; a positive o_step is work every drafting step pays beyond its forward.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from hsd_jax.decoding.schedule import Schedule
from hsd_jax.planning import draft_cost, forward_cost, load_stats

FEATURES = ("s_big", "s_small", "o_step_ms", "o_mid_ms")


def features(row: dict, stats) -> list[float]:
    chain, depth = row["chain"], len(row["chain"]) - 1
    passes = np.asarray(row["forward_passes"]) / row["target_rounds"]
    tables = [stats.model(name).cost_s for name in chain]
    if depth == 0:
        return [forward_cost(tables[0], 1) * passes[0], 0.0, 0.0, 0.0]
    schedule = Schedule.of(row["buffers"])
    batches = passes[1]  # M_0 drafts one batch per level-1 verification, passes[0] steps in all
    parts = [batches * float(draft_cost(tables[0], depth, passes[0] / batches))]
    parts += [passes[i] * forward_cost(tables[i], schedule.verify_width(i)) for i in range(1, depth + 1)]
    big = sum(c for name, c in zip(chain, parts) if name.startswith(stats.target))
    small = sum(parts) - big
    return [big, small, passes[0], passes[1:depth].sum()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("validation", help="the --json of `hsd-jax validate-plan`")
    p.add_argument("stats", help="the stats.json it was made from")
    args = p.parse_args(argv)
    stats = load_stats(args.stats)
    rows = json.loads(Path(args.validation).read_text())["rows"]
    x = np.array([features(r, stats) for r in rows])
    y = np.array([r["measured_round_s"] for r in rows])
    weight = 1 / y
    for columns in ([0, 1], [0, 1, 2], [0, 1, 3], [0, 1, 2, 3]):
        coef, *_ = np.linalg.lstsq(x[:, columns] * weight[:, None], y * weight, rcond=None)
        error = x[:, columns] @ coef / y - 1
        shown = ", ".join(f"{FEATURES[c]} {v * (1e3 if c >= 2 else 1):.3f}" for c, v in zip(columns, coef))
        print(f"{shown}: rms error {100 * np.sqrt(np.mean(error ** 2)):.1f}%, "
              f"max {100 * np.abs(error).max():.1f}% over {len(rows)} hierarchies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
