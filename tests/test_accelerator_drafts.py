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


def test_the_accelerator_script_makes_data_a_draft_and_its_curve(tiny_chat_model, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    env = dict(os.environ, PY=sys.executable, TARGET=str(tiny_chat_model), WORK=str(work), OUT=str(out),
               DATA_S="120", DATA_TOKENS="40", DATA_BATCH="4", MAX_ANSWER="6", DRAFTS="1l:0", STEPS="6",
               WARMUP="0", TRAIN_BATCH="4", MILESTONE="3", HEAD_VOCAB="64", CURVE_PROMPTS="1")
    run = subprocess.run(["bash", "scripts/accelerator_drafts.sh"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    log = (out / "log.txt").read_text()
    assert "data: " in log and " shards" in log and "draft 1l (layers 0)" in log
    parts = sorted(out.glob("draft-1l.tar.*"))
    assert parts and all(p.stat().st_size <= 15_000_000 for p in parts)
    joined = tmp_path / "draft.tar"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    returned = tmp_path / "returned"  # at the depth of WORK: the draft's relative embedding link holds
    with tarfile.open(joined) as tar:
        tar.extractall(returned, filter="data")
    draft = load_model(returned / "draft-1l")
    assert draft.config.num_layers == 1
    summary = json.loads((returned / "draft-1l" / "distill_summary.json").read_text())
    assert summary["steps_done"] == 6 and summary["data_answer_tokens"] >= 40
    curve = json.loads((out / "agreement-curve.json").read_text())
    steps = [row["steps"] for row in curve["rows"]]
    assert steps == sorted(steps) and steps[-1] == 6
    assert all(0.0 <= row["greedy_agreement"] <= 1.0 for row in curve["rows"])
