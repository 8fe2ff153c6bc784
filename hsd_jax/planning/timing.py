"""The one timing rule for every measurement: compile and warm up first, then the median of repeats."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax


def timed_runs(
    fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1
) -> tuple[list[float], Any]:
    """Seconds of each of `repeats` calls of `fn(*args)` after `warmup` untimed calls (which
    compile), each waited for with `block_until_ready`; and the last call's result."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times, out


def median_seconds(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of one call of `fn(*args)`, compile excluded."""
    return float(statistics.median(timed_runs(fn, *args, repeats=repeats, warmup=warmup)[0]))


def interleaved_median_seconds(calls: Sequence[tuple[Callable[..., Any], tuple]], repeats: int = 5,
                               warmup: int = 1, groups: Sequence[int] | None = None) -> list[float]:
    """Median seconds of each `fn(*args)` in `calls`, compile excluded, timed round-robin (each round
    calls every one once), so that a slow spell of the machine falls on all of them alike instead
    of on whichever was being timed (on 2 shared cores such spells last seconds).

    `groups` (default: each call alone, the same order every round): the sizes of consecutive runs
    of `calls` that share one model's weights. Round r starts each run at its (r mod size)-th call
    and wraps, so that no call is always the first of its run: that call finds the model's weights
    pushed out of cache by the other models' calls, which in decoding befalls one call a round (a
    draft's first), not every single-token step."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    groups = [1] * len(calls) if groups is None else list(groups)
    if sum(groups) != len(calls) or min(groups, default=1) < 1:
        raise ValueError(f"groups {groups} must be positive sizes that add up to the {len(calls)} calls")
    for fn, args in calls:
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times: list[list[float]] = [[] for _ in calls]
    starts = [sum(groups[:g]) for g in range(len(groups))]
    for r in range(repeats):
        for start, size in zip(starts, groups):
            for j in range(size):
                i = start + (r + j) % size
                fn, args = calls[i]
                times[i].append(time_once(fn, *args)[0])
    return [float(statistics.median(t)) for t in times]


def time_once(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Seconds of one call (already compiled by the caller) and its result."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, out


class Stopwatch:
    """Wall seconds summed per named phase of a long run (where the time went, not a benchmark)."""

    def __init__(self) -> None:
        self._seconds: defaultdict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def add(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[phase] += time.perf_counter() - start

    def totals(self) -> dict[str, float]:
        return {phase: round(s, 3) for phase, s in self._seconds.items()}


@dataclasses.dataclass
class StreamTiming:
    """One streamed generation, timed: time to first token (prefill and the first committed chunk)
    and the decode rate after it, kept apart so that neither hides the other."""

    ttft_s: float  # from the call to the first chunk (compile excluded when the stream was warmed up)
    seconds: float  # from the call to the last chunk
    tokens: int  # committed tokens, all rows
    first_chunk_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first chunk per second after it (None when the first chunk held them all)."""
        decode_s = self.seconds - self.ttft_s
        rest = self.tokens - self.first_chunk_tokens
        return rest / decode_s if rest > 0 and decode_s > 0 else None

    def as_dict(self) -> dict[str, float | None]:
        return {"ttft_s": self.ttft_s, "seconds": self.seconds, "tokens": self.tokens,
                "tokens_per_s": self.tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s}


def time_stream(chunks: Iterable[Sequence[Any]],
                on_chunk: Callable[[Sequence[Any]], None] | None = None) -> StreamTiming:
    """Time one pass over a stream of chunks (each a sequence of per-row token arrays, as
    `decoding.stream` yields them), calling `on_chunk(chunk)` as each arrives."""
    start = time.perf_counter()
    first_s, first_tokens, tokens = None, 0, 0
    for chunk in chunks:
        n = sum(len(row) for row in chunk)
        if first_s is None:
            first_s, first_tokens = time.perf_counter() - start, n
        tokens += n
        if on_chunk is not None:
            on_chunk(chunk)
    seconds = time.perf_counter() - start
    return StreamTiming(ttft_s=seconds if first_s is None else first_s, seconds=seconds, tokens=tokens,
                        first_chunk_tokens=first_tokens)
