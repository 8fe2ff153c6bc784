"""The shipped prompt sets: size, category balance, no duplicates, no train/eval leakage."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from hsd_jax.io.prompts import CATEGORIES, eval_prompts_path, instructions_path, load_prompts, load_records

DEMO_PROMPT = "Write a Python function that checks whether a number is prime."


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def _trigrams(s: str) -> set[tuple[str, ...]]:
    w = _norm(s).split()
    return {tuple(w[i:i + 3]) for i in range(len(w) - 2)}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


@pytest.fixture(scope="module")
def train():
    return load_records(instructions_path())


@pytest.fixture(scope="module")
def evals():
    return load_records(eval_prompts_path())


def test_counts(train, evals):
    assert len(train) >= 400
    assert len(evals) >= 40
    assert load_prompts(instructions_path()) == [r["prompt"] for r in train]


def test_categories(train, evals):
    for name, recs, floor in (("train", train, 30), ("eval", evals, 5)):
        counts = Counter(r.get("category") for r in recs)
        assert set(counts) == set(CATEGORIES), (name, counts)
        for cat in CATEGORIES:
            assert counts[cat] >= floor, (name, cat, counts[cat])


@pytest.mark.parametrize("which", ["train", "evals"])
def test_no_duplicates(which, request):
    recs = request.getfixturevalue(which)
    counts = Counter(_norm(r["prompt"]) for r in recs)
    assert [p for p, n in counts.items() if n > 1] == []


def test_demo_prompt_is_held_out(train, evals):
    assert DEMO_PROMPT in [r["prompt"] for r in evals]
    assert not any("prime" in _norm(r["prompt"]).split() for r in train)


def test_no_leakage(train, evals):
    tn = [(_norm(r["prompt"]), _trigrams(r["prompt"]), r["prompt"]) for r in train]
    bad = []
    for r in evals:
        en, et = _norm(r["prompt"]), _trigrams(r["prompt"])
        for n, t, p in tn:
            if en == n or en in n or n in en:
                bad.append(("exact/substring", r["prompt"], p))
            elif _jaccard(et, t) >= 0.5:
                bad.append(("trigram-jaccard", r["prompt"], p))
    assert bad == []


def test_load_prompts_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a"}\n\n{"prompt": "b", "category": "chat"}\n')
    assert load_prompts(good) == ["a", "b"]

    cases = {
        "bad_json.jsonl": ('{"prompt": "ok"}\n{"prompt": "oops"\n', 2, "invalid JSON"),
        "missing.jsonl": ('{"prompt": "ok"}\n{"prompt": "ok2"}\n{"text": "x"}\n', 3, "missing"),
        "empty.jsonl": ('{"prompt": "   "}\n', 1, "empty"),
        "not_obj.jsonl": ('["prompt"]\n', 1, "JSON object"),
    }
    for name, (text, lineno, why) in cases.items():
        f = tmp_path / name
        f.write_text(text)
        with pytest.raises(ValueError) as exc:
            load_prompts(f)
        msg = str(exc.value)
        assert f"{name}:{lineno}:" in msg and why in msg, msg
