"""Head vocabulary size for the 2-layer draft: what each size covers and what it costs, measured.

A draft's head scores only its N most frequent token ids (q = 0 elsewhere), so a target token
outside them can never be matched: the share of the target's held-out greedy tokens inside the
head bounds the draft's greedy agreement. Frequencies are counted as `hsd-jax distill` counts
them (the target's top-32 over its own answers, `train.dataset.frequent_token_ids`), on answers to
the shipped instructions, never the evaluation prompts. Costs are `hsd-jax profile`'s c(1), c(8)
of a 2-layer draft with that head (untrained: cost does not depend on the weights), float32 and int8,
timed before the data is made. `--draft` adds a trained draft's own head, whose ids were counted
on its whole training set.

    python scripts/head_vocab_candidates.py --target checkpoints/smollm2-135m-instruct \\
        --out docs/head-vocab.json
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

from hsd_jax.io.checkpoint import load_model, load_tokenizer
from hsd_jax.io.files import write_json
from hsd_jax.io.prompts import eval_prompts_path, instructions_path, load_prompts
from hsd_jax.models import quantize_int8
from hsd_jax.planning.profile import measure_costs, target_continuations
from hsd_jax.train.dataset import frequent_token_ids, load_dataset
from hsd_jax.train.distill import DraftSpec, init_draft
from hsd_jax.train.magpie import make_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--sizes", default="2048,4096,8192,16384")
    parser.add_argument("--answer-tokens", type=int, default=20000)
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--draft", help="also report this trained draft's own head (its coverage)")
    parser.add_argument("--out")
    args = parser.parse_args()
    target = load_model(args.target, dtype="float32")
    prompts = load_prompts(eval_prompts_path())[:args.num_prompts]
    sequences, starts = target_continuations(target, load_tokenizer(args.target), prompts, 64)
    held_out = np.concatenate([seq[start:] for seq, start in zip(sequences, starts)])
    sizes = [int(x) for x in args.sizes.split(",")]
    stacked = target.with_layout("stacked")  # the same weights, without a second read from disk
    costs = {}
    for size in sizes:  # before the data is made: timed on an otherwise idle process
        ids = np.arange(size, dtype=np.int32)
        draft = init_draft(stacked, DraftSpec((0, 29), size), ids, embedding_source="")
        draft = draft.with_layout(target.layout)
        costs[size] = measure_costs(draft, 8), measure_costs(quantize_int8(draft), 8)
    with tempfile.TemporaryDirectory() as shards:
        made = make_corpus(args.target, shards, answer_tokens=args.answer_tokens, eval_prompts=prompts,
                           seed_instructions=load_prompts(instructions_path()), dtype="bfloat16",
                           progress=False)
        data = load_dataset(shards)
    rows = []
    for size in sizes:
        head = frequent_token_ids(data, size, always=[target.config.eos_token_id])
        f32, int8 = costs[size]
        rows.append({"head_vocab": size, "held_out_coverage": round(float(np.isin(held_out, head).mean()), 4),
                     "cost_1_ms": round(f32[0] * 1e3, 3), "cost_8_ms": round(f32[7] * 1e3, 3),
                     "int8_cost_1_ms": round(int8[0] * 1e3, 3), "int8_cost_8_ms": round(int8[7] * 1e3, 3)})
        print(rows[-1], flush=True)
    if args.draft:
        head = np.asarray(load_model(args.draft, layout="stacked").params["head_ids"])
        rows.append({"head_vocab": int(head.size), "draft": args.draft,
                     "held_out_coverage": round(float(np.isin(held_out, head).mean()), 4)})
        print(rows[-1], flush=True)
    result = {"target": args.target, "counted_on_answer_tokens": made["answer_tokens"],
              "held_out_tokens": int(held_out.size), "prompts": len(prompts), "rows": rows}
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
