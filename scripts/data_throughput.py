"""Answer tokens/s of the Magpie data generator (`hsd_jax.train.magpie`) at several batch sizes.

Each batch size answers the same instructions (greedy, top-k cached), after one untimed call that
compiles; the ratio to batch 1 is what batching buys. Run on an otherwise idle machine:

    python scripts/data_throughput.py --target checkpoints/smollm2-135m-instruct \
        --out docs/data-throughput.json
"""

from __future__ import annotations

import argparse
import platform
import time

import jax

from hsd_jax.decoding.sampling import SamplingParams
from hsd_jax.io.checkpoint import encode_prompt, load_model, load_tokenizer
from hsd_jax.io.files import write_json
from hsd_jax.io.prompts import instructions_path, load_prompts
from hsd_jax.train.magpie import _generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--batch-sizes", default="1,16,32,64")
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="weight dtype (default: as stored)")
    parser.add_argument("--out")
    args = parser.parse_args()
    model, tokenizer = load_model(args.target, dtype=args.dtype), load_tokenizer(args.target)
    prompts = [encode_prompt(tokenizer, p) for p in load_prompts(instructions_path())]
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        chunk = prompts[:batch]
        kwargs = dict(
            max_new_tokens=args.answer_tokens,
            sampling=SamplingParams(0.0),
            eos_token_id=model.config.eos_token_id,
            top_k=32,
            batch_size=batch,
        )
        _generate(model, chunk, jax.random.PRNGKey(0), **kwargs)  # compile
        began = time.perf_counter()
        _, counts, _, _ = _generate(model, chunk, jax.random.PRNGKey(0), **kwargs)
        seconds = time.perf_counter() - began
        rows.append(
            {
                "batch": batch,
                "answer_tokens": int(counts.sum()),
                "seconds": round(seconds, 3),
                "tokens_per_s": round(float(counts.sum()) / seconds, 1),
            }
        )
        print(rows[-1], flush=True)
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_first"] = round(row["tokens_per_s"] / base, 2)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {jax.device_count()} "
        f"{jax.default_backend()} device(s)",
        "dtype": str(model.dtype),
        "rows": rows,
    }
    if args.out:
        write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
