"""What streaming costs: the one-shot program against the stream (R target rounds per chunk), same run.

    PYTHONPATH=. python scripts/stream_overhead.py [--model DIR] [--ngram 3 --buffer 4] [--rounds 1,4,16]

Without --model, a tiny random Llama. For plain AR of the target and for a hierarchy (the n-gram
drafter and the target), each repeat times the one-shot program and then the stream at every R, in
turn, compile excluded (the rule of `planning.timing`); medians over repeats. The stream's time to
first token (prefill and the first round) is the same work the one-shot program starts with, so
the one-shot's decode rate is taken as (tokens after the first chunk) / (one-shot seconds - TTFT);
`overhead` = 1 - stream decode rate / one-shot decode rate.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import jax
import numpy as np

from hsd_jax.decoding.hsd import Hierarchy, hsd_generate
from hsd_jax.decoding.ngram import NGramDrafter
from hsd_jax.decoding.stream import Streamer
from hsd_jax.io.checkpoint import load_model
from hsd_jax.io.files import write_json
from hsd_jax.models import Model, ModelConfig, init_params
from hsd_jax.planning import machine_name
from hsd_jax.planning.timing import time_once, time_stream


def tiny_model() -> Model:
    config = ModelConfig(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
                         num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=1024)
    return Model(init_params(config, jax.random.PRNGKey(0), scale=0.5), config)


def measure(h: Hierarchy, prompt, lengths, new: int, rounds: list[int], repeats: int) -> dict:
    key = jax.random.PRNGKey(0)

    def one_shot():
        return hsd_generate(h, prompt, lengths, key, max_new_tokens=new)

    def streamer(r):
        return Streamer(h, prompt, lengths, key, max_new_tokens=new, rounds_per_chunk=r)

    jax.block_until_ready(one_shot())
    for r in rounds:
        streamer(r).warm_up()
    one, streams = [], {r: [] for r in rounds}
    for _ in range(repeats):
        one.append(time_once(one_shot)[0])
        for r in rounds:
            streams[r].append(time_stream(streamer(r)))
    one_s = statistics.median(one)
    tokens = streams[rounds[0]][0].tokens
    row = {"hierarchy": repr(h), "tokens": tokens, "one_shot_s": one_s,
           "one_shot_tokens_per_s": tokens / one_s, "streams": {}}
    for r, timings in streams.items():
        ttft = statistics.median(t.ttft_s for t in timings)
        seconds = statistics.median(t.seconds for t in timings)
        rest = tokens - timings[0].first_chunk_tokens
        decode = statistics.median(t.decode_tokens_per_s or float("nan") for t in timings)
        one_decode = rest / (one_s - ttft) if one_s > ttft else float("nan")
        row["streams"][r] = {"ttft_s": ttft, "seconds": seconds, "tokens_per_s": tokens / seconds,
                             "decode_tokens_per_s": decode, "one_shot_decode_tokens_per_s": one_decode,
                             "overhead": 1 - decode / one_decode, "total_time_ratio": seconds / one_s}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a converted model directory (read only); default: a tiny random model")
    p.add_argument("--ngram", type=int, default=3)
    p.add_argument("--buffer", type=int, default=4)
    p.add_argument("--rounds", default="1,4,16")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    target = load_model(args.model) if args.model else tiny_model()
    prompt = np.asarray([[1, 9690, 198, 2, 17, 30, 9690, 198, 2, 17, 30, 42, 7, 8, 9, 10][:16]], np.int32)
    prompt = prompt % target.vocab_size
    lengths = np.asarray([prompt.shape[1]], np.int32)
    rounds = [int(r) for r in args.rounds.split(",")]
    results = {"machine": machine_name(), "backend": jax.default_backend(),
               "model": args.model or "tiny-random", "max_new_tokens": args.max_new_tokens,
               "repeats": args.repeats, "rows": []}
    chains = [Hierarchy([target]),
              Hierarchy([NGramDrafter(args.ngram, target.vocab_size), target], [args.buffer], "block")]
    for h in chains:
        row = measure(h, prompt, lengths, args.max_new_tokens, rounds, args.repeats)
        results["rows"].append(row)
        rate = row["one_shot_tokens_per_s"]
        print(f"{row['hierarchy']}: one-shot {rate:.1f} tokens/s ({row['tokens']} tokens)")
        for r, s in row["streams"].items():
            print(f"  R={r:<3} ttft {s['ttft_s'] * 1e3:7.1f} ms  decode {s['decode_tokens_per_s']:7.1f} "
                  f"tokens/s (one-shot {s['one_shot_decode_tokens_per_s']:7.1f})  overhead "
                  f"{100 * s['overhead']:5.1f}%  total time x{s['total_time_ratio']:.3f}", flush=True)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
