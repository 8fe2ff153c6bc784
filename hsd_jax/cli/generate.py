"""`hsd-jax generate`: text from a model or a hierarchy (`--plan`, or --model/--draft/--ngram),
optionally timed against plain AR of the target in the same process (`--compare-ar`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from hsd_jax.cli.common import add_dtype_argument, add_mesh_argument, add_sampling, int_list, mesh_from_args
from hsd_jax.decoding.hierarchy import MAX_BUFFER, Hierarchy
from hsd_jax.decoding.ngram import MAX_NGRAM
from hsd_jax.decoding.stream import Streamer
from hsd_jax.io.checkpoint import encode_prompt, load_tokenizer, require_model_dir, tokenizer_fingerprint
from hsd_jax.io.detokenize import TextStream
from hsd_jax.io.sources import from_source, parse_source
from hsd_jax.parallel.sharding import shard_hierarchy
from hsd_jax.planning import hierarchy_from_plan, load_plan
from hsd_jax.planning.timing import time_stream

STATS_FIELDS = ("forward_passes", "proposed", "accepted", "target_rounds", "tokens_per_target_call")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text with a model or a hierarchy")
    p.add_argument("--model", help="the target model directory")
    p.add_argument("--plan", help="plan.json from `hsd-jax plan`: its chain, buffers and verifier")
    p.add_argument("--draft", action="append", default=[],
                   help="a draft: model directory, int8:DIR or ngram:N (repeatable, smallest first)")
    p.add_argument("--ngram", type=int, default=0, help="add the n-gram drafter with this n as M_0")
    p.add_argument("--buffers", type=int_list, default=None, help="buffer targets T_0,...,T_{K-1}, e.g. 4,8")
    p.add_argument(
        "--verifier", default="tokenwise", help="tokenwise | block, or one per level: block,tokenwise"
    )
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="prompt text")
    group.add_argument("--prompt-ids", type=int_list, help="comma-separated token ids")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to --prompt")
    p.add_argument("--allow-inexact", action="store_true",
                   help="admit an inexact verifier (zhou): its output law is NOT exactly the target's")
    p.add_argument("--allow-outside-plan-dir", action="store_true",
                   help="let --plan name models outside the plan file's directory (absolute or ../ paths)")
    p.add_argument("--json", action="store_true", help="print one JSON object (at the end)")
    p.add_argument("--stream", action="store_true", help="print the text as it is committed")
    p.add_argument("--rounds-per-chunk", type=int, default=4,
                   help="target rounds (AR: tokens) per streamed chunk after the first (default 4)")
    add_mesh_argument(p)
    add_dtype_argument(p, "the plan's, else as stored")
    p.add_argument(
        "--compare-ar",
        action="store_true",
        help="also time plain AR of the target and print a report (speed-up, acceptance per level)",
    )
    add_sampling(p)
    return p


# ------------------------------------------------------------------------------ hierarchy


def check_same_tokenizer(target: str, drafts: Sequence[str]) -> None:
    """Raise ValueError unless every draft (a directory or int8:DIR; n-gram drafts have no
    tokenizer) has the target's tokenizer: the same vocabulary, merges and added tokens in its
    files (the loaded objects may differ by class: transformers' Qwen2 class adds a token)."""
    reference = tokenizer_fingerprint(parse_source(target).directory())
    for draft in drafts:
        source = parse_source(draft)
        if source.is_ngram:
            continue
        fingerprint = tokenizer_fingerprint(require_model_dir(source.directory()))
        if fingerprint != reference:
            vocab, ref = fingerprint["vocab"], reference["vocab"]
            differ = len(set(vocab.items()) ^ set(ref.items()))
            what = f"{differ} vocabulary entries differ" if differ else "their merges or added tokens differ"
            raise ValueError(
                f"draft {draft} has a different tokenizer from the target {target} "
                f"({what}); every level must share the target's tokenizer"
            )


def precheck(args: argparse.Namespace) -> None:
    """Refuse a bad request before any model is loaded or any memory allocated."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 <= args.ngram <= MAX_NGRAM:
        raise ValueError(f"--ngram must be in [1, {MAX_NGRAM}] (0: none), got {args.ngram}")
    if args.buffers is not None and not all(1 <= t <= MAX_BUFFER for t in args.buffers):
        raise ValueError(f"--buffers must be integers in [1, {MAX_BUFFER}], got {args.buffers}")
    if args.prompt is not None:
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"--prompt is not valid UTF-8 text (byte {e.start}); pass UTF-8 text, or "
                             "token ids with --prompt-ids") from None
        if not args.prompt.strip() and not args.chat:
            raise ValueError("--prompt is empty; give some text (or --chat, or --prompt-ids)")
    if args.prompt_ids is not None and not args.prompt_ids:
        raise ValueError("--prompt-ids is empty; give at least one token id")
    if args.model is None and not args.plan:
        raise ValueError("give the target with --model DIR, or a plan with --plan plan.json")
    if args.model is not None:
        require_model_dir(args.model)
    for draft in args.draft:
        if not parse_source(draft).is_ngram:
            require_model_dir(parse_source(draft).directory())


def load_hierarchy(args: argparse.Namespace) -> Hierarchy:
    """The hierarchy of `--plan` (setting `args.model` to its target), or of
    --model/--draft/--ngram/--buffers/--verifier."""
    if args.plan:
        plan = load_plan(args.plan)
        hierarchy = hierarchy_from_plan(
            plan,
            dtype=args.dtype,
            allow_outside_plan_dir=args.allow_outside_plan_dir,
            allow_inexact=args.allow_inexact,
        )
        if args.model is None:
            args.model = str(plan.directory())
        return hierarchy
    check_same_tokenizer(args.model, args.draft)
    target = from_source(args.model, dtype=args.dtype)
    models = [from_source(d, vocab_size=target.vocab_size, dtype=args.dtype) for d in args.draft]
    if args.ngram:
        models.insert(0, from_source(f"ngram:{args.ngram}", vocab_size=target.vocab_size))
    models.append(target)
    buffers = args.buffers if args.buffers is not None else [4] * (len(models) - 1)
    verifier = args.verifier.split(",") if "," in args.verifier else args.verifier
    return Hierarchy(models, buffers, verifier, allow_inexact=args.allow_inexact)


def hierarchy_from_args(args: argparse.Namespace) -> Hierarchy:
    """`load_hierarchy`; with --mesh, the target tensor-parallel and the drafts replicated on it.
    Multi-process start-up (`distributed.initialize`, in `mesh_from_args`) runs before any model
    is loaded: JAX refuses to initialise once a backend is in use."""
    precheck(args)
    mesh = mesh_from_args(args)
    hierarchy = load_hierarchy(args)
    return hierarchy if mesh is None else shard_hierarchy(hierarchy, mesh, rule=None)


# -------------------------------------------------------------------------------- command


def generate(args: argparse.Namespace,
             on_text: Callable[[str], None] | None = None) -> tuple[dict[str, Any], Hierarchy]:
    """Generate for the prompt through the stream (compiled first, so compile is excluded from the
    timing): the result dict and the hierarchy. `on_text(text)` gets the text as it is committed."""
    hierarchy = hierarchy_from_args(args)
    target = hierarchy.target
    tokenizer = load_tokenizer(parse_source(args.model).directory())
    ids = args.prompt_ids if args.prompt_ids is not None else encode_prompt(tokenizer, args.prompt, args.chat)
    if not ids:
        raise ValueError(f"--prompt {args.prompt!r} encodes to no tokens; give some text")
    prompt = np.asarray([ids], np.int32)
    lengths = np.asarray([len(ids)], np.int32)
    eos = target.config.eos_token_id if tokenizer.eos_token_id is None else tokenizer.eos_token_id

    def timed(h, show):
        streamer = Streamer(h, prompt, lengths, jax.random.PRNGKey(args.seed),
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p,
                            eos_token_id=eos, rounds_per_chunk=args.rounds_per_chunk)
        start = time.perf_counter()
        streamer.warm_up()
        compile_seconds = time.perf_counter() - start
        text = TextStream(tokenizer)
        timing = time_stream(streamer, (lambda chunk: show(text.push(chunk[0]))) if show else None)
        if show:
            show(text.flush())
        return streamer.output, timing, compile_seconds

    out, timing, compile_seconds = timed(hierarchy, on_text)
    n = int(out.num_tokens[0])
    tokens = np.asarray(out.tokens[0, :n]).tolist()
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    result = {"tokens": tokens, "text": text, "num_tokens": n, "seconds": timing.seconds,
              "tokens_per_s": n / timing.seconds, "ttft_s": timing.ttft_s,
              "decode_tokens_per_s": timing.decode_tokens_per_s, "rounds_per_chunk": args.rounds_per_chunk,
              "compile_seconds": compile_seconds, "hierarchy": repr(hierarchy)}
    if hierarchy.depth:
        result["stats"] = {k: np.asarray(getattr(out.stats, k))[0].tolist() for k in STATS_FIELDS}
    if args.compare_ar and hierarchy.depth:
        ar_out, ar_timing, _ = timed(Hierarchy([target]), None)
        ar_n = int(ar_out.num_tokens[0])
        result["ar"] = {"num_tokens": ar_n, "seconds": ar_timing.seconds,
                        "tokens_per_s": ar_n / ar_timing.seconds, "ttft_s": ar_timing.ttft_s,
                        "decode_tokens_per_s": ar_timing.decode_tokens_per_s,
                        "identical": np.asarray(ar_out.tokens[0, :ar_n]).tolist() == tokens}
    return result, hierarchy


def report_lines(
    result: dict[str, Any], hierarchy: Hierarchy, temperature: float, compare_ar: bool
) -> list[str]:
    """The `--compare-ar` report."""
    rate = result["num_tokens"] / result["seconds"]
    if compare_ar and not hierarchy.depth:
        return ["\n== report (compile excluded)",
                f"  hierarchy       the target alone: plain AR at {rate:.1f} tokens/s",
                "  (the plan found no hierarchy faster than AR with the profiled costs and acceptances)"]
    if "ar" not in result:
        return []
    ar, stats = result["ar"], result["stats"]
    lines = ["\n== report (same process, compile excluded)",
             f"  hierarchy       {hierarchy}",
             f"  HSD             {rate:6.1f} tokens/s",
             f"  plain AR        {ar['tokens_per_s']:6.1f} tokens/s",
             f"  speed-up        {rate / ar['tokens_per_s']:6.2f}x"
             + ("" if temperature else f"   (greedy output identical to AR: {ar['identical']})")]
    for level, (proposed, accepted) in enumerate(zip(stats["proposed"], stats["accepted"]), 1):
        lines.append(
            f"  level {level} accepts {accepted}/{proposed} = {accepted / max(proposed, 1):.2f} of level "
            f"{level - 1}'s drafts"
        )
    lines.append(f"  tokens per target call {stats['tokens_per_target_call']:.2f}")
    return lines


def _print_now(text: str) -> None:
    print(text, end="", flush=True)


def run(args: argparse.Namespace) -> int:
    if args.rounds_per_chunk < 1:
        raise ValueError(f"--rounds-per-chunk must be >= 1, got {args.rounds_per_chunk}")
    streaming = args.stream and not args.json
    result, hierarchy = generate(args, _print_now if streaming else None)
    if args.json:
        print(json.dumps(result))
        return 0
    n, seconds = result["num_tokens"], result["seconds"]
    print("" if streaming else result["text"])
    decode = result["decode_tokens_per_s"]
    then = "" if decode is None else f", then {decode:.1f} tokens/s"
    print(f"\n[{n} tokens in {seconds:.2f}s, {n / seconds:.1f} tokens/s; first token after "
          f"{result['ttft_s'] * 1e3:.0f} ms{then}; {hierarchy}]", file=sys.stderr)
    for line in report_lines(result, hierarchy, args.temperature, args.compare_ar):
        print(line)
    return 0
