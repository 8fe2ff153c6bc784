"""Held-out agreement of draft snapshots with the target: the curve against training steps and data.

Each DRAFT_DIR is a draft written by `hsd-jax distill` (a milestone or a final one); its
distill_summary.json gives the steps it has trained. The target's greedy answers to the first
N evaluation prompts are generated once; every draft is scored teacher-forced on them, as
`hsd-jax profile` does (greedy agreement, and sum min(p, q) at T=1).

    python scripts/agreement_curve.py --target checkpoints/smollm2-135m-instruct \\
        --drafts distill/snaps/step-* checkpoints/smollm2-draft-2l --num-prompts 24 \\
        --out docs/agreement-curve.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hsd_jax.io.checkpoint import load_model, load_tokenizer
from hsd_jax.io.files import write_json
from hsd_jax.io.prompts import eval_prompts_path, load_prompts
from hsd_jax.planning.profile import measure_acceptance, target_continuations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--drafts", nargs="+", required=True)
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()
    target = load_model(args.target)
    prompts = load_prompts(eval_prompts_path())[:args.num_prompts]
    tokenizer = load_tokenizer(args.target)
    sequences, starts = target_continuations(target, tokenizer, prompts, args.max_new_tokens)
    rows = []
    for directory in args.drafts:
        summary = json.loads((Path(directory) / "distill_summary.json").read_text())
        draft = load_model(directory, dtype="float32")
        found = measure_acceptance([draft, target], sequences, starts, temperature=1.0,
                                   vocab=target.vocab_size)
        rows.append({"draft": str(directory), "steps": summary.get("steps_done", summary["steps"]),
                     "data_answer_tokens": summary.get("data_answer_tokens"),
                     "greedy_agreement": round(float(found["greedy"][0, 1]), 4),
                     "sum_min_t1": round(float(found["sampled"][0, 1]), 4)})
        print(rows[-1], flush=True)
        if args.out:  # after every draft: a run stopped early keeps what it scored
            write_json(args.out, {"target": args.target, "prompts": len(prompts),
                                  "answer_positions": int(found["positions"]),
                                  "rows": sorted(rows, key=lambda r: r["steps"])})


if __name__ == "__main__":
    main()
