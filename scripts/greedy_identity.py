"""Greedy HSD against greedy AR of its target, token for token, on held-out prompts.

    .venv/bin/python scripts/greedy_identity.py checkpoints/plan.json checkpoints/plan-hsd.json \
        [--num-prompts 24] [--max-new-tokens 64] [--json docs/greedy-identity.json]

Each plan's hierarchy (in the plan's dtype) generates for every prompt of
hsd_jax/io/data/eval_prompts.jsonl, one prompt at a time, with `hsd_generate`; its target alone
with `ar_generate`; both at temperature 0. Reports, per plan, on how many prompts the two token
sequences are identical and the first differing position where they are not.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from hsd_jax.decoding.ar import ar_generate
from hsd_jax.decoding.hsd import hsd_generate
from hsd_jax.io.checkpoint import encode_prompt, load_tokenizer
from hsd_jax.io.files import write_json
from hsd_jax.io.prompts import load_prompts, pad_prompts
from hsd_jax.planning import hierarchy_from_plan, load_plan


def compare(plan_path: str, num_prompts: int, max_new_tokens: int) -> dict:
    plan = load_plan(plan_path)
    hierarchy = hierarchy_from_plan(plan, allow_outside_plan_dir=True)
    tokenizer = load_tokenizer(plan.directory())
    key = jax.random.PRNGKey(0)
    differing = {}
    texts = load_prompts("hsd_jax/io/data/eval_prompts.jsonl")[:num_prompts]
    for i, text in enumerate(texts):
        prompt, length = pad_prompts([encode_prompt(tokenizer, text)])
        ar = ar_generate(hierarchy.target, prompt, length, key, max_new_tokens=max_new_tokens).tokens
        hsd = hsd_generate(hierarchy, prompt, length, key, max_new_tokens=max_new_tokens).tokens
        ar, hsd = np.asarray(ar), np.asarray(hsd)
        if not np.array_equal(ar, hsd):
            differing[i] = int(np.argmax(ar[0] != hsd[0]))
    return {"plan": plan_path, "label": plan.label, "prompts": len(texts),
            "identical": len(texts) - len(differing), "first_difference": differing}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plans", nargs="+")
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json")
    args = p.parse_args(argv)
    result = [compare(plan, args.num_prompts, args.max_new_tokens) for plan in args.plans]
    for row in result:
        print(f"{row['label']}: identical to AR on {row['identical']} of {row['prompts']} prompts"
              + (f"; first differences {row['first_difference']}" if row["first_difference"] else ""))
    if args.json:
        write_json(args.json, {"max_new_tokens": args.max_new_tokens, "plans": result})
    return 0 if all(row["identical"] == row["prompts"] for row in result) else 1


if __name__ == "__main__":
    sys.exit(main())
