"""`hsd-jax make-data`: self-generated chat data (Magpie) with the target's top-k, resumable."""

from __future__ import annotations

import argparse

from hsd_jax.cli.common import add_dtype_argument
from hsd_jax.decoding.ar import positive_int
from hsd_jax.io.checkpoint import require_model_dir
from hsd_jax.io.files import write_json
from hsd_jax.io.prompts import eval_prompts_path, instructions_path, load_prompts
from hsd_jax.train.magpie import make_corpus


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "make-data",
        help="self-generated chat data for distillation (Magpie), resumable",
        description="The target writes user messages (Magpie), then answers them (greedy and T=1 shards); "
        "its top-k log-probabilities are cached. Run it again to continue a stopped run.",
    )
    p.add_argument("--target", required=True, help="the target model directory")
    p.add_argument("--out-dir", required=True, help="shard directory (resumed when it has shards)")
    p.add_argument("--answer-tokens", type=int, default=1_000_000, help="stop once the shards hold this many")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-answer-tokens", type=int, default=256)
    p.add_argument("--top-k", type=int, default=32, help="teacher log-probabilities cached per position")
    p.add_argument("--seed-instructions", help="JSONL answered first (default: the shipped instruction set)")
    p.add_argument(
        "--eval-prompts",
        action="append",
        help="JSONL prompts no instruction may overlap (default: the shipped evaluation prompts)",
    )
    p.add_argument("--max-seconds", type=float,
                   help="stop before a shard would end past this many seconds (run it again to go on)")
    p.add_argument("--seed", type=int, default=0)
    add_dtype_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    for name in ("answer_tokens", "batch_size", "max_answer_tokens", "top_k"):
        positive_int("--" + name.replace("_", "-"), getattr(args, name))
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise ValueError(f"--max-seconds must be > 0, got {args.max_seconds}")
    require_model_dir(args.target)
    eval_prompts = [p for path in (args.eval_prompts or [eval_prompts_path()]) for p in load_prompts(path)]
    seeds = load_prompts(args.seed_instructions or instructions_path())
    summary = make_corpus(
        args.target,
        args.out_dir,
        answer_tokens=args.answer_tokens,
        eval_prompts=eval_prompts,
        seed_instructions=seeds,
        batch_size=args.batch_size,
        max_answer_tokens=args.max_answer_tokens,
        top_k=args.top_k,
        seed=args.seed,
        dtype=args.dtype,
        max_seconds=args.max_seconds,
    )
    write_json(f"{args.out_dir}/corpus.json", summary)
    print(
        f"wrote {args.out_dir}: {summary['shards']} shards, {summary['answer_tokens']} answer "
        f"tokens ({summary['new_answer_tokens']} new, {summary['wall_s']:.0f}s: "
        + ", ".join(f"{phase} {s:.0f}s" for phase, s in summary["seconds"].items()) + ")"
    )
    return 0
