"""`hsd-jax plan`: choose a hierarchy from profiled stats, print it and write plan.json."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from hsd_jax.io.files import check_output_file, write_bytes
from hsd_jax.planning import MODES, Plan, load_stats, save_plan, solve
from hsd_jax.planning.plan import outside_sources


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `plan` subcommand to an argparse subparsers object (handler: `run`)."""
    p = subparsers.add_parser("plan", help="choose models and buffer targets from profiled stats")
    p.add_argument("--stats", required=True, help="stats.json written by `hsd-jax profile`")
    p.add_argument("--out", required=True, help="where to write plan.json")
    p.add_argument("--plot", help="also write a bar chart (PNG) of the best plans' predicted ms/token")
    p.add_argument("--n-max", type=int, default=32, help="largest buffer target to consider (default 32)")
    p.add_argument(
        "--temperature-mode",
        choices=MODES,
        default=None,
        help="acceptance table to use (default: greedy if the stats' temperature is 0, else sampled)",
    )
    p.add_argument("--measure", help='JSON {"<plan label>": measured seconds per token} to compare and plot')
    p.add_argument("--top", type=int, default=5, help="how many plans to report (default 5)")
    p.add_argument("--position-profiles", action="store_true",
                   help="use the stats' per-position acceptance profiles instead of one i.i.d. rate per pair "
                        "(on the default family the i.i.d. rate predicted measured latency better)")
    p.add_argument(
        "--min-drafts",
        type=int,
        default=0,
        help="only hierarchies with at least this many drafts (default 0: the target alone may win)",
    )
    return p


def _load_measured(path: str | None) -> dict[str, float]:
    """{plan label: measured seconds per token} from a JSON file ({} without one)."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, Mapping) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            for v in data.values()):
        raise ValueError(f"{path} must be a JSON object {{\"<plan label>\": seconds per token > 0}}")
    return {str(k): float(v) for k, v in data.items()}


def format_table(plans: Sequence[Plan], measured: Mapping[str, float] | None = None) -> str:
    """The plans as a text table: predicted (exact) and surrogate ms/token, speed-up over AR."""
    measured = measured or {}
    width = max(len(p.label) for p in plans)
    head = f"{'#':>2}  {'hierarchy':<{width}}  {'ms/token':>9}  {'speed-up':>8}  {'surrogate':>9}"
    head += f"  {'measured':>9}" if measured else ""
    rows = [head]
    for rank, p in enumerate(plans, 1):
        surrogate = (
            f"{1e3 * p.surrogate_latency_s:9.3f}" if p.surrogate_latency_s is not None else f"{'-':>9}"
        )
        row = (f"{rank:>2}  {p.label:<{width}}  {1e3 * p.predicted_latency_s:9.3f}  "
               f"{p.predicted_speedup:7.2f}x  {surrogate}")
        if measured:
            row += f"  {1e3 * measured[p.label]:9.3f}" if p.label in measured else f"  {'-':>9}"
        rows.append(row)
    return "\n".join(rows)


def plot_plans(
    plans: Sequence[Plan], path: str | os.PathLike, measured: Mapping[str, float] | None = None
) -> None:
    """Bar chart of predicted ms/token per plan (labelled chain[buffers]), with measured ms/token
    overlaid as markers where `measured` has the plan's label. Agg backend, written atomically."""
    from matplotlib.figure import Figure

    measured = measured or {}
    labels = [p.label for p in plans]
    fig = Figure(figsize=(9, 1.5 + 0.5 * len(plans)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(plans))
    predicted = [1e3 * p.predicted_latency_s for p in plans]
    ax.barh(y, predicted, color="tab:blue", label="predicted")
    for k, (ms, p) in enumerate(zip(predicted, plans)):
        ax.annotate(f"{p.predicted_speedup:.2f}x", (ms, k), xytext=(-3, 0), textcoords="offset points",
                    ha="right", va="center", color="white", fontsize=8)
    hits = [(k, measured[label]) for k, label in enumerate(labels) if label in measured]
    if hits:
        ax.scatter([1e3 * s for _, s in hits], [k for k, _ in hits], color="tab:red", marker="D", zorder=3,
                   label="measured")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("ms per token")
    ax.set_title(f"speed-up over AR ({1e3 * plans[0].ar_latency_s:.3f} ms/token)", fontsize=10)
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    write_bytes(path, buffer.getvalue())


def run(args: argparse.Namespace) -> int:
    """`hsd-jax plan`: solve, print the chosen hierarchy and runner-ups, write plan.json (its model
    directories relative to the plan file's directory, where they resolve) and the plot."""
    for out in (args.out, args.plot):
        if out:
            check_output_file(out)  # before solving, not after it
    stats = load_stats(args.stats)
    measured = _load_measured(args.measure)
    plans = solve(stats, n_max=args.n_max, mode=args.temperature_mode, top=args.top,
                  position_profiles=args.position_profiles, min_drafts=args.min_drafts)
    best = plans[0]
    print(f"chosen: {best.label}")
    print(
        f"predicted {1e3 * best.predicted_latency_s:.3f} ms/token, {best.predicted_speedup:.2f}x over AR "
        f"({1e3 * best.ar_latency_s:.3f} ms/token; {best.mode} acceptance, "
        f"{stats.hardware or 'unknown hardware'})"
    )
    print(format_table(plans, measured))
    unknown = sorted(set(measured) - {p.label for p in plans})
    if unknown:
        print(f"measured labels not among these plans: {unknown}")
    # the stats' model directories are relative to the working directory it was profiled from
    written = best.relative_to(Path(args.out).absolute().parent, base_dir=Path.cwd())
    save_plan(written, args.out)
    print(f"wrote {args.out}")
    outside = outside_sources(written)
    if outside:
        print(f"note: {args.out} names models outside its directory ({', '.join(outside)}); loading it "
              "needs --allow-outside-plan-dir (or write the plan beside the models)")
    if args.plot:
        plot_plans(plans, args.plot, measured)
        print(f"wrote {args.plot}")
    return 0
