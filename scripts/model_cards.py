"""Write checkpoints/<draft>/README.md model cards from the distillation summary and the
profiled stats (costs and acceptances measured by `hsd-jax profile` on the held-out prompts).

    python scripts/model_cards.py checkpoints/stats.json checkpoints/smollm2-draft-2l ... [--trained-on TEXT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hsd_jax.models.config import ModelConfig

# The family's goals (issue 14): (role, largest T=1 cost ratio, smallest greedy acceptance) per draft.
GOALS = {"smollm2-draft-2l": ("cheapest trained draft", 0.05, 0.55)}


def _answers(part: dict) -> str:
    t = part["answer_temperature"]
    return "greedy answers" if t == 0 else f"answers sampled at temperature {t:g}"


def card(draft_dir: Path, stats: dict, trained_on: str) -> str:
    config = ModelConfig.load(draft_dir)
    summary = json.loads((draft_dir / "distill_summary.json").read_text())
    models = {m["name"]: m for m in stats["models"]}
    target = models[stats["target"]]
    stored = sum(f.stat().st_size for f in (draft_dir / "params").rglob("*") if f.is_file())
    layers = ",".join(str(i) for i in summary["layers"])
    train = summary["train"]
    parts = summary.get("data_parts") or [{"answer_temperature": 0.0, "sequences": summary["data_sequences"],
                                           "answer_tokens": summary["data_answer_tokens"]}]
    data = "; ".join(f"{_answers(p)} ({p['answer_tokens']:,} tokens)" for p in parts)
    history = summary.get("history") or []
    runs = "; ".join(
        f"steps {h['resumed_from']}-{h['steps_done']} on {h['data_answer_tokens']:,} answer tokens "
        f"({', '.join(h['data'])}; {h['wall_s'] / 60:.0f} min"
        + (f"; cosine to step {h['steps']}" if h.get("steps") else "") + ")" for h in history)
    me = models[draft_dir.name]
    rows = []
    for label, name in ((f"`{draft_dir.name}` ({stats.get('dtype') or 'as stored'})", draft_dir.name),
                        (f"`int8:{draft_dir.name}` (int8 weights)", f"{draft_dir.name}-int8")):
        if name not in models:
            continue
        m, ratio = models[name], lambda k, m=models[name]: m["cost_s"][k - 1] / target["cost_s"][k - 1]
        rows.append(
            f"| {label} | {ratio(1):.3f} ({m['cost_s'][0] * 1e3:.2f} ms) | {ratio(8):.3f} "
            f"({m['cost_s'][7] * 1e3:.2f} ms) | {stats['acceptance']['greedy'][name][stats['target']]:.3f} | "
            f"{stats['acceptance']['sampled'][name][stats['target']]:.3f} |"
        )
    best_ratio = (
        min(models[n]["cost_s"][0] for n in (draft_dir.name, f"{draft_dir.name}-int8") if n in models)
        / target["cost_s"][0]
    )
    return f"""# {draft_dir.name}

A draft for SmolLM2-135M-Instruct, distilled by `hsd-jax distill` (KL(p_target || q_draft) on the
target's cached top-32 next-token distributions over its own answers).

| | |
|---|---|
| architecture | llama, {config.num_layers} layers (initialised from target layers {layers}), hidden {config.hidden_size}, {config.num_heads} heads / {config.num_kv_heads} kv heads, MLP {config.intermediate_size} |
| output head | the {config.head_vocab_size} token ids the target most often ranks in its top 32 on the training answers (EOS included); q = 0 elsewhere, which verification handles losslessly |
| input embedding | shared with the target (`{config.embedding_source}`, pinned by sha256), not stored here |
| parameters | {me["params"]:,} in use ({me["params"] - config.vocab_size * config.hidden_size:,} stored, bfloat16: {stored / 1e6:.1f} MB on disk; run in the dtype a plan or `--dtype` asks for) |
| training data | {summary["data_sequences"]:,} sequences from {", ".join(summary["data"])}: {data}; {summary["data_answer_tokens"]:,} answer tokens in all, answers <= {256 if "magpie" in " ".join(summary["data"]) else 128} tokens |
| training | {summary.get("steps_done", summary["steps"])} AdamW steps of batch {train["batch_size"]} (peak lr {train["learning_rate"]}, cosine to step {summary["steps"]}, weight decay {train["weight_decay"]}, products in {train.get("compute_dtype", "float32")}); final loss {summary["loss"][-1][1]:.3f} |
| runs | {runs or "one run"} |
| trained on | {summary.get("machine") or trained_on} |

Measured by `hsd-jax profile` ({stats["hardware"]}, {stats.get("dtype") or "stored dtype"}, batch 1, cache {stats.get("cache_size")} positions,
median of repeats after compilation) and on the held-out prompts in `hsd_jax/io/data/eval_prompts.jsonl`
({stats.get("prompts")} prompts, {stats.get("answer_positions")} answer positions of the target's greedy
continuations). The target's own forward costs {target["cost_s"][0] * 1e3:.2f} ms at T=1 and
{target["cost_s"][7] * 1e3:.2f} ms at T=8. The int8 row is the same weights quantised at load time
(`int8:DIR` in a hierarchy or profile; our CPU kernel's int8 path where the CPU has AVX512-VNNI).
Each round of the profile starts a member's k one later than the round before, so a cost is its
median over rounds in which the member's weights are mostly still in the CPU's last-level cache, as
in a draft's single-token steps; its first forward of a decoding round, after a verification pass,
costs more.

| | cost / target's, T=1 | cost / target's, T=8 | greedy agreement | sum min(p, q) at T={stats["temperature"]:g} |
|---|---|---|---|---|
{chr(10).join(rows)}

{_goals(draft_dir.name, best_ratio, stats["acceptance"]["greedy"][draft_dir.name][stats["target"]])}
Re-create it with `make drafts-accelerator` (scripts/accelerator_drafts.sh: data, training and
the agreement of every milestone on one GPU), or with `make data` and `make draft-2l` on any
machine (both resume a stopped run). `hsd-jax distill --resume-from` continues this directory (its
weights and step count, a fresh optimizer; see the Makefile).
"""


def _goals(name: str, cost_ratio: float, greedy: float) -> str:
    if name not in GOALS:
        return ""
    role, max_cost, min_accept = GOALS[name]
    verdict = lambda ok: "met" if ok else "**not met**"
    return (f"Against the family's goals for the {role}: cost <= {max_cost:.2f} of the target's (cheaper of "
            f"the two rows): {cost_ratio:.3f}, {verdict(cost_ratio <= max_cost)}; greedy acceptance >= "
            f"{min_accept:.2f}: {greedy:.3f}, {verdict(greedy >= min_accept)}.\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stats")
    parser.add_argument("drafts", nargs="+")
    parser.add_argument("--trained-on", default="not recorded",
                        help="the training machine, for summaries written before distill recorded it")
    args = parser.parse_args()
    stats = json.loads(Path(args.stats).read_text())
    for d in args.drafts:
        path = Path(d) / "README.md"
        path.write_text(card(Path(d), stats, args.trained_on))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
