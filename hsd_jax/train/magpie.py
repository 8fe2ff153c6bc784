"""Self-generated chat data for distillation (Magpie: Xu et al. 2024, arXiv 2406.08464).

The target is fed its chat template up to the start of a user turn and writes the user's
message itself (temperature 1, top-p). Those instructions are cleaned (length, near-duplicates,
n-gram overlap with the evaluation prompts), then the target answers them, greedy or sampled,
and the top-k next-token log-probabilities it computed while answering are kept: no second,
teacher-forced pass is needed.

`make_corpus` writes numbered shards (`shard-00000.npz`, ...), each atomically, in the format
`train.dataset.load_dataset` reads. Shard i's random stream is a function of (seed, i) alone and
the near-duplicate index is rebuilt from the shards on disk, so a stopped run resumes at the
first missing shard and loses nothing already written.
"""

from __future__ import annotations

import io
import re
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hsd_jax.decoding.ar import OutputBuffer, default_cache_size, prefill
from hsd_jax.decoding.sampling import SamplingParams, sample_logits
from hsd_jax.io.checkpoint import encode_prompt, load_model, load_tokenizer
from hsd_jax.io.files import write_bytes
from hsd_jax.io.prompts import pad_prompts
from hsd_jax.models import Model
from hsd_jax.planning.timing import Stopwatch

SHARD = "shard-{:05d}.npz"
INSTRUCTION_SAMPLING = SamplingParams(temperature=1.0, top_p=0.95)
# Answers alternate between greedy shards and sampled (T=1) shards: drafts serve both modes.
ANSWER_TEMPERATURES = (0.0, 1.0)
# An instruction holding this share of an evaluation prompt's word 3-grams quotes it: refused.
EVAL_CONTAINED = 0.8
# Prompt widths round up to this: a batch's widest prompt sets it, so few programs compile.
PROMPT_WIDTH_BUCKET = 64


# ----------------------------------------------------------------------- generation with top-k


@partial(jax.jit, static_argnames=("max_new_tokens", "sampling", "eos_token_id", "top_k", "cache_size"))
def generate_with_top_k(
    model: Model,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    sampling: SamplingParams,
    eos_token_id: int,
    top_k: int,
    cache_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Decode like `ar_generate`, and keep, for every generated token, the model's top-k
    (ids, log-probabilities) of the distribution it was drawn from at temperature 1.

    Returns tokens [B, N], num_tokens [B] (EOS included), ids [B, N, k] int32, logp [B, N, k] f32.
    """
    batch = prompt_tokens.shape[0]

    def top(logits):
        values, ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), top_k)
        return ids.astype(jnp.int32), values

    def emit(i, logits, out, ids_buf, logp_buf):
        token, _ = sample_logits(jax.random.fold_in(key, i), logits, sampling)
        ids, logp = top(logits)
        slot = jnp.where(out.done, max_new_tokens, out.num_tokens)  # out of bounds: dropped
        rows = jnp.arange(batch)
        ids_buf = ids_buf.at[rows, slot].set(ids, mode="drop")
        logp_buf = logp_buf.at[rows, slot].set(logp, mode="drop")
        active = (~out.done).astype(jnp.int32)
        return token, out.commit(token[:, None], active, eos_token_id), ids_buf, logp_buf

    logits, cache = prefill(
        model, prompt_tokens, prompt_lengths.astype(jnp.int32), model.init_cache(batch, cache_size)
    )
    out = OutputBuffer.init(batch, max_new_tokens, eos_token_id)
    ids_buf = jnp.zeros((batch, max_new_tokens, top_k), jnp.int32)
    logp_buf = jnp.zeros((batch, max_new_tokens, top_k), jnp.float32)
    token, out, ids_buf, logp_buf = emit(0, logits, out, ids_buf, logp_buf)

    def more(carry):
        i, _, _, out, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(out.done)

    def body(carry):
        i, token, cache, out, ids_buf, logp_buf = carry
        logits, stepped = model.step(token[:, None], cache)
        cache = stepped.with_lengths(jnp.where(out.done, cache.lengths, stepped.lengths))
        token, out, ids_buf, logp_buf = emit(i, logits[:, -1], out, ids_buf, logp_buf)
        return i + 1, token, cache, out, ids_buf, logp_buf

    _, _, _, out, ids_buf, logp_buf = jax.lax.while_loop(
        more, body, (jnp.int32(1), token, cache, out, ids_buf, logp_buf)
    )
    return out.tokens, out.num_tokens, ids_buf, logp_buf


def _generate(
    model: Model,
    prompts: Sequence[Sequence[int]],
    key: jax.Array,
    *,
    max_new_tokens: int,
    sampling: SamplingParams,
    eos_token_id: int,
    top_k: int,
    batch_size: int,
):
    """`generate_with_top_k` on prompts padded to a fixed batch (one compile per prompt width bucket)."""
    rows = list(prompts) + [list(prompts[0])] * (batch_size - len(prompts))
    tokens, lengths = pad_prompts(rows, pad_id=eos_token_id, bucket=PROMPT_WIDTH_BUCKET)
    out = generate_with_top_k(
        model,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        key,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_token_id=eos_token_id,
        top_k=top_k,
        cache_size=default_cache_size(tokens.shape[1], max_new_tokens),
    )
    return [np.asarray(x)[: len(prompts)] for x in out]


# ----------------------------------------------------------------------------------- cleaning

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)} or ({tuple(w)} if w else set())


class NgramIndex:
    """Texts indexed by word n-grams, to find the indexed texts most like a new one.

    Postings are int32 arrays, counted with numpy: a common n-gram ("how do i") is shared by
    thousands of indexed texts, and counting them one by one in Python grew to ~1 ms a query."""

    def __init__(self, n: int = 3, texts: Iterable[str] = ()) -> None:
        self.n = n
        self.sizes = array("i")  # n-grams per indexed text
        self.postings: dict[tuple[str, ...], array] = {}
        for text in texts:
            self.add(text)

    def add(self, text: str) -> None:
        grams = word_ngrams(text, self.n)
        for g in grams:
            self.postings.setdefault(g, array("i")).append(len(self.sizes))
        self.sizes.append(len(grams))

    def similarity(self, text: str) -> tuple[float, float]:
        """(the largest Jaccard similarity of n-gram sets, the largest share of one indexed text's
        n-grams found in `text`): the second catches an indexed text quoted inside a longer one."""
        grams = word_ngrams(text, self.n)
        hits = [np.frombuffer(self.postings[g], np.int32) for g in grams if g in self.postings]
        if not hits:
            return 0.0, 0.0
        ids, shared = np.unique(np.concatenate(hits), return_counts=True)
        sizes = np.frombuffer(self.sizes, np.int32)[ids]
        jaccard = shared / (len(grams) + sizes - shared)
        return float(jaccard.max()), float((shared / sizes).max())


def clean_instruction(text: str, *, min_words: int = 3, max_words: int = 160) -> str | None:
    """The instruction stripped, or None when it is too short, too long or not mostly text."""
    text = text.strip()
    count = len(words(text))
    if not min_words <= count <= max_words:
        return None
    letters = sum(c.isascii() and (c.isalnum() or c.isspace()) for c in text)
    if letters < 0.8 * len(text):
        return None
    return text


# ------------------------------------------------------------------------------------- corpus


def chat_prefix(tokenizer) -> tuple[list[int], int]:
    """The chat template's tokens up to where a user message's text begins, and the token that ends
    a user message (the Magpie prompt and its stop token)."""
    marker = "MAGPIEUSERMESSAGE"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    if not isinstance(text, str) or text.count(marker) != 1:
        raise ValueError(
            "the tokenizer's chat template does not place a user message once; Magpie data needs a chat model"
        )
    before, after = text.split(marker)
    end = tokenizer.encode(after, add_special_tokens=False)
    if not end:
        raise ValueError("the chat template ends a user message with nothing; Magpie data needs a stop token")
    return tokenizer.encode(before, add_special_tokens=False), end[0]


def shard_paths(out_dir: str | Path) -> list[Path]:
    """The shards written so far, in order; a gap ends the list (shards are written in order)."""
    paths = []
    while (path := Path(out_dir) / SHARD.format(len(paths))).is_file():
        paths.append(path)
    return paths


def _shard_summary(path: Path) -> tuple[list[str], int]:
    with np.load(path) as f:
        return [str(p) for p in f["prompts"]], int(np.sum(f["lengths"] - f["answer_start"]))


def _instructions(model: Model, tokenizer, key: jax.Array, batch_size: int, max_tokens: int) -> Iterator[str]:
    """Endless Magpie instructions: the target's own user messages, complete ones only."""
    prefix, stop = chat_prefix(tokenizer)
    for attempt in range(1 << 30):
        tokens, counts, _, _ = _generate(
            model,
            [prefix] * batch_size,
            jax.random.fold_in(key, attempt),
            max_new_tokens=max_tokens,
            sampling=INSTRUCTION_SAMPLING,
            eos_token_id=stop,
            top_k=1,
            batch_size=batch_size,
        )
        for row, count in zip(tokens, counts):
            if count >= 2 and row[count - 1] == stop:
                yield tokenizer.decode(row[: count - 1].tolist(), skip_special_tokens=True)


def make_corpus(
    target_dir: str | Path,
    out_dir: str | Path,
    *,
    answer_tokens: int,
    eval_prompts: Sequence[str],
    seed_instructions: Sequence[str] = (),
    batch_size: int = 32,
    max_instruction_tokens: int = 64,
    max_answer_tokens: int = 256,
    top_k: int = 32,
    near_duplicate: float = 0.6,
    eval_overlap: float = 0.5,
    seed: int = 0,
    dtype: Any = None,
    max_seconds: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write shards until they hold `answer_tokens` answer tokens, or until the next shard would
    end past `max_seconds` (judged by the last shard's time); resume from the shards present.

    The seed instructions are answered first, then Magpie instructions. An instruction is kept when
    it has 3..160 words of mostly plain text, its word 3-gram Jaccard similarity is below
    `near_duplicate` to every kept instruction and below `eval_overlap` to every evaluation prompt,
    and it holds less than EVAL_CONTAINED of any evaluation prompt's 3-grams. Shard i's
    answers are greedy for even i and sampled at T=1 for odd i. `dtype` loads the target in that
    dtype (bfloat16 generates ~1.3x faster on a CPU with AVX512-BF16). Returns a summary of the run.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise FileExistsError(f"{out_dir} is a link or a file; give a shard directory (new, or one to "
                              "resume); hsd-jax never writes through a link")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = load_model(target_dir, dtype=dtype)
    tokenizer = load_tokenizer(target_dir)
    eos = target.config.eos_token_id
    if eos is None:
        raise ValueError(f"{target_dir} has no eos_token_id; answers need a stop token")
    kept = NgramIndex(3)
    held_out = NgramIndex(3, eval_prompts)
    done, total = shard_paths(out_dir), 0
    for path in done:
        prompts, count = _shard_summary(path)
        for p in prompts:
            kept.add(p)
        total += count
    rejected: Counter[str] = Counter()

    def leaks(text: str) -> bool:
        jaccard, contained = held_out.similarity(text)
        return jaccard >= eval_overlap or contained >= EVAL_CONTAINED

    def accept(text: str | None) -> str | None:
        text = text and clean_instruction(text)
        if text is None:
            rejected["length or characters"] += 1
        elif kept.similarity(text)[0] >= near_duplicate:
            rejected["near-duplicate"] += 1
        elif leaks(text):
            rejected["overlaps an evaluation prompt"] += 1
        else:
            kept.add(text)
            return text
        return None

    bar = tqdm(
        total=answer_tokens,
        initial=min(total, answer_tokens),
        desc="answer tokens",
        unit="tok",
        disable=not progress,
        smoothing=0.05,
    )
    began, new_tokens, resumed_at = time.perf_counter(), 0, len(done)
    seconds = Stopwatch()
    seeds = iter(seed_instructions)
    index = len(done)
    # One shard is compressed and written on a second thread while the next one is generated
    # (zlib lets go of the GIL); shard i + 1 is handed over only once shard i is on disk, so the
    # shards on disk never have a gap, and leaving the `with` waits for the last one.
    with ThreadPoolExecutor(max_workers=1) as writer:
        written: Future | None = None
        shard_s = 0.0
        while total < answer_tokens:
            if max_seconds is not None and time.perf_counter() - began + shard_s > max_seconds:
                break
            shard_began = time.perf_counter()
            key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
            magpie = _instructions(
                target, tokenizer, jax.random.fold_in(key, 1), batch_size, max_instruction_tokens
            )
            batch: list[tuple[str, str]] = []
            with seconds.add("cleaning"):
                for text in seeds:
                    if (text := accept(text)) is not None:
                        batch.append((text, "seed"))
                        if len(batch) == batch_size:
                            break
            while len(batch) < batch_size:
                with seconds.add("instructions"):
                    text = next(magpie)
                with seconds.add("cleaning"):
                    if (text := accept(text)) is not None:
                        batch.append((text, "magpie"))
            temperature = ANSWER_TEMPERATURES[index % len(ANSWER_TEMPERATURES)]
            encoded = [encode_prompt(tokenizer, text) for text, _ in batch]
            with seconds.add("answers"):
                tokens, counts, ids, logp = _generate(
                    target,
                    encoded,
                    jax.random.fold_in(key, 2),
                    max_new_tokens=max_answer_tokens,
                    sampling=SamplingParams(temperature),
                    eos_token_id=eos,
                    top_k=top_k,
                    batch_size=batch_size,
                )
            count = int(counts.sum())
            if written is not None:
                with seconds.add("waiting_for_writer"):
                    written.result()
            written = writer.submit(_write_shard, out_dir / SHARD.format(index), encoded, tokens, counts, ids,
                                    logp, batch, temperature)
            total, new_tokens, index = total + count, new_tokens + count, index + 1
            shard_s = time.perf_counter() - shard_began
            bar.update(min(count, max(0, answer_tokens - bar.n)))
            bar.set_postfix(shards=index, tok_s=f"{new_tokens / (time.perf_counter() - began):.0f}")
        if written is not None:
            written.result()
    bar.close()
    return {
        "shards": index,
        "resumed_at_shard": resumed_at,
        "answer_tokens": total,
        "new_answer_tokens": new_tokens,
        "wall_s": time.perf_counter() - began,
        "stopped_by": "answer tokens" if total >= answer_tokens else "time",
        "seconds": seconds.totals(),  # of this run's wall time; generation includes its compiles
        "rejected_this_run": dict(rejected),
        "batch_size": batch_size,
        "top_k": top_k,
        "max_answer_tokens": max_answer_tokens,
        "dtype": str(target.dtype),
        "answer_temperatures": list(ANSWER_TEMPERATURES),
    }


def _write_shard(
    path: Path,
    prompts: list[list[int]],
    tokens: np.ndarray,
    counts: np.ndarray,
    ids: np.ndarray,
    logp: np.ndarray,
    batch: list[tuple[str, str]],
    temperature: float,
) -> None:
    """Rows of prompt + answer; teacher arrays at position t hold the distribution of token t + 1."""
    rows = [p + tokens[j, : counts[j]].tolist() for j, p in enumerate(prompts)]
    seq, lengths = pad_prompts(rows, bucket=1)
    width, k = seq.shape[1], ids.shape[-1]
    teacher_ids = np.zeros((len(rows), width, k), np.int32)
    teacher_logp = np.zeros((len(rows), width, k), np.float16)
    for j, p in enumerate(prompts):
        n = int(counts[j])
        teacher_ids[j, len(p) - 1 : len(p) - 1 + n] = ids[j, :n]
        teacher_logp[j, len(p) - 1 : len(p) - 1 + n] = logp[j, :n]
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        tokens=seq,
        lengths=lengths,
        answer_start=np.array([len(p) for p in prompts], np.int32),
        teacher_ids=teacher_ids,
        teacher_logp=teacher_logp,
        prompts=np.array([text for text, _ in batch]),
        origin=np.array([origin for _, origin in batch]),
        temperature=np.float32(temperature),
    )
    write_bytes(path, buffer.getvalue())
