"""The `hsd-jax` command line end to end on a tiny converted model with a real tokenizer."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from hsd_jax.cli import generate as generate_cli
from hsd_jax.cli.main import main
from hsd_jax.io.checkpoint import load_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_dir):
    """A tiny random Llama that borrows SmolLM2's converted tokenizer (same 49152-token vocab)."""
    return _tiny_llama(tmp_path_factory, smollm2_dir, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def model_dir_8_heads(tmp_path_factory, smollm2_dir):
    """The same with 8 heads and 8 kv heads: it splits over all 8 fake CPU devices."""
    return _tiny_llama(tmp_path_factory, smollm2_dir, heads=8, kv_heads=8)


def _tiny_llama(tmp_path_factory, smollm2_dir, heads: int, kv_heads: int):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    hf_dir = tmp_path_factory.mktemp("tiny_hf")
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, hf_dir / name)
    out = tmp_path_factory.mktemp("tiny") / "model"
    assert main(["convert", str(hf_dir), str(out)]) == 0
    return out


def _generate(capsys, *args) -> dict:
    assert main(["generate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_json_ar_and_hierarchy_agree(model_dir, capsys):
    common = ["--model", str(model_dir), "--prompt", "Hello there", "--chat", "--max-new-tokens", "12"]
    ar = _generate(capsys, *common)
    assert set(ar) >= {"tokens", "text", "seconds", "tokens_per_s", "ttft_s", "decode_tokens_per_s"}
    assert len(ar["tokens"]) == ar["num_tokens"]
    hsd = _generate(capsys, *common, "--ngram", "2", "--draft", str(model_dir), "--buffers", "3,2",
                    "--verifier", "block,tokenwise")
    assert hsd["tokens"] == ar["tokens"]  # greedy: identical to the target's AR
    assert len(hsd["stats"]["proposed"]) == 2 and hsd["stats"]["target_rounds"] >= 1


def test_generate_stream_prints_the_text_as_it_comes(model_dir, capsys, monkeypatch):
    common = ["--model", str(model_dir), "--prompt", "Hello there", "--chat", "--max-new-tokens", "12",
              "--ngram", "2", "--buffers", "2", "--rounds-per-chunk", "1"]
    result = _generate(capsys, *common, "--stream")  # --json: one object at the end, nothing before it
    assert result["ttft_s"] > 0 and result["rounds_per_chunk"] == 1
    assert result["decode_tokens_per_s"] is None or result["decode_tokens_per_s"] > 0
    pieces: list[str] = []
    monkeypatch.setattr(generate_cli, "_print_now", pieces.append)
    assert main(["generate", *common, "--stream"]) == 0
    assert "".join(pieces) == result["text"] and sum(bool(p) for p in pieces) >= 2
    assert "first token after" in capsys.readouterr().err


def test_generate_prompt_ids_and_errors(model_dir, capsys):
    out = _generate(capsys, "--model", str(model_dir), "--prompt-ids", "1,2,3", "--max-new-tokens", "4")
    assert len(out["tokens"]) <= 4
    assert (
        main(["generate", "--model", str(model_dir), "--prompt-ids", "1,99999", "--max-new-tokens", "4"]) == 2
    )
    assert "outside the vocabulary" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt-ids", "1", "--temperature", "-1"]) == 2
    assert "temperature must be" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt-ids", "1", "--ngram", "2",
                 "--buffers", "2,2"]) == 2
    assert "need 1 buffer targets" in capsys.readouterr().err


def test_generate_refuses_an_int8_draft_with_another_tokenizer(model_dir, tmp_path, capsys):
    """`int8:DIR` drafts are checked against the target's tokenizer like plain ones (n-gram drafts,
    which have none, are not)."""
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab)[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: same size, another tokenizer
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    common = ["generate", "--model", str(model_dir), "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]
    for draft in (str(other), f"int8:{other}"):
        assert main(common + ["--draft", draft]) == 2
        err = capsys.readouterr().err
        assert f"hsd-jax generate: error: draft {draft} has a different tokenizer" in err
    assert main(common + ["--draft", "ngram:2", "--draft", f"int8:{model_dir}", "--buffers", "2,2"]) == 0


def test_convert_refuses_unknown_source(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_validate_plan_measures_and_compares(model_dir, tmp_path, capsys):
    """`validate-plan` runs each hierarchy for real (greedy: all token-identical) and reports the
    planner's prediction beside the measured decode latency."""
    kmax = 8
    stats = {"version": 1, "hardware": "test", "dtype": "float32", "batch_size": 1, "temperature": 0.0,
             "versions": {}, "target": "tiny",
             "models": [{"name": "ngram3", "source": "ngram:3", "params": 0, "cost_s": [1e-5] * kmax},
                        {"name": "tiny", "source": str(model_dir), "params": 10_000,
                         "cost_s": [1e-3 * (1 + 0.1 * k) for k in range(kmax)]}],
             "acceptance": {"greedy": {"ngram3": {"tiny": 0.3}}}}
    stats_path, prompts, out = tmp_path / "stats.json", tmp_path / "p.jsonl", tmp_path / "v.json"
    stats_path.write_text(json.dumps(stats))
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ("Count to five.", "Name a colour.")))
    assert (
        main(
            [
                "validate-plan",
                "--stats",
                str(stats_path),
                "--prompts",
                str(prompts),
                "--grid",
                "--top",
                "2",
                "--num-prompts",
                "2",
                "--max-new-tokens",
                "8",
                "--json",
                str(out),
                "--plot",
                str(tmp_path / "v.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out.read_text())
    labels = [r["label"] for r in report["rows"]]
    assert {"tiny", "ngram3[2] > tiny", "ngram3[4] > tiny", "ngram3[8] > tiny"} <= set(labels)
    assert len(labels) == len(set(labels))
    for row in report["rows"]:
        assert row["identical_to_first"], row["label"]
        assert row["measured_s"] > 0 and row["predicted_iid_s"] > 0
        assert row["error_iid"] == pytest.approx(row["predicted_iid_s"] / row["measured_s"] - 1)
        assert len(row["forward_passes"]) == len(row["chain"]) and row["tokens"] == 8
        assert row["tokens"] / row["target_rounds"] == pytest.approx(row["tokens_per_target_call"])
        # the latency's two factors: rounds cost the round's seconds, each commits tokens
        assert row["predicted_iid_s"] == pytest.approx(
            row["predicted_round_s"] / row["predicted_tokens_per_target_call"])
        assert row["measured_round_s"] == pytest.approx(row["measured_s"] * row["tokens_per_target_call"])
        assert row["error_tokens"] == pytest.approx(
            row["predicted_tokens_per_target_call"] / row["tokens_per_target_call"] - 1)
        if row["label"] == "tiny":
            assert row["predicted_tokens_per_target_call"] == 1.0 and row["tokens_per_target_call"] == 1.0
    assert report["summary"]["hierarchies"] == len(labels)
    assert "ms/token" in capsys.readouterr().out


def test_validate_plan_runs_the_profiles_workload():
    """By default the hierarchies run on as many prompts, and as many tokens each, as the stats'
    acceptances were measured on, so that tokens per round are comparable with the prediction."""
    from hsd_jax.bench.validate import profile_workload
    from hsd_jax.planning import Stats

    stats = Stats.from_json({"version": 1, "hardware": "test", "dtype": "float32", "batch_size": 1,
                             "temperature": 0.0, "versions": {}, "target": "t", "prompts": 24,
                             "answer_positions": 1536,
                             "models": [{"name": "t", "source": "t", "params": 1, "cost_s": [1.0]}],
                             "acceptance": {"greedy": {}}})
    assert profile_workload(stats) == (24, 64)
    assert profile_workload(dataclasses.replace(stats, prompts=None)) == (6, 48)


def test_generate_with_a_plan_reports_against_ar(model_dir, tmp_path, capsys):
    plan = {
        "version": 1,
        "chain": [{"name": "ngram3", "source": "ngram:3"}, {"name": "tiny", "source": str(model_dir)}],
        "buffers": [3],
        "verifier": "tokenwise",
        "mode": "greedy",
        "predicted_latency_s": 1e-3,
        "ar_latency_s": 1e-3,
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    assert main(["generate", "--plan", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "6"]) == 2
    assert "outside its directory" in capsys.readouterr().err  # an absolute source needs the flag
    result = _generate(capsys, "--plan", str(path), "--prompt-ids", "1,2,3,4,5", "--max-new-tokens", "12",
                       "--compare-ar", "--allow-outside-plan-dir")
    assert result["ar"]["identical"] and result["num_tokens"] == 12
    assert result["stats"]["target_rounds"] >= 1
    assert main(["generate", "--plan", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "6",
                 "--compare-ar", "--allow-outside-plan-dir"]) == 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "level 1 accepts" in printed and "identical to AR: True" in printed


def test_profile_and_bench_on_a_mesh(model_dir_8_heads, tmp_path, capsys):
    """`--mesh` on profile and bench: the family sharded (drafts replicated, the target
    tensor-parallel over the 8 fake CPU devices), the same greedy tokens as plain AR."""
    model_dir = model_dir_8_heads
    prompts, stats_path, plan_path, bench_path = (
        tmp_path / n for n in ("p.jsonl", "s.json", "plan.json", "b.json")
    )
    prompts.write_text(json.dumps({"prompt": "Count to five."}) + "\n")
    assert (
        main(
            [
                "profile",
                "--models",
                str(model_dir),
                "--ngram",
                "3",
                "--prompts",
                str(prompts),
                "--max-k",
                "2",
                "--max-new-tokens",
                "6",
                "--repeats",
                "1",
                "--temperature",
                "0",
                "--mesh",
                "model=8",
                "--out",
                str(stats_path),
            ]
        )
        == 0
    )
    stats = json.loads(stats_path.read_text())
    assert stats["mesh"] == {"data": 1, "model": 8}
    assert [m["name"] for m in stats["models"]] == ["ngram3", "model"] and len(
        stats["models"][1]["cost_s"]
    ) == 2
    assert 0 <= stats["acceptance"]["greedy"]["ngram3"]["model"] <= 1
    plan = {
        "version": 1,
        "chain": [{"name": "ngram3", "source": "ngram:3"}, {"name": "model", "source": str(model_dir)}],
        "buffers": [2],
        "verifier": "tokenwise",
        "mode": "greedy",
        "predicted_latency_s": 1e-3,
        "ar_latency_s": 1e-3,
    }
    plan_path.write_text(json.dumps(plan))
    assert (
        main(
            [
                "bench",
                "--plan",
                str(plan_path),
                "--stats",
                str(stats_path),
                "--prompts",
                str(prompts),
                "--methods",
                "ar,hsd",
                "--max-new-tokens",
                "6",
                "--mesh",
                "model=8",
                "--json",
                str(bench_path),
                "--allow-outside-plan-dir",
            ]
        )
        == 0
    )
    results = json.loads(bench_path.read_text())
    assert results["mesh"] == {"data": 1, "model": 8}
    assert results["methods"]["hsd"]["identical_to_ar"] is True
    for entry in results["methods"].values():  # streamed too: time to first token and decode rate apart
        assert entry["ttft_s"] > 0 and entry["stream_tokens_per_s"] > 0 and "decode_tokens_per_s" in entry
    assert main(["bench", "--model", str(model_dir), "--mesh", "model=8"]) == 2
    assert "--mesh applies to `bench --plan`" in capsys.readouterr().err


def test_distill_makes_greedy_and_sampled_data_and_trains_on_both(model_dir, tmp_path, capsys):
    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text("".join(json.dumps({"prompt": f"Name {n} colours."}) + "\n" for n in range(1, 7)))
    greedy, sampled, out = tmp_path / "greedy.npz", tmp_path / "sampled.npz", tmp_path / "draft"
    common = [
        "distill",
        "--target",
        str(model_dir),
        "--out-dir",
        str(out),
        "--layers",
        "1",
        "--head-vocab",
        "256",
        "--instructions",
        str(instructions),
        "--answer-tokens",
        "6",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--warmup",
        "1",
        "--checkpoint-every",
        "2",
        "--data",
        str(greedy),
        "--data",
        str(sampled),
    ]
    assert (
        main(common + ["--answer-temperature", "0", "--answer-temperature", "1", "--answer-temperature", "2"])
        == 2
    )
    assert "3 --answer-temperature values for 2 --data files" in capsys.readouterr().err
    assert not greedy.exists() and not out.exists()

    assert main(common + ["--answer-temperature", "0", "--answer-temperature", "1"]) == 0
    with np.load(greedy) as g, np.load(sampled) as s:
        assert float(g["temperature"]) == 0.0 and float(s["temperature"]) == 1.0
        assert g["tokens"].shape[0] == s["tokens"].shape[0] == 6
    summary = json.loads((out / "distill_summary.json").read_text())
    assert summary["data"] == [str(greedy), str(sampled)] and summary["data_sequences"] == 12
    assert load_model(out).config.head_vocab_size == 256


def test_bench_times_every_method_on_each_prompt_in_turn(model_dir_8_heads, tmp_path, monkeypatch):
    """Our methods are compiled first, then timed prompt by prompt with every method in turn (one-shot
    runs, then the streamed ones), so a slow spell of the machine falls on every method alike."""
    import hsd_jax.bench.methods as bench_methods

    model_dir = model_dir_8_heads
    prompts, stats_path, plan_path = (tmp_path / n for n in ("p.jsonl", "s.json", "plan.json"))
    texts = ("Count to five.", "Name a colour.")
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    assert main(["profile", "--models", str(model_dir), "--ngram", "3", "--prompts", str(prompts),
                 "--max-k", "2", "--max-new-tokens", "4", "--repeats", "1", "--temperature", "0",
                 "--out", str(stats_path)]) == 0
    plan = {"version": 1, "chain": [{"name": "ngram3", "source": "ngram:3"},
                                    {"name": "model", "source": str(model_dir)}],
            "buffers": [2], "verifier": "tokenwise", "mode": "greedy", "predicted_latency_s": 1e-3,
            "ar_latency_s": 1e-3}
    plan_path.write_text(json.dumps(plan))
    calls = []

    def recorded(factory, kind):
        def make(*args):
            timer, method = factory(*args), len({m for k, m, _ in calls if k == kind} | {None}) - 1
            calls.append((kind, method, "compiled"))

            def timed(i):
                calls.append((kind, method, i))
                return timer(i)
            return timed
        return make

    monkeypatch.setattr(bench_methods, "jax_prompt_timer", recorded(bench_methods.jax_prompt_timer, "once"))
    monkeypatch.setattr(bench_methods, "stream_prompt_timer",
                        recorded(bench_methods.stream_prompt_timer, "stream"))

    def not_transformers(method, *args):
        raise AssertionError(f"{method} ran through transformers' path")

    monkeypatch.setattr(bench_methods, "_time_hf_method", not_transformers)
    results = bench_methods.run_methods(str(plan_path), str(stats_path), str(prompts),
                                        methods=("ar", "sd", "hsd"), max_new_tokens=4,
                                        allow_outside_plan_dir=True)
    compiled = [c for c in calls if c[2] == "compiled"]
    timed = [c for c in calls if c[2] != "compiled"]
    assert calls[:len(compiled)] == compiled and len(compiled) == 6  # everything compiled before any timing
    assert timed == [(kind, method, i) for i in (0, 1) for kind in ("once", "stream") for method in (0, 1, 2)]
    assert list(results["methods"]) == ["ar", "sd", "hsd"]
    assert all(len(results["methods"][m]["per_prompt"]) == 2 for m in ("ar", "sd", "hsd"))
    assert results["methods"]["hsd"]["identical_to_ar"] is True
