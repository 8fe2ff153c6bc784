"""transformers (torch, CPU) baselines for the benchmarks: plain and assisted `generate`.

Models are Hugging Face directories: originals, or hsd-jax models written out with
`hsd-jax export-hf` (`export.export_hf`), so that transformers runs exactly our weights.

Every run generates exactly `max_new_tokens` tokens: EOS is disabled (`eos_token_id=None`, and
`min_new_tokens` as a second guard), so timings of different methods
cover the same work. Sampling parameters are passed explicitly (temperature only; top-k, top-p
and repetition penalty off), so a `generation_config.json` shipped with the model cannot change
the method being measured.

Assisted generation (`assistant=`) is transformers' speculative decoding with a draft model
sharing the target's vocabulary. Greedy, it returns the target's greedy continuation: each
round keeps the draft's tokens up to the first one that differs from the target's argmax and
then the target's own token. In floating point the target scores several tokens in one
forward pass, whose logits can differ from one-token steps in the last bits, so on a near-tie
the two may part ways. `tests/test_export.py` checks token equality on a tiny model; compare
the tokens (as `bench` does for plain greedy) before trusting a timing.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hsd_jax.decoding.sampling import MIN_TEMPERATURE
from hsd_jax.io.export import export_hf
from hsd_jax.models.config import CONFIG_FILE
from hsd_jax.planning.timing import timed_runs


def load_hf_causal_lm(model_dir: str | Path):
    """A transformers causal LM from a Hugging Face directory, float32, in eval mode (torch's
    default thread count is left as is)."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if (model_dir / CONFIG_FILE).is_file() and not any(model_dir.glob("*.safetensors")):
        raise ValueError(f"{model_dir} is an hsd-jax model directory; write it as a Hugging Face model "
                         f"first: `hsd-jax export-hf {model_dir} OUT`")
    try:
        # local files only, and never code from the directory (an `auto_map` in its config)
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load {model_dir} with transformers: {e}") from e
    return model.eval()


def load_hf_reference(model_dir: str | Path):
    """transformers' model running exactly the weights of the hsd-jax model in `model_dir`: the
    directory exported with `export_hf` into a temporary directory, loaded, and the temporary
    directory removed (the loaded model holds its weights in memory)."""
    with tempfile.TemporaryDirectory(prefix="hsd-jax-hf-") as tmp:
        return load_hf_causal_lm(export_hf(model_dir, Path(tmp) / "model"))


def _pad_token_id(model) -> int:
    """Only a placeholder for `generate` (batch 1, nothing is padded)."""
    for value in (model.generation_config.pad_token_id, model.config.pad_token_id, model.config.eos_token_id):
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def generate_kwargs(model, max_new_tokens: int, temperature: float = 0.0) -> dict[str, Any]:
    """`generate` arguments for exactly `max_new_tokens` tokens, greedy or pure temperature sampling."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature < MIN_TEMPERATURE:  # greedy, as our sampling treats it
        temperature = 0.0
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                  eos_token_id=None, pad_token_id=_pad_token_id(model),
                                  do_sample=temperature > 0, repetition_penalty=1.0)
    if temperature > 0:
        kwargs |= dict(temperature=temperature, top_k=0, top_p=1.0)
    return kwargs


@contextlib.contextmanager
def _fixed_draft_length(assistant, num_assistant_tokens: int | None) -> Iterator[None]:
    """Make the assistant propose exactly `num_assistant_tokens` per round (transformers'
    default is 20, with an early stop below 0.4 draft confidence) for the duration."""
    if assistant is None or num_assistant_tokens is None:
        yield
        return
    saved = assistant.generation_config
    fixed = copy.deepcopy(saved)
    fixed.num_assistant_tokens = num_assistant_tokens
    fixed.num_assistant_tokens_schedule = "constant"
    fixed.assistant_confidence_threshold = 0.0
    assistant.generation_config = fixed
    try:
        yield
    finally:
        assistant.generation_config = saved


def hf_generate_timed(model, prompt_ids: list[int], max_new_tokens: int, *, assistant=None,
                      temperature: float = 0.0, repeats: int = 1, seed: int = 0,
                      num_assistant_tokens: int | None = None, warmup: int = 1) -> tuple[float, list[int]]:
    """(median seconds of `repeats` timed `model.generate` calls, the new token ids), by the one
    timing rule (`planning.timing.timed_runs`: `warmup` untimed calls first).

    Batch 1 with an all-ones attention mask. Greedy when
    `temperature` is 0, else plain temperature sampling seeded with `seed` before every call
    (so every repeat draws the same tokens). `assistant` turns on transformers' assisted
    generation; `num_assistant_tokens` fixes its draft length (default: transformers' own
    heuristics)."""
    import torch

    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    kwargs = generate_kwargs(model, max_new_tokens, temperature)
    kwargs |= dict(attention_mask=torch.ones_like(input_ids))
    if assistant is not None:
        kwargs["assistant_model"] = assistant

    def run():
        torch.manual_seed(seed)
        return model.generate(input_ids, **kwargs)

    with torch.inference_mode(), _fixed_draft_length(assistant, num_assistant_tokens):
        times, out = timed_runs(run, repeats=repeats, warmup=warmup)
    return statistics.median(times), out[0, input_ids.shape[1]:].tolist()
