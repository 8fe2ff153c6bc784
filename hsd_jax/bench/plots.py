"""Charts of the benchmarks (matplotlib, no display needed), each written atomically as a PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hsd_jax.io.files import write_bytes


def _save(fig, path: str | Path, dpi: int) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return write_bytes(path, buffer.getvalue())


def plot_methods(results: dict[str, Any], path: str | Path) -> Path:
    """A labelled bar chart of tokens/s per method of `bench.run_methods`, with the speed-up over our AR
    and the weight bytes read per token."""
    from matplotlib.figure import Figure

    names = list(results["methods"])
    values = [results["methods"][n]["tokens_per_s"] for n in names]
    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.subplots()
    colors = {"hf": "#888", "llamacpp": "#c63"}  # peers: transformers grey, llama.cpp orange; ours green
    bars = ax.bar(names, values, color=[colors.get(n.split("-")[0], "#2a6") for n in names])
    ax.tick_params(axis="x", labelsize=8)
    for bar, name in zip(bars, names):
        ratio = results["methods"][name].get("speedup_vs_ar")
        per_token = results["methods"][name].get("weight_bytes_per_token")
        label = (f"{bar.get_height():.1f}" + (f"\n{ratio:.2f}x AR" if ratio else "")
                 + (f"\n{per_token / 1e6:.0f} MB/tok" if per_token else ""))
        ax.annotate(
            label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
        )
    ax.set_ylabel("tokens/s (median over prompts)")
    ax.set_title(
        f"batch 1, T={results['temperature']}, {results['prompts']} prompts, {results['machine']}", fontsize=8
    )
    ax.set_ylim(0, max(values) * 1.35)
    return _save(fig, path, dpi=120)


def plot_validation(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Horizontal bars of measured and predicted ms per token (rows of `bench.validate.measure`),
    fastest measured on top."""
    from matplotlib.figure import Figure

    rows = sorted(rows, key=lambda r: r["measured_s"])
    y = np.arange(len(rows))
    fig = Figure(figsize=(10, 1.2 + 0.32 * len(rows)), layout="tight")
    ax = fig.subplots()
    ax.barh(y - 0.2, [1e3 * r["measured_s"] for r in rows], 0.4, label="measured")
    ax.barh(y + 0.2, [1e3 * r["predicted_iid_s"] for r in rows], 0.4, label="predicted")
    ax.set_yticks(y, [r["label"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per committed token (decode, batch 1, greedy)")
    ax.legend(loc="lower right")
    return _save(fig, path, dpi=110)
