"""Tokens/s of greedy AR and HSD decoding on each `data` x `model` mesh next to one device
(`scripts/bench_mesh.py` runs it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from hsd_jax.decoding.ar import ar_generate
from hsd_jax.decoding.hsd import Hierarchy, hsd_generate
from hsd_jax.models import Model, stack_layers
from hsd_jax.parallel.sharding import DATA, MODEL, Rule, parse_mesh, shard_batch, shard_hierarchy, shard_model
from hsd_jax.planning.timing import median_seconds

DEFAULT_MESHES = ("data=1,model=8", "data=2,model=4", "data=4,model=2", "data=8,model=1")


def bench_meshes(
    target: Model,
    drafts: Sequence[Any] = (),
    buffers: Sequence[int] = (),
    meshes: Sequence[str] = DEFAULT_MESHES,
    draft_rule: Rule = "replicated",
    batch: int = 8,
    prompt_len: int = 16,
    max_new_tokens: int = 32,
    repeats: int = 3,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Greedy tokens/s of `ar_generate(target)` and, with `drafts`, of `hsd_generate` over the
    hierarchy drafts + [target], on one device and on each mesh (drafts under `draft_rule`).

    Each entry: mesh, ar_tokens_per_s, hsd_tokens_per_s (None without drafts), and whether the
    tokens equal the single-device run. Timed by the one rule (`planning.timing`): compilation
    excluded, the median of `repeats` calls."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, target.vocab_size, (batch, prompt_len), dtype=np.int32)
    lengths = rng.integers(prompt_len // 2, prompt_len + 1, (batch,), dtype=np.int32)
    key = jax.random.PRNGKey(seed)
    run_ar = jax.jit(lambda m, p, n, k: ar_generate(m, p, n, k, max_new_tokens=max_new_tokens).tokens)
    run_hsd = jax.jit(lambda h, p, n, k: hsd_generate(h, p, n, k, max_new_tokens=max_new_tokens).tokens)

    def timed(fn, *args) -> tuple[float, np.ndarray]:
        tokens = np.asarray(fn(*args))  # compile and warm up
        return batch * max_new_tokens / median_seconds(fn, *args, repeats=repeats, warmup=0), tokens

    def measure(label: str, model: Model, hierarchy, p, n) -> dict[str, Any]:
        ar_rate, ar_tokens = timed(run_ar, model, p, n, key)
        row = {"mesh": label, "ar_tokens_per_s": ar_rate, "hsd_tokens_per_s": None, "tokens": [ar_tokens]}
        if hierarchy is not None:
            row["hsd_tokens_per_s"], hsd_tokens = timed(run_hsd, hierarchy, p, n, key)
            row["tokens"].append(hsd_tokens)
        return row

    single = Model(stack_layers(target.params, target.config), target.config)
    hierarchy = Hierarchy([*drafts, single], buffers) if drafts else None
    rows = [measure("1 device", single, hierarchy, prompts, lengths)]
    for text in meshes:
        mesh = parse_mesh(text)
        sharded = shard_model(single, mesh)
        tree = shard_hierarchy(hierarchy, mesh, [draft_rule] * len(drafts) + ["tensor"]) if drafts else None
        rows.append(measure(f"data={mesh.shape[DATA]} x model={mesh.shape[MODEL]}", sharded, tree,
                            *shard_batch(mesh, prompts, lengths)))
    reference = rows[0].pop("tokens")
    for row in rows[1:]:
        row["same_tokens"] = all(np.array_equal(a, b) for a, b in zip(row.pop("tokens"), reference))
    rows[0]["same_tokens"] = True
    return rows


def format_bench(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'mesh':<22}{'AR tok/s':>12}{'HSD tok/s':>12}  same tokens"]
    for r in rows:
        hsd = f"{r['hsd_tokens_per_s']:12.1f}" if r["hsd_tokens_per_s"] is not None else f"{'-':>12}"
        lines.append(f"{r['mesh']:<22}{r['ar_tokens_per_s']:12.1f}{hsd}  {r['same_tokens']}")
    return "\n".join(lines)
