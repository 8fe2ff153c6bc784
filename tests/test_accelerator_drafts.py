"""`scripts/accelerator_drafts.sh`, the recipe the shipped draft was made with, end to end on a
tiny chat model: data until its time budget, a draft with every milestone kept and scored, the
draft returned as split tar parts that reassemble into a loadable model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from hsd_jax.io.checkpoint import load_model

REPO = Path(__file__).parents[1]


def _run_script(tiny_chat_model, tmp_path, **settings) -> Path:
    out = tmp_path / "out"
    env = dict(os.environ, PY=sys.executable, TARGET=str(tiny_chat_model), WORK=str(tmp_path / "work"),
               OUT=str(out), DATA_S="600", DATA_TOKENS="40", DATA_BATCH="4", MAX_ANSWER="6", STEPS="6",
               WARMUP="0", TRAIN_BATCH="4", MILESTONE="3", HEAD_VOCAB="64", CURVE_PROMPTS="1", **settings)
    run = subprocess.run(["bash", "scripts/accelerator_drafts.sh"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    corpus = json.loads((out / "corpus.json").read_text())
    assert corpus["answer_tokens"] >= 40 and corpus["stopped_by"] == "answer tokens"
    return out


def _unpack(out: Path, stem: str, tmp_path: Path) -> Path:
    """A directory returned as split tar parts, reassembled at the depth of WORK (where the draft's
    relative embedding link holds)."""
    parts = sorted(out.glob(f"{stem}.tar.*"))
    assert parts and all(p.stat().st_size <= 15_000_000 for p in parts)
    joined = tmp_path / f"{stem}.tar"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as tar:
        tar.extractall(tmp_path / "returned", filter="data")
    return tmp_path / "returned" / stem


def _steps_done(draft: Path) -> int:
    return json.loads((draft / "distill_summary.json").read_text())["steps_done"]


def test_the_accelerator_script_makes_data_a_draft_and_its_curve(tiny_chat_model, tmp_path):
    out = _run_script(tiny_chat_model, tmp_path, DRAFTS="1l:0")
    log = (out / "log.txt").read_text()
    assert "data: " in log and " shards" in log and "draft 1l (layers 0)" in log
    returned = _unpack(out, "draft-1l", tmp_path)
    assert load_model(returned).config.num_layers == 1
    summary = json.loads((returned / "distill_summary.json").read_text())
    assert summary["steps_done"] == 6 and summary["data_answer_tokens"] >= 40
    curve = json.loads((out / "agreement-curve.json").read_text())
    steps = [row["steps"] for row in curve["rows"]]
    assert steps == sorted(steps) and steps[-1] == 6
    assert all(0.0 <= row["greedy_agreement"] <= 1.0 for row in curve["rows"])


def test_drafts_side_by_side_return_with_chosen_milestones_and_no_curve(tiny_chat_model, tmp_path):
    out = _run_script(tiny_chat_model, tmp_path, DRAFTS="1l:0 1m:0", PARALLEL="1", CURVE_S="0",
                      RETURN_STEPS="1m:3")
    assert not (out / "agreement-curve.json").exists()
    log = (out / "log.txt").read_text()
    assert "draft 1l (layers 0)" in log and "draft 1m (layers 0)" in log
    assert not list(out.glob("draft-1l-step*"))  # only the milestone asked for
    for stem, steps in (("draft-1l", 6), ("draft-1m", 6), ("draft-1m-step3", 3)):
        returned = _unpack(out, stem, tmp_path)
        assert load_model(returned).config.num_layers == 1 and _steps_done(returned) == steps
