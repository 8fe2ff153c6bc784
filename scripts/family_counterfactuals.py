"""Which drafts would make a two-draft hierarchy pay? The planner's latency model on counterfactual
members built from measured cost tables.

For a grid of (greedy agreement `a` of the cheapest draft with the target; cost fraction `r` and
agreement `m` of a middle level), it prices the best buffers of
  * `cheap > target` and `middle > target` (the best single draft), and
  * `cheap > middle > target`,
and reports the two-draft hierarchy's speed-up over AR and over the best single draft. Agreements
are i.i.d. rates; alpha(cheap, middle) = b is its own axis (default: b = a).

Costs: the cheapest draft runs the measured table of `--cheap` (e.g. the int8 2-layer draft); the
middle level runs the target's measured table scaled by r (a middle with r of the target's
layers); the target its own. b = a holds for an int8/bf16 copy of the target as the middle
(measured 0.374 vs 0.378); a weak middle agrees more with the cheap draft (the old 10-layer draft:
0.48 vs 0.38), a draft distilled from the middle more still.

    python scripts/family_counterfactuals.py --stats checkpoints/stats.json --out docs/counterfactuals.json

`--target-ratios 1.3,2.0` also prices a target whose k-token pass costs differently: c(k) =
c(1) (1 + (s - 1)(k - 1) / 7) for each s = c(8)/c(1) (the measured c(1); the middle level scaled
from that table as above), to ask how flat verification must be for a two-draft hierarchy to pay.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from hsd_jax.io.files import write_json
from hsd_jax.planning.latency import expected_latency
from hsd_jax.planning.stats import load_stats


def best(costs, acceptances, max_buffer: int) -> tuple[float, tuple[int, ...]]:
    """The lowest predicted seconds per token over buffers 1..max_buffer at every level."""
    depth = len(costs) - 1
    options = [(expected_latency(costs, acceptances, b), b)
               for b in itertools.product(range(1, max_buffer + 1), repeat=depth)]
    return min(options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stats", required=True)
    parser.add_argument("--cheap", default="smollm2-draft-2l-int8",
                        help="member whose cost table the cheap draft has")
    parser.add_argument("--agreements", default="0.38,0.45,0.55,0.65,0.75")
    parser.add_argument("--middle-costs", default="0.15,0.25,0.35,0.5")
    parser.add_argument("--middle-agreements", default="0.6,0.75,0.9")
    parser.add_argument("--cheap-middle-agreements", default="same",
                        help="alpha(cheap, middle) values, or 'same': equal to alpha(cheap, target)")
    parser.add_argument("--target-ratios", default="measured",
                        help="c(8)/c(1) values for a linear target cost table, or 'measured' (comma list)")
    parser.add_argument("--max-buffer", type=int, default=12)
    parser.add_argument("--out")
    args = parser.parse_args()
    stats = load_stats(args.stats)
    measured = np.asarray(stats.model(stats.target).cost_s)
    cheap = np.asarray(stats.model(args.cheap).cost_s)
    ar = float(measured[0])
    rows = []
    for ratio in args.target_ratios.split(","):
        target = measured if ratio == "measured" else linear_costs(ar, float(ratio), len(measured))
        rows += grid(args, cheap, target, ar, ratio)
    result = {"stats": args.stats, "dtype": stats.dtype, "cheap_costs_from": args.cheap,
              "assumption": "middle cost = r x target table; alpha(cheap, middle) = b "
                            "(= alpha(cheap, target) when --cheap-middle-agreements is 'same'); "
                            "target table measured, or linear through c(1) and c(8) = ratio x c(1)",
              "rows": rows}
    if args.out:
        write_json(args.out, result)


def linear_costs(c1: float, ratio: float, size: int) -> np.ndarray:
    """c(k) = c1 (1 + (ratio - 1)(k - 1) / 7) for k = 1..size: c(8) = ratio x c(1)."""
    return c1 * (1 + (ratio - 1) * np.arange(size) / 7)


def grid(args, cheap: np.ndarray, target: np.ndarray, ar: float, ratio: str) -> list[dict]:
    rows = []
    for a in (float(x) for x in args.agreements.split(",")):
        single_cheap = best([cheap, target], [a], args.max_buffer)
        lower = [a] if args.cheap_middle_agreements == "same" else [
            float(x) for x in args.cheap_middle_agreements.split(",")]
        for r, m, b in itertools.product((float(x) for x in args.middle_costs.split(",")),
                                         (float(x) for x in args.middle_agreements.split(",")), lower):
            middle = target * r
            single_middle = best([middle, target], [m], args.max_buffer)
            two = best([cheap, middle, target], [b, m], args.max_buffer)
            best_single = min(single_cheap, single_middle)
            rows.append({"target_c8_over_c1": ratio if ratio == "measured" else float(ratio),
                         "cheap_agreement": a, "cheap_middle_agreement": b, "middle_cost": r,
                         "middle_agreement": m,
                         "cheap_alone_x_ar": round(ar / single_cheap[0], 3),
                         "middle_alone_x_ar": round(ar / single_middle[0], 3),
                         "two_draft_x_ar": round(ar / two[0], 3), "two_draft_buffers": list(two[1]),
                         "two_draft_x_best_single": round(best_single[0] / two[0], 3)})
            print(f"c(8)/c(1)={ratio} a={a:.2f} b={b:.2f} r={r:.2f} m={m:.2f}: "
                  f"cheap {rows[-1]['cheap_alone_x_ar']:.2f}x, middle "
                  f"{rows[-1]['middle_alone_x_ar']:.2f}x, both {rows[-1]['two_draft_x_ar']:.2f}x AR "
                  f"{tuple(two[1])} = {rows[-1]['two_draft_x_best_single']:.2f}x the best single draft")
    return rows


if __name__ == "__main__":
    main()
