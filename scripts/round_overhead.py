"""The control work of one HSD round: round time minus the forward passes it runs.

    .venv/bin/python scripts/round_overhead.py [--vocab 49152] [--temperature 0] [--model SOURCE]

Models with SmolLM2's vocabulary and a tiny body (so that vocabulary-sized work shows at its real
size while forward passes are cheap) in a hierarchy of copies of the target (every draft accepted,
so each round runs exactly the passes the schedule gives). A round's time is measured from the
difference of two generation lengths (prefill and compile cancel); its forwards are priced with
c(k) measured for the same model at the same widths. What is left is the recursion's overhead.
`--model SOURCE` (e.g. `int8:checkpoints/smollm2-draft-2l`) runs copies of that model instead,
to see the overhead around a real draft's steps.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from hsd_jax.decoding.ar import ar_generate
from hsd_jax.decoding.hsd import Hierarchy, hsd_generate
from hsd_jax.io.files import write_json
from hsd_jax.io.sources import from_source
from hsd_jax.models import Model, ModelConfig, init_params
from hsd_jax.planning.timing import median_seconds


def tiny_target(vocab: int, layers: int = 1, hidden: int = 64) -> Model:
    config = ModelConfig(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=4096,
    )
    return Model(init_params(config, jax.random.PRNGKey(0), scale=0.5), config).with_layout("unstacked")


def measure(vocab: int, buffers: tuple[int, ...], temperature: float, repeats: int,
            source: str | None = None) -> dict:
    target = tiny_target(vocab) if source is None else from_source(source)
    hierarchy = Hierarchy([target] * (len(buffers) + 1), buffers)
    schedule = hierarchy.schedule
    prompt, length = np.ones((1, 16), np.int32), np.array([16], np.int32)
    key = jax.random.PRNGKey(0)

    def run(n):
        fn = lambda: hsd_generate(hierarchy, prompt, length, key, max_new_tokens=n, temperature=temperature)
        return median_seconds(fn, repeats=repeats), fn()

    def run_ar(n):
        fn = lambda: ar_generate(target, prompt, length, key, max_new_tokens=n, temperature=temperature)
        return median_seconds(fn, repeats=repeats)

    (short_s, short), (long_s, long) = run(64), run(256)
    rounds = int(long.stats.target_rounds[0] - short.stats.target_rounds[0])
    passes = np.asarray(long.stats.forward_passes[0] - short.stats.forward_passes[0]) / rounds
    round_s = (long_s - short_s) / rounds
    step = jax.jit(lambda m, t, c: m.step(t, c)[0])

    def c(k):
        cache = target.init_cache(1, 512).with_lengths(jnp.full((1,), 128, jnp.int32))
        return median_seconds(step, target, jnp.ones((1, k), jnp.int32), cache, repeats=repeats)

    widths = [schedule.draft_widths()] + [
        (schedule.verify_width(level),) for level in range(1, len(buffers) + 1)
    ]
    forward_s = 0.0
    for level, level_widths in enumerate(widths):
        per_batch = sum(c(w) for w in level_widths) / len(level_widths)
        forward_s += passes[level] * per_batch
    ar_token_s = (run_ar(256) - run_ar(64)) / 192
    return {"vocab": vocab, "buffers": list(buffers), "temperature": temperature, "rounds": rounds,
            "tokens_per_round": 192 / rounds, "round_ms": 1e3 * round_s, "forwards_ms": 1e3 * forward_s,
            "overhead_ms": 1e3 * (round_s - forward_s), "ar_token_ms": 1e3 * ar_token_s, "c1_ms": 1e3 * c(1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--buffers", default="4;2,4")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", help="a model source to run copies of (default: the tiny random model "
                   "with --vocab; a model brings its own vocabulary)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = []
    for spec in args.buffers.split(";"):
        row = measure(args.vocab, tuple(int(b) for b in spec.split(",")), args.temperature, args.repeats,
                      args.model)
        rows.append(row)
        print(
            f"buffers {spec:>6}: {row['round_ms']:6.2f} ms/round = {row['forwards_ms']:6.2f} ms of forwards "
            f"+ {row['overhead_ms']:5.2f} ms overhead ({row['tokens_per_round']:.1f} tokens/round; "
            f"AR {row['ar_token_ms']:.2f} ms/token, c(1) {row['c1_ms']:.2f} ms)",
            flush=True,
        )
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
