"""Export back to transformers: tiny random HF models round-trip HF -> hsd-jax -> HF with the
same logits, unsupported features and damaged sources fail clearly, a failed export leaves
nothing, and the transformers baselines (plain and assisted greedy) agree with hsd-jax."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from families import layer_prefix, tiny_config
from safetensors import safe_open
from test_convert import CASES, VOCAB, tiny_model

from hsd_jax.bench import methods as methods_mod
from hsd_jax.bench.hf_baseline import hf_generate_timed, load_hf_causal_lm
from hsd_jax.bench.methods import load_hf_reference, run_bench
from hsd_jax.cli.export import add_parser as add_export_parser
from hsd_jax.cli.export import run as run_export
from hsd_jax.decoding.ar import ar_generate
from hsd_jax.io import export as export_mod
from hsd_jax.io.checkpoint import PARAMS_DIR, save_model
from hsd_jax.io.convert import convert
from hsd_jax.io.export import export_hf
from hsd_jax.models import Model, param_shapes
from hsd_jax.models.config import CONFIG_FILE, ModelConfig, UnsupportedArchitectureError, from_hf_dict

TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny matrices: torch's thread pool only adds synchronisation (40x slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(config: ModelConfig, seed: int = 0, scale: float = 0.5) -> Model:
    """Random numpy weights (no jax dispatch or compilation): N(0, scale^2), norm scales near 1."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = jax.tree_util.keystr(path)
        if "head_ids" in name:
            return np.sort(rng.choice(config.vocab_size, shape[0], replace=False)).astype(np.int32)
        base = 1.0 if "scale" in name else 0.0
        return (base + scale * rng.standard_normal(shape)).astype(np.float32)

    shapes = param_shapes(config)
    return Model(
        jax.tree_util.tree_map_with_path(leaf, shapes, is_leaf=lambda x: isinstance(x, tuple)), config
    )


def _load_hf(directory: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def _logits(model: torch.nn.Module, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def _hsd_dir(tmp_path: Path, case: str) -> tuple[torch.nn.Module, Path]:
    """A tiny HF model of `case` (with a stand-in tokenizer file) converted to hsd-jax."""
    original = tiny_model(case)
    original.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")
    return original, convert(tmp_path / "hf", tmp_path / "hsd", progress=False)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_matches_torch(case: str, tmp_path: Path):
    original, hsd = _hsd_dir(tmp_path, case)
    out = export_hf(hsd, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"]
    exported_config = json.loads((out / "config.json").read_text())
    assert from_hf_dict(exported_config) == ModelConfig.load(hsd)
    tokens = list(np.random.default_rng(0).integers(0, VOCAB, 24))  # past mistral's window of 6
    diff = np.abs(_logits(original, tokens) - _logits(_load_hf(out), tokens)).max()
    print(f"{case}: max abs logit diff {diff:.2e}")
    assert diff < TOL


def test_bfloat16_export(tmp_path: Path):
    _, hsd = _hsd_dir(tmp_path, "qwen2")
    f32, bf16 = export_hf(hsd, tmp_path / "f32"), export_hf(hsd, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(f32 / "model.safetensors", "pt") as a, safe_open(bf16 / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for name in a.keys():
            assert b.get_tensor(name).dtype == torch.bfloat16
            assert torch.equal(a.get_tensor(name).to(torch.bfloat16), b.get_tensor(name))
    with pytest.raises(ValueError, match="float16.*float32, bfloat16"):
        export_hf(hsd, tmp_path / "bad", dtype="float16")


def _random_hsd(directory: Path, **overrides) -> Path:
    return save_model(directory, random_model(tiny_config(vocab=32, layers=2, **overrides)))


@pytest.mark.parametrize("overrides, problem", [
    (dict(sliding_window=8), r"sliding_window=8 \(a llama config.json gives 0\)"),
    (dict(parallel_residual=True), "parallel_residual=True"),
    (dict(qkv_bias=True), "out_bias=False"),  # llama's attention_bias covers q, k, v and o
    (dict(model_type="mistral", qkv_bias=True, out_bias=True), "qkv_bias=True.*out_bias=True"),
    (dict(model_type="qwen2", mlp_bias=True), "mlp_bias=True"),
])
def test_unsupported_features(tmp_path: Path, overrides: dict, problem: str):
    source = _random_hsd(tmp_path / "hsd", **overrides)
    with pytest.raises(UnsupportedArchitectureError, match=problem):
        export_hf(source, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hsd"]


def test_weights_must_match_the_transformers_model(tmp_path: Path):
    """The safety net behind the config check: every weight must have a place in the
    transformers model, and every transformers tensor must be written."""
    with_bias = tiny_config(vocab=32, layers=2, qkv_bias=True, out_bias=True)
    params = random_model(with_bias).params
    without_bias = export_mod.transformers_config(tiny_config(vocab=32, layers=2))
    with pytest.raises(
        UnsupportedArchitectureError, match=r"no place.*self_attn\.[qkv]_proj\.bias.*LlamaForCausalLM"
    ):
        export_mod.hf_state_dict(params, with_bias, without_bias)
    params = {**params, "layers": {k: v for k, v in params["layers"].items() if k != "bo"}}
    with pytest.raises(
        UnsupportedArchitectureError, match=r"expects model\.layers\.0\.self_attn\.o_proj\.bias"
    ):
        export_mod.hf_state_dict(params, dataclasses.replace(with_bias, out_bias=False),
                                 export_mod.transformers_config(with_bias))


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_export_leaves_nothing(tmp_path: Path, monkeypatch, error: type[BaseException]):
    _, hsd = _hsd_dir(tmp_path, "llama-tied-biases")
    real_copy = export_mod.copy_tokenizer_files

    def copy_then_die(source, out):  # runs after the weights and config.json are written
        real_copy(source, out)
        assert (Path(out) / "model.safetensors").is_file()
        raise error("interrupted")

    monkeypatch.setattr(export_mod, "copy_tokenizer_files", copy_then_die)
    with pytest.raises(error):
        export_hf(hsd, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hsd"]


def test_refuses_to_overwrite(tmp_path: Path):
    _, hsd = _hsd_dir(tmp_path, "gpt2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_hf(hsd, out)
    assert (out / "keep.txt").read_text() == "precious"
    export_hf(hsd, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


# Orbax / TensorStore leave asyncio callbacks behind when a read fails; they are harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_missing_or_corrupt_source(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nowhere is not an hsd-jax model directory"):
        export_hf(tmp_path / "nowhere", tmp_path / "out")
    _, hsd = _hsd_dir(tmp_path, "gpt2")
    with pytest.raises(FileNotFoundError, match="hf is not an hsd-jax model directory.*hsd-jax convert"):
        export_hf(tmp_path / "hf", tmp_path / "out")  # a Hugging Face directory, not converted
    (hsd / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{hsd}.*re-convert"):
        export_hf(hsd, tmp_path / "out")
    _, hsd = _hsd_dir(tmp_path / "again", "gpt2")
    shutil.rmtree(hsd / PARAMS_DIR)
    with pytest.raises(ValueError, match=rf"{hsd}.*re-convert"):
        export_hf(hsd, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vocabulary_subset_head(tmp_path: Path):
    """A subset head exports as a full head, zero outside the subset: the in-subset logits are
    identical and greedy decoding agrees while the best in-subset logit is positive."""
    vocab = 48
    model = random_model(tiny_config(vocab=vocab, layers=2, head_vocab_size=20), seed=1)
    ids = model.params["head_ids"]
    out = export_hf(save_model(tmp_path / "hsd", model), tmp_path / "out")

    prompt = [3, 1, 4, 1, 5, 9]
    ours = ar_generate(model, np.asarray([prompt], np.int32), np.asarray([len(prompt)], np.int32),
                       jax.random.PRNGKey(0), max_new_tokens=12)
    ours_tokens = np.asarray(ours.tokens[0]).tolist()
    hf = load_hf_causal_lm(out)
    _, hf_tokens = hf_generate_timed(hf, prompt, 12)
    assert hf_tokens == ours_tokens and set(hf_tokens) <= set(ids.tolist())

    logits = _logits(hf, prompt + ours_tokens)
    outside = np.setdiff1d(np.arange(vocab), ids)
    assert np.all(logits[:, outside] == 0)
    assert np.all(logits[:, ids].max(axis=-1) > 0)  # why greedy agrees here


@pytest.fixture(scope="module")
def exported_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Model, Path, Path]:
    """A tiny hsd-jax target and its 1-layer prefix draft, both exported to transformers."""
    root = tmp_path_factory.mktemp("family")
    target = random_model(tiny_config(vocab=32, layers=4))
    damp = np.asarray([1.0, 0.35, 0.35, 0.35], np.float32)  # so the 1-layer prefix often agrees
    layers = target.params["layers"]
    layers |= {n: layers[n] * damp.reshape(-1, *[1] * (layers[n].ndim - 1)) for n in ("wo", "w_down")}
    draft = layer_prefix(target, 1)
    dirs = [export_hf(save_model(root / f"{name}-hsd", m), root / name)
            for name, m in (("draft", draft), ("target", target))]
    return target, dirs[0], dirs[1]


def test_hf_assisted_greedy_equals_plain_greedy(exported_family):
    target, draft_dir, target_dir = exported_family
    hf_target, hf_draft = load_hf_causal_lm(target_dir), load_hf_causal_lm(draft_dir)
    prompt, n = [3, 1, 4, 1, 5], 24
    seconds, plain = hf_generate_timed(hf_target, prompt, n, repeats=2)
    assert seconds > 0 and len(plain) == n
    _, assisted = hf_generate_timed(hf_target, prompt, n, assistant=hf_draft)
    _, assisted_fixed = hf_generate_timed(hf_target, prompt, n, assistant=hf_draft, num_assistant_tokens=3)
    assert assisted == plain and assisted_fixed == plain
    assert hf_draft.generation_config.num_assistant_tokens != 3  # restored after the call

    ours = ar_generate(target, np.asarray([prompt], np.int32), np.asarray([len(prompt)], np.int32),
                       jax.random.PRNGKey(0), max_new_tokens=n)
    assert np.asarray(ours.tokens[0]).tolist() == plain


def test_hf_sampling_is_seeded_and_full_length(exported_family):
    _, draft_dir, target_dir = exported_family
    hf_target, hf_draft = load_hf_causal_lm(target_dir), load_hf_causal_lm(draft_dir)
    runs = [hf_generate_timed(hf_target, [2, 7], 16, temperature=1.0, seed=s, assistant=a)[1]
            for s, a in ((0, None), (0, None), (1, None), (0, hf_draft))]
    assert all(len(r) == 16 for r in runs)
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_load_hf_causal_lm_refuses_hsd_directory(tmp_path: Path):
    with pytest.raises(ValueError, match="export-hf"):
        load_hf_causal_lm(_random_hsd(tmp_path / "hsd"))


def test_load_hf_reference_is_the_given_model(tmp_path: Path, monkeypatch):
    """The bench's transformers reference for DIR runs DIR's own weights (whatever model DIR
    holds, not a fixed one), exported to a temporary directory that is removed again."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    prompt = [3, 1, 4, 1, 5]
    for seed, vocab in ((0, 32), (1, 40)):
        model = random_model(tiny_config(vocab=vocab, layers=2), seed=seed)
        hf = load_hf_reference(save_model(tmp_path / f"hsd{seed}", model))
        assert hf.config.vocab_size == vocab
        ours = ar_generate(model, np.asarray([prompt], np.int32), np.asarray([len(prompt)], np.int32),
                           jax.random.PRNGKey(0), max_new_tokens=8)
        assert hf_generate_timed(hf, prompt, 8)[1] == np.asarray(ours.tokens[0]).tolist()
    assert not any((tmp_path / "tmp").iterdir())


def test_ar_bench_compiles_once_per_prompt_bucket(tiny_chat_model, tmp_path: Path, monkeypatch):
    """`bench --model` times our AR on each prompt padded to its bucket (prompts of nearby lengths
    share one compiled program, where one program per length made 8 eval prompts take minutes of
    compiling) and still matches transformers token for token."""
    widths = []
    real = methods_mod.ar_generate

    def recording(model, prompt, lengths, *args, **kwargs):
        widths.append(np.asarray(prompt).shape)
        return real(model, prompt, lengths, *args, **kwargs)

    monkeypatch.setattr(methods_mod, "ar_generate", recording)
    prompts = tmp_path / "prompts.jsonl"
    texts = ("Hi", "Hi you", "Hi to you", "Hi to you all")
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    result = run_bench(str(tiny_chat_model), prompts_file=str(prompts), max_new_tokens=4, repeats=1)
    assert result["prompts"] == 4 and result["greedy_identical_to_hf"]
    lengths = {r["prompt_tokens"] for r in result["per_prompt"]}
    assert len(lengths) == 4  # four lengths, at most two buckets of 16
    assert {w[1] for w in widths} == {-(-n // 16) * 16 for n in lengths}
    assert all(r["ours_tokens"] >= 1 for r in result["per_prompt"])
    assert run_bench(str(tiny_chat_model), prompts_file=str(prompts), max_new_tokens=2, repeats=1,
                     num_prompts=1)["prompts"] == 1  # --num-prompts applies here too


def test_cli_pieces(tmp_path: Path, capsys):
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    source = _random_hsd(tmp_path / "hsd")
    args = parser.parse_args(["export-hf", str(source), str(tmp_path / "out"), "--dtype", "bfloat16"])
    assert (args.command, args.dtype, args.overwrite) == ("export-hf", "bfloat16", False)
    assert run_export(args) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["export-hf", str(source), str(tmp_path / "x"), "--dtype", "float16"])
