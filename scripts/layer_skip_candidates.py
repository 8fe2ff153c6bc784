"""Layer-skipped copies of the target as free middle levels: their cost and agreement, measured.

Each candidate keeps a subset of the target's layers, untrained, with the target's own full head
(`train.distill.init_draft` with every token id). Costs are `hsd-jax profile`'s c(1) and c(8);
agreement is greedy agreement and sum min(p, q) at T=1 with the target on its greedy answers to
the held-out prompts, as `hsd-jax profile` measures them. A middle level pays (issue 14's
counterfactuals) at agreement >= 0.75 for <= 0.35-0.5 of the target's cost.

    python scripts/layer_skip_candidates.py --target checkpoints/smollm2-135m-instruct \\
        --out docs/layer-skip.json
"""

from __future__ import annotations

import argparse

import numpy as np

from hsd_jax.io.checkpoint import load_model, load_tokenizer
from hsd_jax.io.files import write_json
from hsd_jax.io.prompts import eval_prompts_path, load_prompts
from hsd_jax.planning.profile import measure_acceptance, measure_costs, target_continuations
from hsd_jax.train.distill import DraftSpec, init_draft

# name: kept target layers (of SmolLM2's 30)
CANDIDATES = {
    "drop-12..17 (24 layers)": [i for i in range(30) if not 12 <= i <= 17],
    "drop-10..19 (20 layers)": [i for i in range(30) if not 10 <= i <= 19],
    "every-3rd-dropped (20 layers)": [i for i in range(30) if i % 3 != 1],
    "every-other + last (16 layers)": list(range(0, 30, 2)) + [29],
    "drop-8..22 (15 layers)": [i for i in range(30) if not 8 <= i <= 22],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()
    target = load_model(args.target, dtype="float32")
    prompts = load_prompts(eval_prompts_path())[:args.num_prompts]
    tokenizer = load_tokenizer(args.target)
    sequences, starts = target_continuations(target, tokenizer, prompts, args.max_new_tokens)
    stacked = target.with_layout("stacked")  # the same weights, without a second read from disk
    every_id = np.arange(target.vocab_size, dtype=np.int32)
    target_cost = measure_costs(target, 8)
    rows = []
    for name, layers in CANDIDATES.items():
        copy = init_draft(stacked, DraftSpec(tuple(layers), len(every_id)), every_id, embedding_source="")
        copy = copy.with_layout(target.layout)
        cost = measure_costs(copy, 8)
        found = measure_acceptance([copy, target], sequences, starts, temperature=1.0,
                                   vocab=target.vocab_size)
        rows.append({"candidate": name, "layers": layers, "cost_1_ms": round(cost[0] * 1e3, 2),
                     "cost_8_ms": round(cost[7] * 1e3, 2), "cost_ratio_1": round(cost[0] / target_cost[0], 3),
                     "greedy_agreement": round(float(found["greedy"][0, 1]), 4),
                     "sum_min_t1": round(float(found["sampled"][0, 1]), 4)})
        print(rows[-1], flush=True)
    result = {"target": args.target, "target_cost_1_ms": round(target_cost[0] * 1e3, 2),
              "target_cost_8_ms": round(target_cost[7] * 1e3, 2), "prompts": len(prompts),
              "answer_positions": int(found["positions"]), "rows": rows}
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
