"""The one timing rule for every measurement: compile and warm up first, then the median of repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
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


def time_once(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Seconds of one call (already compiled by the caller) and its result."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, out
