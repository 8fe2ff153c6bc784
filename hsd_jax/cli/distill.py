"""`hsd-jax distill`: train a draft for a target on the target's own answers."""

from __future__ import annotations

import argparse
from pathlib import Path

from hsd_jax.io.checkpoint import require_model_dir
from hsd_jax.io.files import check_output_dir, check_output_file
from hsd_jax.io.prompts import instructions_path, load_prompts
from hsd_jax.train.dataset import make_dataset
from hsd_jax.train.distill import DraftSpec, TrainConfig, distill

DEFAULT_DATA = "distill/data.npz"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "distill", help="distil a draft for a target (optax KL on the target's own answers)"
    )
    p.add_argument("--target", required=True, help="the target model directory")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--layers", required=True, help="target layers that initialise the draft, e.g. 0,29")
    p.add_argument("--head-vocab", type=int, default=8192, help="frequent-token head size (q = 0 elsewhere)")
    p.add_argument("--data", action="append",
                   help="cached answers + teacher top-k (a file, made if absent, or a `make-data` shard "
                        "directory); repeat to train on several "
                        f"(default: {DEFAULT_DATA})")
    p.add_argument(
        "--answer-temperature",
        type=float,
        action="append",
        help="temperature of the answers in each --data file made here, in order (default 0: greedy)",
    )
    p.add_argument(
        "--make-data", action="store_true", help="(re)make every --data file from the instruction set"
    )
    p.add_argument(
        "--instructions", help="JSONL instruction set (default: hsd_jax/io/data/instructions.jsonl)"
    )
    p.add_argument("--answer-tokens", type=int, default=128)
    p.add_argument("--generate-batch", type=int, default=32)
    p.add_argument("--top-k", type=int, default=32, help="teacher log-probabilities cached per position")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--work-dir", help="orbax checkpoints (weights and optimizer state) to resume from "
                                      "(default: OUT_DIR.work, removed once the draft is written)")
    p.add_argument("--resume-from", help="a draft directory written by distill (e.g. a committed milestone): "
                                         "continue from its weights and step count with a fresh optimizer")
    p.add_argument("--milestone-every", type=int, default=0,
                   help="write the bf16 draft to OUT_DIR every N steps (0: only at the end)")
    p.add_argument("--keep-milestones", action="store_true",
                   help="also keep each milestone beside OUT_DIR, as OUT_DIR-stepN (a draft of its own)")
    p.add_argument("--width-bucket", type=int, default=32,
                   help="pad each batch to a multiple of this many positions (one compile per width; "
                        "on a GPU a large value, one width, trains faster)")
    p.add_argument("--rewarm", type=int, default=100, help="warm-up steps after --resume-from")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the training products (float32 master weights either way)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    # every argument and output path is checked before hours of data generation and training
    spec = DraftSpec.parse(args.layers, args.head_vocab)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                        warmup_steps=args.warmup, checkpoint_every=args.checkpoint_every, seed=args.seed,
                        compute_dtype=args.compute_dtype, milestone_every=args.milestone_every,
                        keep_milestones=args.keep_milestones, width_bucket=args.width_bucket,
                        rewarm_steps=args.rewarm)
    require_model_dir(args.target)
    if args.resume_from:
        require_model_dir(args.resume_from)
    check_output_dir(args.out_dir, args.overwrite)
    paths = args.data or [DEFAULT_DATA]
    for path in paths:
        if not Path(path).is_dir():  # a directory holds `hsd-jax make-data` shards
            check_output_file(path)
    temperatures = args.answer_temperature or []
    if len(temperatures) > len(paths):
        raise ValueError(f"{len(temperatures)} --answer-temperature values for {len(paths)} --data files; "
                         "give at most one per file")
    temperatures += [0.0] * (len(paths) - len(temperatures))
    prompts = None
    for index, (path, temperature) in enumerate(zip(paths, temperatures)):
        if args.make_data and Path(path).is_dir():
            raise ValueError(f"{path} is a directory of shards; extend it with `hsd-jax make-data`, not "
                             "--make-data")
        if args.make_data or not Path(path).exists():
            prompts = prompts or load_prompts(args.instructions or instructions_path())
            make_dataset(
                args.target,
                prompts,
                path,
                max_new_tokens=args.answer_tokens,
                batch_size=args.generate_batch,
                top_k=args.top_k,
                temperature=temperature,
                seed=index,
            )
    summary = distill(args.target, paths, args.out_dir, spec, train, work_dir=args.work_dir,
                      resume_from=args.resume_from, overwrite=args.overwrite)
    print(f"wrote {args.out_dir}: {summary['steps']} steps, {summary['answer_tokens_seen']} answer tokens, "
          f"final loss {summary['loss'][-1][1]:.4f}, {summary['wall_s']:.0f}s")
    return 0
