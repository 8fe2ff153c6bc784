"""One prepared accelerator check: run it as is the first time hsd-jax meets a GPU or TPU.

    python scripts/device_check.py --out $OUT          # < 8 minutes on one H200
    python scripts/device_check.py --smoke --out DIR   # the same end to end on a CPU, tiny shapes

Needs only Python 3.12 with jax/jaxlib (CUDA or TPU), flax, optax, orbax-checkpoint, chex,
transformers, torch, tqdm and matplotlib, plus this repository (imported from the repo root via
sys.path; nothing is installed; a missing `gguf` is stubbed, as nothing here reads GGUF files).
Writes DIR/device_check.json (after every section, so a killed run still leaves what it measured)
and DIR/device_check.log. DIR: --out, else $OUT, else ./device_check/. Sections, in order, each
guarded (an error is recorded and the next section runs) and skipped once the time budget is spent:

  devices          backend, versions, every device seen
  identity         greedy AR against HSD on tiny random models (several chains, EOS, batch 3),
                   and the stream against the one-shot program (greedy and sampled); at the
                   default matmul precision and, if anything differs, again at "highest"
  pytest           the exactness tests that run in about a minute (--collect-only with --smoke),
                   if pytest is installed
  c_k              c(k), ms of one k-token forward, k = 1..32, batch 1 and 8, random bf16 weights, on
                   a SmolLM2-135M-shaped and a ~1B Llama-shaped model
  overhead         lax.while_loop per-iteration cost; the HSD round's control work (round time
                   minus its forwards, scripts/round_overhead.py); both against one target step
  throughput       tokens/s of AR and of one hierarchy of random models (cost side only: random
                   drafts are rarely accepted), one-shot and streamed (time to first token)
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the pytest child needs device memory too
for path in (str(ROOT), str(SCRIPTS)):
    if path not in sys.path:
        sys.path.insert(0, path)


def _stub_gguf() -> str | None:
    """hsd_jax's GGUF reader imports `gguf`, which an accelerator image may lack; nothing here reads
    GGUF, so stand in a module that fails only if used. Returns the stub's directory (for pytest)."""
    if importlib.util.find_spec("gguf") is not None:
        return None
    stub = Path(os.environ.get("TMPDIR", "/tmp")) / f"hsd_device_check_stub_{os.getpid()}"
    (stub / "gguf").mkdir(parents=True, exist_ok=True)
    fail = "    raise ImportError('gguf is not installed')\n"
    (stub / "gguf" / "__init__.py").write_text(
        "class GGUFReader:\n    def __init__(self, *a, **k):\n    "
        + fail
        + "class GGUFValueType:\n    pass\n"
    )
    (stub / "gguf" / "quants.py").write_text("def dequantize(*a, **k):\n" + fail)
    sys.path.insert(0, str(stub))
    return str(stub)


GGUF_STUB = _stub_gguf()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hsd_jax.decoding.ar import ar_generate  # noqa: E402
from hsd_jax.decoding.hsd import Hierarchy, hsd_generate  # noqa: E402
from hsd_jax.decoding.ngram import NGramDrafter  # noqa: E402
from hsd_jax.decoding.stream import Streamer, stream  # noqa: E402
from hsd_jax.models import Model, ModelConfig, init_params  # noqa: E402
from hsd_jax.planning.timing import median_seconds, time_stream  # noqa: E402

PYTEST_SUBSET = [
    "tests/test_greedy_verify.py",
    "tests/test_schedule.py",
    "tests/test_stream.py",
    "tests/test_hsd.py::test_greedy_hsd_equals_target_ar",
    "tests/test_hsd.py::test_greedy_with_eos_rows_finish_independently",
    "tests/test_exactness.py::test_toy_expected_accepted_drafts",
    "tests/test_exactness.py::test_toy_two_token_law",
    "tests/test_exactness.py::test_one_verification_emits_the_target_law",
    "tests/test_exactness.py::test_greedy_accepts_the_argmax_matching_prefix",
]


class Check:
    """The JSON being built, the log, and the time budget."""

    def __init__(self, out: Path, smoke: bool, budget_s: float):
        self.out, self.smoke, self.budget_s = out, smoke, budget_s
        self.start = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        self.json_path, self.log_path = out / "device_check.json", out / "device_check.log"
        self.log_file = self.log_path.open("w")
        self.result: dict = {
            "version": 1,
            "smoke": smoke,
            "budget_s": budget_s,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sections": {},
            "errors": {},
            "skipped": {},
        }

    def log(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:7.1f}s] {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def save(self) -> None:
        self.result["elapsed_s"] = time.perf_counter() - self.start
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=2, default=str))
        tmp.replace(self.json_path)

    def section(self, name: str, fn, need_s: float) -> None:
        if self.left() < need_s:
            self.result["skipped"][name] = f"time budget: {self.left():.0f}s left, needs ~{need_s:.0f}s"
            self.log(f"{name}: skipped ({self.result['skipped'][name]})")
            self.save()
            return
        self.log(f"{name}: start")
        began = time.perf_counter()
        try:
            self.result["sections"][name] = fn(self)
        except Exception:  # noqa: BLE001 - a failed section must not stop the others
            self.result["errors"][name] = traceback.format_exc()
            self.log(f"{name}: ERROR\n{self.result['errors'][name]}")
        self.result.setdefault("section_seconds", {})[name] = time.perf_counter() - began
        self.log(f"{name}: done in {time.perf_counter() - began:.1f}s")
        self.save()


# ---------------------------------------------------------------------------------- models


def llama(vocab, hidden, layers, heads, kv_heads, intermediate, head_dim=None, tied=True) -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim or hidden // heads,
        max_position_embeddings=8192,
        tie_word_embeddings=tied,
        rope_theta=100000.0,
    )


def shapes(smoke: bool) -> dict[str, ModelConfig]:
    if smoke:
        return {
            "smollm2-135m-shaped(smoke)": llama(512, 64, 2, 4, 2, 128),
            "llama-1b-shaped(smoke)": llama(1024, 128, 2, 4, 2, 256),
        }
    return {
        "smollm2-135m-shaped": llama(49152, 576, 30, 9, 3, 1536),
        "llama-1b-shaped": llama(128256, 2048, 16, 32, 8, 8192, head_dim=64),
    }


def random_model(config: ModelConfig, dtype=jnp.bfloat16, seed: int = 0, scale: float = 0.02) -> Model:
    return Model(init_params(config, jax.random.PRNGKey(seed), dtype=dtype, scale=scale), config)


def tiny_family(vocab: int = 32, layers: int = 4) -> list[Model]:
    """As tests/families.py: drafts are damped layer-prefixes of a random target."""
    config = llama(vocab, 32, layers, 4, 2, 64)
    params = init_params(config, jax.random.PRNGKey(0), scale=0.5)
    damp = jnp.asarray([1.0] + [0.35] * (layers - 1))
    for name in ("wo", "w_down"):
        w = params["layers"][name]
        params["layers"][name] = w * damp.reshape(-1, *([1] * (w.ndim - 1)))
    target = Model(params, config)
    return [prefix(target, n) for n in range(1, layers)] + [target]


def prefix(model: Model, layers: int) -> Model:
    params = dict(model.params)
    params["layers"] = jax.tree.map(lambda x: x[:layers], model.params["layers"])
    return Model(params, ModelConfig(**{**model.config.__dict__, "num_layers": layers}))


# -------------------------------------------------------------------------------- sections


def devices(check: Check) -> dict:
    import jaxlib

    out = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "devices": [
            {"id": d.id, "platform": d.platform, "kind": getattr(d, "device_kind", "?")}
            for d in jax.devices()
        ],
        "gguf_stubbed": GGUF_STUB is not None,
    }
    try:
        stats = jax.devices()[0].memory_stats() or {}
        out["memory_bytes_limit"] = stats.get("bytes_limit")
    except Exception:  # noqa: BLE001 - not every backend has memory stats
        pass
    check.log(f"devices: {out['backend']} x{out['device_count']}: {[d['kind'] for d in out['devices']]}")
    return out


def _identity_cases(models, smoke: bool = False):
    chains = [
        ((0, -1), (4,), "tokenwise"),
        (("ng", -1), (4,), "block"),
        ((0, 2, -1), (3, 2), "block"),
        (("ng", 1, 2, -1), (2, 2, 2), ("block", "tokenwise", "block")),
    ]
    for spec, buffers, verifier in chains[2:3] if smoke else chains:
        levels = [NGramDrafter(2, 32) if s == "ng" else models[s] for s in spec]
        yield Hierarchy(levels, buffers, verifier)


def identity(check: Check) -> dict:
    models = tiny_family()
    prompts = np.array(
        [[1, 2, 3, 4, 1, 2, 3, 9], [5, 6, 5, 6, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0, 0, 0]], np.int32
    )
    lengths = np.array([8, 4, 1], np.int32)
    new, key = 24, jax.random.PRNGKey(0)

    def run(precision: str) -> dict:
        with jax.default_matmul_precision(precision):
            ar = ar_generate(models[-1], prompts, lengths, key, max_new_tokens=new)
            eos = int(ar.tokens[0, 5])
            ar_eos = ar_generate(models[-1], prompts, lengths, key, max_new_tokens=new, eos_token_id=eos)
            cases = []
            for h in _identity_cases(models, check.smoke):
                for eos_id, ref in ((eos, ar_eos),) if check.smoke else ((None, ar), (eos, ar_eos)):
                    out = hsd_generate(h, prompts, lengths, key, max_new_tokens=new, eos_token_id=eos_id)
                    same = bool(
                        np.array_equal(out.tokens, ref.tokens)
                        and np.array_equal(out.num_tokens, ref.num_tokens)
                    )
                    cases.append(
                        {
                            "hierarchy": repr(h),
                            "eos": eos_id,
                            "identical_to_ar": same,
                            "tokens_per_target_call": np.asarray(out.stats.tokens_per_target_call).tolist(),
                        }
                    )
            streams = []
            h = next(iter(_identity_cases(models, check.smoke)))
            pairs = [(t, s) for t in (0.0, 1.0) for s in (models[-1], h)]
            for temperature, source in pairs[1:3] if check.smoke else pairs:
                kw = dict(max_new_tokens=new, temperature=temperature, eos_token_id=eos)
                one = (ar_generate if source is models[-1] else hsd_generate)(
                    source, prompts, lengths, key, **kw
                )
                rows = [[] for _ in prompts]
                for chunk in stream(source, prompts, lengths, key, rounds_per_chunk=3, **kw):
                    for b, c in enumerate(chunk):
                        rows[b] += c.tolist()
                same = all(
                    rows[b] == np.asarray(one.tokens[b, : int(one.num_tokens[b])]).tolist()
                    for b in range(len(prompts))
                )
                streams.append(
                    {
                        "source": repr(source) if isinstance(source, Hierarchy) else "AR",
                        "temperature": temperature,
                        "stream_identical_to_one_shot": same,
                    }
                )
        ok = all(c["identical_to_ar"] for c in cases) and all(
            s["stream_identical_to_one_shot"] for s in streams
        )
        return {
            "precision": precision,
            "all_identical": ok,
            "hsd_vs_ar": cases,
            "stream_vs_one_shot": streams,
        }

    runs = [run("default")]
    if not runs[0]["all_identical"]:
        runs.append(run("highest"))
    check.log(
        "identity: "
        + "; ".join(f"{r['precision']} precision all identical: {r['all_identical']}" for r in runs)
    )
    return {"all_identical": runs[0]["all_identical"], "runs": runs}


def run_pytest(check: Check) -> dict:
    if importlib.util.find_spec("pytest") is None:
        return {
            "ran": False,
            "reason": "pytest is not installed (the identity section covers the checks inline)",
        }
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PYTEST_SUBSET]
    missing = [m for m in ("scipy", "hypothesis") if importlib.util.find_spec(m) is None]
    if "scipy" in missing:
        args = [a for a in args if "test_exactness" not in a]
    if check.smoke:
        args.append("--collect-only")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), GGUF_STUB, env.get("PYTHONPATH")) if p)
    timeout = max(30.0, min(150.0, check.left() - 60))
    began = time.perf_counter()
    try:
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, output = None, f"timed out after {timeout:.0f}s\n" + (e.stdout or b"").decode(errors="replace")
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    check.log(f"pytest: rc={code}: {summary}")
    return {
        "ran": True,
        "collect_only": check.smoke,
        "args": args[3:],
        "missing_optional": missing,
        "returncode": code,
        "passed": code == 0,
        "summary": summary,
        "seconds": time.perf_counter() - began,
        "output_tail": output[-4000:],
    }


def _step_fn():
    return jax.jit(lambda m, t, c: m.step(t, c)[0])


def c_of_k(check: Check) -> dict:
    ks = [1, 2, 4] if check.smoke else list(range(1, 33))
    batches = [1, 2] if check.smoke else [1, 8]
    repeats = 3 if check.smoke else 5
    step = _step_fn()
    out = {}
    for name, config in shapes(check.smoke).items():
        model = random_model(config)
        entry = {
            "config": {k: v for k, v in config.__dict__.items() if isinstance(v, (int, float, str))},
            "num_params": model.num_params,
            "dtype": "bfloat16",
            "context": 256,
            "ms": {},
        }
        for batch in batches:
            cache = model.init_cache(batch, 512)
            cache = cache.with_lengths(jnp.full((batch,), 256, jnp.int32))
            row = {}
            for k in ks:
                if check.left() < 20:
                    entry["truncated_at"] = {"batch": batch, "k": k}
                    break
                row[k] = 1e3 * median_seconds(
                    step, model, jnp.ones((batch, k), jnp.int32), cache, repeats=repeats
                )
            entry["ms"][f"batch_{batch}"] = row
            check.log(
                f"c(k) {name} batch {batch}: " + ", ".join(f"{k}:{v:.2f}" for k, v in row.items()) + " ms"
            )
        out[name] = entry
        del model
    return out


def overhead(check: Check) -> dict:
    import round_overhead

    n = 64 if check.smoke else 4096

    def loop(iterations):
        return jax.lax.while_loop(
            lambda c: c[0] < iterations,
            lambda c: (c[0] + 1, c[1] * 1.0001 + 1.0),
            (jnp.int32(0), jnp.ones((8, 128), jnp.float32)),
        )[1]

    loop_jit = jax.jit(loop)
    long_s = median_seconds(loop_jit, jnp.int32(n), repeats=5)
    short_s = median_seconds(loop_jit, jnp.int32(0), repeats=5)
    per_iter_us = 1e6 * (long_s - short_s) / n
    config = shapes(check.smoke)[next(iter(shapes(check.smoke)))]
    model = random_model(config)
    cache = model.init_cache(1, 512).with_lengths(jnp.full((1,), 256, jnp.int32))
    step_ms = 1e3 * median_seconds(_step_fn(), model, jnp.ones((1, 1), jnp.int32), cache, repeats=5)
    vocab = 512 if check.smoke else 49152
    rounds = []
    configs = [((4,), 1.0)] if check.smoke else [(b, t) for b in ((4,), (2, 4)) for t in (0.0, 1.0)]
    for buffers, temperature in configs:
        row = round_overhead.measure(vocab, buffers, temperature, repeats=3)
        row["overhead_over_target_step"] = row["overhead_ms"] / step_ms
        rounds.append(row)
        check.log(
            f"round overhead buffers {buffers} T={temperature}: {row['overhead_ms']:.3f} ms "
            f"({row['overhead_over_target_step']:.2f} target steps)"
        )
    check.log(f"while_loop: {per_iter_us:.2f} us/iteration; target step {step_ms:.3f} ms")
    return {
        "while_loop_iteration_us": per_iter_us,
        "while_loop_iterations": n,
        "target_step_ms": step_ms,
        "target": next(iter(shapes(check.smoke))),
        "while_loop_iteration_over_target_step": per_iter_us / (1e3 * step_ms),
        "hsd_rounds": rounds,
    }


def throughput(check: Check) -> dict:
    name, config = next(iter(shapes(check.smoke).items()))
    target = random_model(config)
    draft = prefix(target, 2 if not check.smoke else 1)
    new = 16 if check.smoke else 128
    out = {
        "target": name,
        "draft": "the target's first layers",
        "max_new_tokens": new,
        "rounds_per_chunk": 4,
        "note": "random weights: acceptance is meaningless, this is the cost side only",
    }
    key = jax.random.PRNGKey(0)
    for batch in [2] if check.smoke else [1, 8]:
        prompt = (np.arange(batch * 32, dtype=np.int32).reshape(batch, 32) * 7 + 3) % config.vocab_size
        lengths = np.full((batch,), 32, np.int32)
        row = {}
        for label, h in (("ar", Hierarchy([target])), ("hsd", Hierarchy([draft, target], [4]))):
            fn = functools.partial(hsd_generate, h, prompt, lengths, key, max_new_tokens=new)
            seconds = median_seconds(fn, repeats=3)
            result = fn()
            streamer = functools.partial(
                Streamer, h, prompt, lengths, key, max_new_tokens=new, rounds_per_chunk=4
            )
            streamer().warm_up()
            timings = [time_stream(streamer()) for _ in range(3)]
            tokens = int(np.asarray(result.num_tokens).sum())
            row[label] = {
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "tokens_per_target_call": float(np.mean(result.stats.tokens_per_target_call)),
                "stream_ttft_s": statistics.median(t.ttft_s for t in timings),
                "stream_tokens_per_s": statistics.median(t.tokens_per_s for t in timings),
                "stream_decode_tokens_per_s": statistics.median(
                    t.decode_tokens_per_s or 0.0 for t in timings
                ),
            }
            check.log(
                f"throughput batch {batch} {label}: {tokens / seconds:.1f} tokens/s one-shot, "
                f"streamed {row[label]['stream_tokens_per_s']:.1f} "
                f"(ttft {1e3 * row[label]['stream_ttft_s']:.1f} ms)"
            )
        out[f"batch_{batch}"] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "device_check", help="output directory")
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes and few k: end to end on a CPU in CI time"
    )
    p.add_argument("--budget-s", type=float, default=None, help="time budget (default 450, smoke 240)")
    p.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    args = p.parse_args(argv)
    check = Check(Path(args.out), args.smoke, args.budget_s or (240.0 if args.smoke else 450.0))
    sections = [
        ("devices", devices, 0),
        ("identity", identity, 20),
        ("pytest", run_pytest, 40),
        ("c_k", c_of_k, 40),
        ("overhead", overhead, 30),
        ("throughput", throughput, 30),
    ]
    only = set(filter(None, args.only.split(",")))
    for name, fn, need in sections:
        if not only or name in only or name == "devices":
            check.section(name, fn, need)
    identity_ran = "identity" in check.result["sections"]
    check.result["ok"] = not check.result["errors"] and (
        not identity_ran or bool(check.result["sections"]["identity"]["all_identical"])
    )
    check.save()
    check.log(f"wrote {check.json_path} and {check.log_path}; ok={check.result['ok']}")
    return 0 if check.result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
