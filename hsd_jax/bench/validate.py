"""Check the planner against measurement: run hierarchies for real and compare the measured
seconds per committed token with `planner.expected_latency` (issue: prediction within 15%, and
the chosen plan within 5% of the best measured over a grid of small hierarchies).

    hsd-jax validate-plan --stats stats.json --prompts eval.jsonl [--plan plan.json] [--grid]
        [--num-prompts N] [--max-new-tokens N] [--json out.json] [--plot out.png]

(the command is `cli/validate.py`; the chart `bench.plots.plot_validation`.)

Decode latency excludes prefill: every model of a hierarchy first runs `generate.prefill` over
the (padded) prompt, whose time is measured per model and subtracted from each run (plain AR's
first token comes from that prefill, so its rest is divided by the tokens after it). The
measured figure is then the per-token cost the latency model describes.

The prediction is a round's cost over its committed tokens (`expected_round`), and each is
checked on its own: tokens per target round (the acceptances) and milliseconds per round (the
costs c(k)). The stats' acceptances are averages over the profile's prompts, so other prompts
(fewer, or different) move the tokens per round before any cost error; the command runs the
profile's own number of prompts and answer length unless told otherwise.
"""

from __future__ import annotations

import functools
import itertools
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from hsd_jax.bench.methods import time_jax_method
from hsd_jax.decoding.ar import prefill
from hsd_jax.decoding.hsd import Hierarchy, hsd_generate
from hsd_jax.io.checkpoint import encode_prompt, load_tokenizer
from hsd_jax.io.prompts import load_prompts, pad_prompts
from hsd_jax.io.sources import from_source, parse_source
from hsd_jax.models import Model
from hsd_jax.planning import Plan, RoundPrediction, Stats, acceptance_mode, expected_round, plan_label, solve
from hsd_jax.planning.timing import median_seconds

GRID_BUFFERS_K1 = (2, 4, 8)
GRID_BUFFERS_K2 = ((2, 4), (4, 8))


def grid(
    stats: Stats,
    k1_buffers: Sequence[int] = GRID_BUFFERS_K1,
    k2_buffers: Sequence[tuple[int, int]] = GRID_BUFFERS_K2,
) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """Small hierarchies over the profiled family: the target alone, every single draft with each
    of `k1_buffers`, and every two-draft chain (ordered by c(1)) with each of `k2_buffers`."""
    names = [m.name for m in stats.candidates()]
    target, drafts = names[-1], names[:-1]
    out: list[tuple[tuple[str, ...], tuple[int, ...]]] = [((target,), ())]
    out += [((d, target), (n,)) for d in drafts for n in k1_buffers]
    out += [((a, b, target), bufs) for a, b in itertools.combinations(drafts, 2) for bufs in k2_buffers]
    return out


def predict(
    stats: Stats, chain: Sequence[str], buffers: Sequence[int], mode: str, position_profiles: bool
) -> RoundPrediction:
    return expected_round(*stats.chain_inputs(list(chain), mode, position_profiles), list(buffers))


def candidates(stats: Stats, plan: Plan | None = None, top: int = 0,
               use_grid: bool = False) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """The hierarchies to measure, each once and in order: `plan`'s, the planner's `top` best
    (greedy) and, with `use_grid`, the `grid`."""
    hierarchies: list[tuple[Sequence[str], Sequence[int]]] = []
    if plan is not None:
        hierarchies.append((plan.chain, plan.buffers))
    if top:
        hierarchies += [(p.chain, p.buffers) for p in solve(stats, mode="greedy", top=top)]
    if use_grid:
        hierarchies += grid(stats)
    unique = list(dict.fromkeys((tuple(c), tuple(b)) for c, b in hierarchies))
    if not unique:
        raise ValueError("nothing to measure: give --plan, --top N or --grid")
    return unique


def profile_workload(stats: Stats) -> tuple[int, int]:
    """(prompts, new tokens per prompt) the stats' acceptances were measured on, or (6, 48) for
    stats that do not say."""
    if stats.prompts and stats.answer_positions:
        return stats.prompts, max(stats.answer_positions // stats.prompts, 1)
    return 6, 48


def measure(stats: Stats, hierarchies: Sequence[tuple[Sequence[str], Sequence[int]]], prompts_file: str, *,
            num_prompts: int = 6, max_new_tokens: int = 48, verifier: str = "tokenwise",
            progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Greedy, batch 1: per hierarchy the median over prompts of decode seconds per committed token
    (prefill excluded) and the mean tokens per target round, with the predictions of both.
    `progress(message)` is called as each hierarchy starts."""
    mode = acceptance_mode(0.0)
    target_source = stats.model(stats.target).source
    target = from_source(target_source, dtype=stats.dtype or None)
    levels = {stats.target: target}
    tokenizer = load_tokenizer(parse_source(target_source).directory())
    texts = load_prompts(prompts_file)[:num_prompts or None]
    prompts, lengths = pad_prompts([encode_prompt(tokenizer, t) for t in texts])
    prefill_s: dict[str, float] = {}

    def level(name: str):
        if name not in levels:
            levels[name] = from_source(stats.model(name).source, vocab_size=target.vocab_size,
                                       dtype=target.dtype)
        return levels[name]

    def prefill_seconds(name: str) -> float:
        """`generate.prefill` of the padded prompt: what `hsd_generate` runs per model before decoding."""
        if name not in prefill_s:
            model = level(name)
            if not isinstance(model, Model):
                prefill_s[name] = 0.0
            else:
                cache_size = prompts.shape[1] + max_new_tokens + 64
                run = jax.jit(lambda m, t, n: prefill(m, t, n, m.init_cache(1, cache_size))[0])
                prefill_s[name] = median_seconds(run, model, prompts[:1], lengths[:1], repeats=5)
        return prefill_s[name]

    rows = []
    key = jax.random.PRNGKey(0)
    reference = None
    for number, (chain, buffers) in enumerate(hierarchies):
        chain, buffers = tuple(chain), tuple(buffers)
        label = plan_label(chain, buffers)
        if progress:
            progress(f"[{number + 1}/{len(hierarchies)}] {label}")
        hierarchy = Hierarchy([level(n) for n in chain], buffers, verifier)
        run = jax.jit(lambda h, p, n: hsd_generate(h, p, n, key, max_new_tokens=max_new_tokens))
        timed = time_jax_method(functools.partial(run, hierarchy), prompts, lengths)
        overhead = sum(prefill_seconds(n) for n in chain)
        # AR's first token comes from its prefill; a hierarchy's prefill only caches the prompt
        first_from_prefill = 1 if len(chain) == 1 else 0
        per_token = [max(s - overhead, 0.0) / max(len(t) - first_from_prefill, 1) for s, t, _ in timed]
        tokens = [t for _, t, _ in timed]
        reference = reference or tokens
        iid = predict(stats, chain, buffers, mode, False)
        tokens_per_call = float(np.mean([np.asarray(st.tokens_per_target_call)[0] for _, _, st in timed]))
        measured = statistics.median(per_token)
        rows.append({"label": label, "chain": list(chain), "buffers": list(buffers),
                     "measured_s": measured,
                     "predicted_iid_s": iid.latency,
                     "predicted_profile_s": predict(stats, chain, buffers, mode, True).latency,
                     "tokens_per_target_call": tokens_per_call,
                     "predicted_tokens_per_target_call": iid.tokens,
                     # seconds per target round: the measured latency times the measured tokens
                     # per round, against the model's E[round cost] (i.i.d. acceptance)
                     "measured_round_s": measured * tokens_per_call,
                     "predicted_round_s": iid.seconds,
                     # per prompt, averaged: forward passes per level (M_0's drafting steps, then
                     # verification passes of M_1..M_K), target rounds and committed tokens
                     "forward_passes": np.mean([np.asarray(st.forward_passes)[0] for _, _, st in timed],
                                               axis=0).tolist(),
                     "target_rounds": float(np.mean([np.asarray(st.target_rounds)[0] for _, _, st in timed])),
                     "tokens": float(np.mean([len(t) for t in tokens])),
                     "identical_to_first": tokens == reference})
    return rows


def summarise(rows: Sequence[dict[str, Any]], chosen: str | None) -> dict[str, Any]:
    """Prediction errors per row and, for the chosen plan, its distance from the best measured."""
    for r in rows:
        for kind in ("iid", "profile"):
            r[f"error_{kind}"] = r[f"predicted_{kind}_s"] / r["measured_s"] - 1
        r["error_tokens"] = r["predicted_tokens_per_target_call"] / r["tokens_per_target_call"] - 1
        r["error_round"] = r["predicted_round_s"] / r["measured_round_s"] - 1
    best = min(rows, key=lambda r: r["measured_s"])
    out: dict[str, Any] = {"best_measured": best["label"], "best_measured_s": best["measured_s"],
                           "within_15pct_profile": sum(abs(r["error_profile"]) <= 0.15 for r in rows),
                           "within_15pct_iid": sum(abs(r["error_iid"]) <= 0.15 for r in rows),
                           "hierarchies": len(rows)}
    hit = [r for r in rows if r["label"] == chosen]
    if hit:
        out["chosen"] = chosen
        out["chosen_over_best"] = hit[0]["measured_s"] / best["measured_s"]
    return out


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    width = max(len(r["label"]) for r in rows)
    lines = [f"{'hierarchy':<{width}}  measured  pred(iid)  err    pred(prof)  err     tokens/round"
             f"         ms/round (iid)",
             f"{'':<{width}}  ms/token  ms/token          ms/token           meas  pred  err     "
             f"meas   pred  err"]
    for r in sorted(rows, key=lambda r: r["measured_s"]):
        lines.append(f"{r['label']:<{width}}  {1e3 * r['measured_s']:8.2f}  {1e3 * r['predicted_iid_s']:9.2f}"
                     f"  {100 * r['error_iid']:+5.1f}%  {1e3 * r['predicted_profile_s']:9.2f}"
                     f"  {100 * r['error_profile']:+5.1f}%  {r['tokens_per_target_call']:5.2f} "
                     f"{r['predicted_tokens_per_target_call']:5.2f} {100 * r['error_tokens']:+5.1f}%"
                     f"  {1e3 * r['measured_round_s']:5.1f}  {1e3 * r['predicted_round_s']:5.1f} "
                     f"{100 * r['error_round']:+5.1f}%")
    return "\n".join(lines)
