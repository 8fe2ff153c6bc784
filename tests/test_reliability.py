"""The README's promise under bad input, faults and untrusted files (issue 15).

Every expected failure of a command ends as one line `hsd-jax <command>: error: <problem and fix>`,
exit status 2, no traceback and nothing left behind; the library refuses bad requests with a
clear ValueError / TypeError; no code from a model directory ever runs. CLI cases run as
subprocesses (the real entry point, signals included); API cases run in-process.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from families import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsd_jax.cli.main import main
from hsd_jax.decoding.ar import ar_generate, validate_request
from hsd_jax.decoding.hsd import MAX_BUFFER, Hierarchy, hsd_generate
from hsd_jax.decoding.ngram import NGramDrafter
from hsd_jax.decoding.sampling import SamplingParams
from hsd_jax.io.checkpoint import copy_tokenizer_files, load_model
from hsd_jax.io.convert import convert
from hsd_jax.io.files import atomic_directory, write_bytes
from hsd_jax.io.sources import parse_source
from hsd_jax.models import Model, init_params

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64
WORDS = [f"w{i}" for i in range(VOCAB - 3)]


# ------------------------------------------------------------------------------ fixtures


def _save_tokenizer(directory: Path) -> None:
    """A 64-token word-level tokenizer (no download): <unk>=0, <s>=1, </s>=2, then w0, w1, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(directory))


def _hf_llama(directory: Path, **overrides) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    config = transformers.LlamaConfig(**{**fields, **overrides})
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    _save_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return _hf_llama(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, hf_dir) -> Path:
    return convert(hf_dir, tmp_path_factory.mktemp("converted") / "tiny", progress=False)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def hsd_jax_cli(*args, cwd: Path, **env) -> subprocess.CompletedProcess:
    """`python -m hsd_jax.cli.main ARGS` with the worktree's code, stdin closed."""
    return subprocess.run([sys.executable, "-m", "hsd_jax.cli.main", *map(os.fsencode, args)], cwd=cwd,
                          env=_env(**env), stdin=subprocess.DEVNULL, capture_output=True, timeout=600)


def assert_clean_error(proc: subprocess.CompletedProcess, command: str, match: str) -> str:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"hsd-jax {command}: error: "), err[-2000:]
    assert match.lower() in lines[0].lower(), lines[0]
    return lines[0]


# --------------------------------------------------------------------------- the CLI table


def _stats(source: str, **changes) -> dict:
    stats = {"version": 1, "hardware": "test", "dtype": "float32", "batch_size": 1, "temperature": 0.0,
             "versions": {}, "target": "tiny",
             "models": [{"name": "ngram3", "source": "ngram:3", "params": 0, "cost_s": [1e-5] * 4},
                        {"name": "tiny", "source": source, "params": 10_000, "cost_s": [1e-3] * 4}],
             "acceptance": {"greedy": {"ngram3": {"tiny": 0.3}}}}
    return {**stats, **changes}


def _plan(source: str) -> dict:
    return {"version": 1, "chain": [{"name": "ngram3", "source": "ngram:3"}, {"name": "t", "source": source}],
            "buffers": [2], "predicted_latency_s": 0.01, "ar_latency_s": 0.02}


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _hf_copy(ctx, tmp: Path) -> Path:
    return Path(shutil.copytree(ctx["hf"], tmp / "hf"))


def _truncated_safetensors(ctx, tmp):
    src = _hf_copy(ctx, tmp)
    data = (src / "model.safetensors").read_bytes()
    _write(src / "model.safetensors", data[: len(data) // 2])
    return ["convert", str(src), str(tmp / "out")]


def _garbage_safetensors(ctx, tmp):
    src = _hf_copy(ctx, tmp)
    _write(src / "model.safetensors", b"\x00garbage" * 100)
    return ["convert", str(src), str(tmp / "out")]


def _config_without_heads(ctx, tmp):
    src = _hf_copy(ctx, tmp)
    config = json.loads((src / "config.json").read_text())
    del config["num_attention_heads"]
    _write(src / "config.json", json.dumps(config))
    return ["convert", str(src), str(tmp / "out")]


def _symlinked_out(ctx, tmp):
    (tmp / "real").mkdir()
    (tmp / "out").symlink_to(tmp / "real")
    return ["convert", str(ctx["hf"]), str(tmp / "out")]


def _dangling_out(ctx, tmp):
    (tmp / "out").symlink_to(tmp / "nowhere")
    return ["convert", str(ctx["hf"]), str(tmp / "out")]


def _existing_out(ctx, tmp):
    (tmp / "out").mkdir()
    _write(tmp / "out" / "keep.txt", "x")
    return ["convert", str(ctx["hf"]), str(tmp / "out")]


def _generate(ctx, *extra):
    return ["generate", "--model", str(ctx["model"]), *extra]


def _plan_file(ctx, tmp, content: str | bytes):
    return ["generate", "--plan", str(_write(tmp / "plan.json", content)), "--prompt-ids", "3,4",
            "--max-new-tokens", "2"]


def _outside_plan(ctx, tmp):
    (tmp / "plans").mkdir()
    rel = os.path.relpath(ctx["model"], tmp / "plans")
    return ["generate", "--plan", str(_write(tmp / "plans" / "plan.json", json.dumps(_plan(rel)))),
            "--prompt-ids", "3,4", "--max-new-tokens", "2"]


def _edited_config(ctx, tmp):
    model = Path(shutil.copytree(ctx["model"], tmp / "model"))
    config = json.loads((model / "hsd_config.json").read_text())
    config["rope_theta"] = 500.0
    _write(model / "hsd_config.json", json.dumps(config))
    return ["generate", "--model", str(model), "--prompt-ids", "3,4", "--max-new-tokens", "2"]


def _stats_file(ctx, tmp, **changes):
    path = _write(tmp / "stats.json", json.dumps(_stats(str(ctx["model"]), **changes)))
    return ["plan", "--stats", str(path), "--out", str(tmp / "plan.json")]


def _plan_out_is_dir(ctx, tmp):
    (tmp / "plandir").mkdir()
    path = _write(tmp / "stats.json", json.dumps(_stats(str(ctx["model"]))))
    return ["plan", "--stats", str(path), "--out", str(tmp / "plandir")]


def _bench_empty_prompts(ctx, tmp):
    plan = _write(tmp / "plan.json", json.dumps(_plan(str(ctx["model"]))))
    stats = _write(tmp / "stats.json", json.dumps(_stats(str(ctx["model"]))))
    prompts = _write(tmp / "p.jsonl", "")
    return ["bench", "--plan", str(plan), "--stats", str(stats), "--prompts", str(prompts)]


def _profile_out_is_dir(ctx, tmp):
    (tmp / "statsdir").mkdir()
    prompts = _write(tmp / "p.jsonl", json.dumps({"prompt": "w1 w2"}))
    return ["profile", "--models", str(ctx["model"]), "--prompts", str(prompts), "--out",
            str(tmp / "statsdir")]


def _make_data_into(c, t, kind: str) -> list[str]:
    out = t / "shards"
    if kind == "file":
        out.write_text("not a directory")
    else:
        (t / "elsewhere").mkdir()
        out.symlink_to(t / "elsewhere")
    return ["make-data", "--target", str(c["model"]), "--out-dir", str(out)]


def _empty_dir(t):
    (t / "no-shards").mkdir()
    return t / "no-shards"


CLI_CASES = {
    # corrupt and malformed sources
    "truncated-safetensors": ("convert", _truncated_safetensors, "cannot read the weights"),
    "garbage-safetensors": ("convert", _garbage_safetensors, "cannot read the weights"),
    "config-missing-num-attention-heads": ("convert", _config_without_heads, "num_attention_heads"),
    "convert-missing-source": ("convert", lambda c, t: ["convert", str(t / "nothing"), str(t / "o")],
                               "does not exist"),
    # output paths, checked before the work
    "convert-symlinked-out": ("convert", _symlinked_out, "symbolic link"),
    "convert-dangling-out": ("convert", _dangling_out, "symbolic link"),
    "convert-existing-out": ("convert", _existing_out, "--overwrite"),
    "plan-out-is-a-directory": ("plan", _plan_out_is_dir, "is a directory"),
    "profile-out-is-a-directory": ("profile", _profile_out_is_dir, "is a directory"),
    # misleading messages, fixed
    "missing-model-dir": ("generate", lambda c, t: ["generate", "--model", str(t / "nope"), "--prompt", "w1"],
                          "does not exist"),
    "non-model-dir": ("generate", lambda c, t: ["generate", "--model", str(t), "--prompt", "w1"],
                      "not an hsd-jax model directory"),
    "empty-prompt": ("generate", lambda c, t: _generate(c, "--prompt", ""), "--prompt is empty"),
    "invalid-utf8-prompt": ("generate", lambda c, t: _generate(c, "--prompt", b"w1 \xff\xfe"),
                            "not valid UTF-8"),
    "bench-empty-prompts": ("bench", _bench_empty_prompts, "holds no prompts"),
    "distill-steps-0": ("distill", lambda c, t: ["distill", "--target", str(c["model"]), "--out-dir",
                                                 str(t / "d"), "--layers", "0", "--steps", "0"],
                        "--steps must be an integer >= 1"),
    "make-data-answer-tokens-0": ("make-data", lambda c, t: [
        "make-data", "--target", str(c["model"]), "--out-dir", str(t / "d"), "--answer-tokens", "0"],
        "--answer-tokens must be a positive integer"),
    "make-data-max-seconds-0": ("make-data", lambda c, t: [
        "make-data", "--target", str(c["model"]), "--out-dir", str(t / "d"), "--max-seconds", "0"],
        "--max-seconds must be > 0"),
    "make-data-out-is-a-file": ("make-data", lambda c, t: _make_data_into(c, t, "file"),
                                "is a link or a file"),
    "make-data-symlinked-out": ("make-data", lambda c, t: _make_data_into(c, t, "link"),
                                "never writes through"),
    "distill-data-dir-without-shards": ("distill", lambda c, t: [
        "distill", "--target", str(c["model"]), "--out-dir", str(t / "d"), "--layers", "0", "--data",
        str(_empty_dir(t))], "holds no data shards"),
    # size limits
    "huge-max-new-tokens": ("generate", lambda c, t: _generate(c, "--prompt", "w1", "--max-new-tokens",
                                                               "1000000000"), "context length of 128"),
    "huge-buffers": ("generate", lambda c, t: _generate(c, "--prompt", "w1", "--ngram", "3", "--buffers",
                                                        "100000"), f"in [1, {MAX_BUFFER}]"),
    "huge-ngram": ("generate", lambda c, t: _generate(c, "--prompt", "w1", "--ngram", "100"), "--ngram must"),
    # plan and stats files
    "plan-truncated-json": ("generate", lambda c, t: _plan_file(c, t, '{"version": 1, "chain": ['),
                            "plan.json is not valid JSON"),
    "plan-json-list": ("generate", lambda c, t: _plan_file(c, t, "[1, 2]"), "must be a JSON object"),
    "plan-non-string-source": ("generate", lambda c, t: _plan_file(c, t, json.dumps(_plan(["x"]))),
                               "source must be a string"),
    "plan-source-outside-its-directory": ("generate", _outside_plan, "outside its directory"),
    "plan-absolute-source": ("generate", lambda c, t: _plan_file(c, t, json.dumps(_plan(str(c["model"])))),
                             "--allow-outside-plan-dir"),
    "stats-versions-5": ("plan", lambda c, t: _stats_file(c, t, versions=5), "versions must be an object"),
    "stats-wrong-version": ("plan", lambda c, t: _stats_file(c, t, version=7), "stats version 7"),
    # wrong results that are now refused
    "edited-hsd-config": ("generate", _edited_config, "edited after the weights"),
    "zhou-without-allow-inexact": ("generate", lambda c, t: _generate(
        c, "--prompt-ids", "3", "--ngram", "2", "--verifier", "zhou"), "--allow-inexact"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_fails_cleanly(case, hf_dir, model_dir, tmp_path):
    command, build, match = CLI_CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    argv = build({"hf": hf_dir, "model": model_dir}, work)
    before, model_before = _files(work), _files(model_dir)
    proc = hsd_jax_cli(*argv, cwd=work)
    assert_clean_error(proc, command, match)
    assert _files(work) == before, "files were left behind"
    assert _files(model_dir) == model_before


def test_every_cli_case_names_a_subcommand():
    from hsd_jax.cli.main import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {command for command, _, _ in CLI_CASES.values()} <= commands


# --------------------------------------------------------------------------- security


def test_code_in_a_model_directory_never_runs(model_dir, tmp_path):
    """A tokenizer_config.json with an `auto_map` pointing at the directory's own Python file: the
    file is not run, nothing asks on stdout, and the command still works or fails cleanly."""
    evil = Path(shutil.copytree(model_dir, tmp_path / "evil"))
    marker = tmp_path / "ran"
    _write(evil / "evil_tokenizer.py", f"open({str(marker)!r}, 'w').write('ran')\n"
           "from transformers import PreTrainedTokenizerFast\n"
           "class Evil(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((evil / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.Evil"]}
    _write(evil / "tokenizer_config.json", json.dumps(config))
    proc = hsd_jax_cli("generate", "--model", str(evil), "--prompt", "w1 w2", "--max-new-tokens", "2",
                       "--json", cwd=tmp_path)
    assert not marker.exists(), "code from the model directory ran"
    assert b"[y/N]" not in proc.stdout and b"custom code" not in proc.stdout
    if proc.returncode != 0:
        assert_clean_error(proc, "generate", "tokenizer")
    else:
        json.loads(proc.stdout.decode().strip().splitlines()[-1])


def test_every_from_pretrained_is_local_and_trusts_no_code():
    """Every `from_pretrained` call in the package passes local_files_only=True and
    trust_remote_code=False (bench/hf_baseline, io/checkpoint, io/tensors, ...)."""
    calls = []
    for path in (REPO / "hsd_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained":
                kwargs = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                calls.append((path.name, node.lineno, kwargs))
    assert len(calls) >= 3
    for name, line, kwargs in calls:
        assert kwargs.get("trust_remote_code") is False, f"{name}:{line}"
        assert kwargs.get("local_files_only") is True, f"{name}:{line}"


def test_planted_symlink_is_never_written_through(tmp_path):
    """The atomic writer (profile --out, distill, plan, ...) never follows a planted link: neither
    at the destination nor at a predictable temporary name."""
    victim = _write(tmp_path / "victim", "precious")
    (tmp_path / "out.json.tmp").symlink_to(victim)
    (tmp_path / "link.json").symlink_to(victim)
    write_bytes(tmp_path / "out.json", b"{}")
    write_bytes(tmp_path / "link.json", b"{}")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "link.json").is_symlink() and (tmp_path / "link.json").read_text() == "{}"


def test_tokenizer_symlinks_and_escaping_shards_are_refused(hf_dir, tmp_path):
    src = Path(shutil.copytree(hf_dir, tmp_path / "src"))
    secret = _write(tmp_path / "secret.json", "{}")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to(secret)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="symbolic link"):
        copy_tokenizer_files(src, tmp_path / "out")
    (src / "tokenizer.json").unlink()
    shutil.copy(hf_dir / "tokenizer.json", src / "tokenizer.json")
    (src / "model.safetensors").rename(tmp_path / "outside.safetensors")
    _write(src / "model.safetensors.index.json",
           json.dumps({"weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}}))
    with pytest.raises(ValueError, match="plain relative file names"):
        convert(src, tmp_path / "converted", progress=False)
    assert not (tmp_path / "converted").exists()


def test_plan_sources_resolve_against_the_plan_and_stay_inside(model_dir, tmp_path, monkeypatch):
    from hsd_jax.planning import hierarchy_from_plan

    plans = tmp_path / "plans"
    shutil.copytree(model_dir, plans / "models" / "tiny")
    _write(plans / "inside.json", json.dumps(_plan("models/tiny")))
    _write(plans / "outside.json", json.dumps(_plan(str(model_dir))))
    monkeypatch.chdir(tmp_path)  # not the plan's directory
    assert hierarchy_from_plan(plans / "inside.json").buffers == (2,)
    with pytest.raises(ValueError, match="outside its directory"):
        hierarchy_from_plan(plans / "outside.json")
    assert hierarchy_from_plan(plans / "outside.json", allow_outside_plan_dir=True).buffers == (2,)
    (plans / "link").symlink_to(model_dir)  # a link inside the plan directory leading out
    _write(plans / "link.json", json.dumps(_plan("link")))
    with pytest.raises(ValueError, match="outside its directory"):
        hierarchy_from_plan(plans / "link.json")


def test_ngram_order_is_capped():
    assert parse_source("ngram:16").n == 16
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        parse_source("ngram:17")


# --------------------------------------------------------------------------- leftovers and signals


def test_stale_temporaries_of_a_killed_run_are_removed_and_a_half_swap_is_undone(hf_dir, tmp_path):
    """SIGKILL leaves `.OUT.tmp-*`; the next write removes it. A crash between the two renames of a
    non-atomic `--overwrite` swap leaves the old directory at `.OUT.old-*`: it is put back."""
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-0123456789ab"
    stale.mkdir()
    _write(stale / "half.bin", b"x" * 10)
    convert(hf_dir, out, progress=False)
    assert not stale.exists() and (out / "hsd_config.json").is_file()
    out.rename(tmp_path / ".out.old-abcdefabcdef")  # the state between the two renames
    with pytest.raises(FileExistsError, match="--overwrite"):  # the old model is back, and protected
        with atomic_directory(out):
            pass
    assert (out / "hsd_config.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    convert(hf_dir, out, progress=False, overwrite=True)  # the swap itself
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    load_model(out)


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_convert_leaves_nothing_and_exits_cleanly(tmp_path, signum, status):
    """Ctrl-C / SIGTERM in the middle of writing: one line, status 130 / 143, no temporary left."""
    script = textwrap.dedent(f"""
        import sys, time
        import hsd_jax.cli.convert as command
        from hsd_jax.cli.main import main
        from hsd_jax.io.files import atomic_directory

        def slow_convert(source, out_dir, **kwargs):
            with atomic_directory(out_dir) as tmp:
                (tmp / "weights.bin").write_bytes(b"x" * 1000)
                print("ready", flush=True)
                time.sleep(60)
            return out_dir

        command.convert = slow_convert
        sys.exit(main(["convert", "anything", {str(tmp_path / "out")!r}]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert err.decode().strip().splitlines()[-1] == "hsd-jax convert: interrupted"
    assert b"Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_interrupt_swallowed_by_a_callback_still_exits_130(monkeypatch, capsys):
    import hsd_jax.cli.convert as command

    def swallowing(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            pass  # what a gc callback once did
        return "out"

    monkeypatch.setattr(command, "convert", swallowing)
    assert main(["convert", "a", "b"]) == 130
    assert "hsd-jax convert: interrupted" in capsys.readouterr().err


def test_load_hf_reference_leaves_no_export_behind(model_dir, tmp_path, monkeypatch):
    import tempfile

    from hsd_jax.bench.hf_baseline import load_hf_reference

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert load_hf_reference(model_dir) is not None
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ generate, in-process


def test_mesh_initialises_distributed_before_loading_models(model_dir, monkeypatch, capsys):
    import hsd_jax.cli.common as common
    import hsd_jax.cli.generate as generate

    order = []
    real_from_source = generate.from_source
    monkeypatch.setattr(common.distributed, "initialize", lambda *a, **k: order.append("initialize"))
    monkeypatch.setattr(generate, "from_source",
                        lambda *a, **k: order.append("load") or real_from_source(*a, **k))
    status = main(["generate", "--model", str(model_dir), "--prompt-ids", "3,4", "--max-new-tokens", "2",
                   "--mesh", "data=-1", "--json"])  # 8 fake devices: the batch of 1 may not split
    assert status in (0, 2) and order[0] == "initialize" and "load" in order
    capsys.readouterr()


def test_allow_inexact_admits_zhou(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt-ids", "3,4", "--max-new-tokens", "3",
                 "--ngram", "2", "--verifier", "zhou", "--allow-inexact", "--json"]) == 0
    assert "zhou" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["hierarchy"]


def test_tokenizer_check_reads_files_not_loaded_classes(model_dir, tmp_path, capsys):
    """Byte-identical tokenizer files pass whatever class tokenizer_config.json names; int8 drafts are
    checked too; a changed vocabulary is refused."""
    same = Path(shutil.copytree(model_dir, tmp_path / "same"))
    config = json.loads((same / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "Qwen2TokenizerFast"
    _write(same / "tokenizer_config.json", json.dumps(config))
    common = ["generate", "--model", str(model_dir), "--prompt-ids", "3,4", "--max-new-tokens", "2", "--json"]
    assert main(common + ["--draft", str(same)]) == 0
    other = Path(shutil.copytree(model_dir, tmp_path / "other"))
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["w0"], tokenizer["model"]["vocab"]["w1"] = 4, 3
    _write(other / "tokenizer.json", json.dumps(tokenizer))
    capsys.readouterr()
    for draft in (str(other), f"int8:{other}"):
        assert main(common + ["--draft", draft]) == 2
        assert "different tokenizer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ API table


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config(vocab=32, layers=2, max_position_embeddings=64)
    return Model(init_params(config, jax.random.PRNGKey(0)), config)


PROMPT, LENGTHS = np.array([[1, 2, 3]], np.int32), np.array([3], np.int32)

API_CASES = {
    "float-ids": (dict(prompt_tokens=PROMPT.astype(np.float32)), TypeError, "must hold integers"),
    "nan-ids": (dict(prompt_tokens=np.array([[1.0, np.nan, 3.0]])), TypeError, "must hold integers"),
    "bool-ids": (dict(prompt_tokens=PROMPT.astype(bool)), TypeError, "must hold integers"),
    "float-lengths": (dict(prompt_lengths=LENGTHS.astype(np.float64)), TypeError, "must hold integers"),
    "empty-prompt": (dict(prompt_tokens=np.zeros((1, 0), np.int32), prompt_lengths=np.array([0])), ValueError,
                     "the prompt is empty"),
    "rope-context-length": (dict(max_new_tokens=100), ValueError, "context length of 64"),
    "max-new-tokens-float": (dict(max_new_tokens=4.0), ValueError, "positive integer"),
    "max-new-tokens-bool": (dict(max_new_tokens=True), ValueError, "positive integer"),
    "temperature-nan": (dict(temperature=float("nan")), ValueError, "temperature must be"),
    "temperature-bool": (dict(temperature=True), ValueError, "temperature must be"),
    "eos-float": (dict(eos_token_id=2.5), TypeError, "eos_token_id"),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_api_refuses(tiny, case):
    kwargs, error, match = API_CASES[case]
    call = {"max_new_tokens": 4, **kwargs}
    prompt, lengths = call.pop("prompt_tokens", PROMPT), call.pop("prompt_lengths", LENGTHS)
    hierarchy = Hierarchy([NGramDrafter(2, 32), tiny], (2,))
    for generate, model in ((ar_generate, tiny), (hsd_generate, hierarchy)):
        with pytest.raises(error, match=match):
            generate(model, prompt, lengths, jax.random.PRNGKey(0), **call)


def test_numpy_integers_and_tiny_temperatures(tiny):
    """np.int64 max_new_tokens is a positive integer; a temperature below the floor is greedy (1e-45
    used to overflow into token 0 every time)."""
    key = jax.random.PRNGKey(0)
    greedy = ar_generate(tiny, PROMPT, LENGTHS, key, max_new_tokens=np.int64(6))
    tiny_t = ar_generate(tiny, PROMPT, LENGTHS, key, max_new_tokens=6, temperature=1e-45)
    assert np.asarray(tiny_t.tokens).tolist() == np.asarray(greedy.tokens).tolist()
    assert SamplingParams(1e-45).validate().greedy and not SamplingParams(1e-3).validate().greedy


def test_cache_larger_than_memory_is_refused_before_allocating(tiny, monkeypatch):
    import hsd_jax.decoding.ar as ar

    monkeypatch.setattr(ar, "MEMORY_CHECK_BYTES", 0)
    monkeypatch.setattr(ar, "available_memory_bytes", lambda: 1000)
    with pytest.raises(ValueError, match="GiB is available"):
        ar_generate(tiny, PROMPT, LENGTHS, jax.random.PRNGKey(0), max_new_tokens=4)


def test_edited_config_is_refused_and_the_hash_travels_with_the_weights(model_dir, tmp_path):
    from hsd_jax.models.config import CONFIG_HASH_FILE, ConfigMismatchError

    copy = Path(shutil.copytree(model_dir, tmp_path / "m"))
    assert (copy / CONFIG_HASH_FILE).is_file()
    config = json.loads((copy / "hsd_config.json").read_text())
    _write(copy / "hsd_config.json", json.dumps(config, indent=4))  # formatting alone is no edit
    load_model(copy)
    _write(copy / "hsd_config.json", json.dumps({**config, "activation": "gelu"}))
    with pytest.raises(ConfigMismatchError, match="re-convert"):
        load_model(copy)


def test_gpt_neox_odd_rotary_width_matches_transformers(tmp_path):
    """head_dim 12 x rotary_pct 0.25 = 3 rotary dimensions: transformers rotates 2 * ceil(3 / 2)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=96, rotary_pct=0.25,
                                        max_position_embeddings=64)
    hf = transformers.GPTNeoXForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(convert(tmp_path / "hf", tmp_path / "ours", progress=False))
    assert model.config.rotary_dim == 3
    tokens = np.array([[5, 9, 2, 33, 17, 8, 40]], np.int64)
    with torch.no_grad():
        want = hf(torch.from_numpy(tokens)).logits.numpy()
    got, _ = model.step(jax.numpy.asarray(tokens, np.int32), model.init_cache(1, 16))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-4)


def test_distill_and_profile_refuse_bad_outputs_before_the_work(model_dir, tmp_path):
    from hsd_jax.train.distill import DraftSpec, TrainConfig, distill

    (tmp_path / "taken").mkdir()
    _write(tmp_path / "taken" / "x", "x")
    with pytest.raises(FileExistsError, match="--overwrite"):  # before reading any data
        distill(model_dir, tmp_path / "no-such-data.npz", tmp_path / "taken", DraftSpec((0,)), TrainConfig())
    for bad in (dict(steps=0), dict(steps=10, warmup_steps=10), dict(batch_size=0)):
        with pytest.raises(ValueError, match="must be"):
            TrainConfig(**bad)


def test_profile_refuses_an_empty_prompt_list(model_dir):
    from hsd_jax.planning import profile_family

    with pytest.raises(ValueError, match="prompt list is empty"):
        profile_family([str(model_dir)], [])


# ------------------------------------------------------------------------------------ fuzzing


@pytest.fixture(scope="module")
def fuzz_models():
    config = tiny_config(vocab=32, layers=1, max_position_embeddings=64)
    target = Model(init_params(config, jax.random.PRNGKey(1)), config)
    small = Model(init_params(dataclasses.replace(config, hidden_size=16, head_dim=4, intermediate_size=16),
                              jax.random.PRNGKey(2)),
                  dataclasses.replace(config, hidden_size=16, head_dim=4, intermediate_size=16))
    return [NGramDrafter(2, 32), small, target]


_numbers = st.one_of(st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                     st.none(), st.just(np.int64(3)), st.just(np.float32(0.5)), st.text(max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.integers(0, 3), width=st.integers(0, 70), dtype=st.sampled_from(["int32", "int64", "uint8",
       "float32", "bool", "float64"]), lengths=st.lists(st.integers(-2, 80), max_size=4),
       fill=st.integers(-40, 40), max_new=_numbers, temperature=_numbers, top_k=_numbers, top_p=_numbers,
       eos=_numbers, cache=st.integers(1, 200), headroom=st.integers(0, 40))
def test_fuzz_validate_request(batch, width, dtype, lengths, fill, max_new, temperature, top_k, top_p, eos,
                               cache, headroom):
    prompt = np.full((batch, width), fill).astype(dtype)
    try:
        sampling = SamplingParams(temperature, top_k, top_p)
        validate_request(32, prompt, np.asarray(lengths, np.int32), max_new_tokens=max_new, cache_size=cache,
                         max_positions=64, sampling=sampling, eos_token_id=eos, headroom=headroom)
    except (ValueError, TypeError) as e:
        assert str(e) and "Traceback" not in str(e)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(picks=st.lists(st.integers(0, 2), min_size=0, max_size=4),
       buffers=st.one_of(st.lists(_numbers, max_size=4), _numbers),
       verifier=st.one_of(st.sampled_from(["tokenwise", "block", "zhou", "nope"]), _numbers,
                          st.lists(st.sampled_from(["tokenwise", "block", "x"]), max_size=4)),
       shared=st.one_of(st.none(), _numbers), inexact=st.booleans())
def test_fuzz_hierarchy(fuzz_models, picks, buffers, verifier, shared, inexact):
    try:
        Hierarchy([fuzz_models[i] for i in picks], buffers, verifier, shared_vocab_size=shared,
                  allow_inexact=inexact)
    except (ValueError, TypeError) as e:
        assert str(e)
