"""One round's schedule: what each level of a hierarchy feeds, scores and holds.

The decoder (`decoding.hsd`) runs it and the latency model (`planning.latency`) prices it, both
from this module, so the two cannot drift apart. Levels are 0 (M_0, the drafter) .. K (target).

* **Catch-up window.** Before its next query a model may lack KV for its own last emitted token
  plus one correction/bonus token from each level above it: `K - level + 1` tokens.
* **Capacity.** Level i < K fills a buffer of at least T_i tokens; one more batch from below can
  overshoot by up to cap_{i-1}, so its buffer holds cap_i = T_i + cap_{i-1} (cap_0 = T_0).
* **Verify width.** Level i >= 1 scores the fixed-width batch of level i-1 (cap_{i-1} drafts and
  the position after them) in one forward pass of `catch_up(i) + cap_{i-1}` tokens.
* **Drafting.** M_0 proposes T_0 tokens: one forward of its catch-up window, then T_0 - 1
  single-token forwards.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence


def catch_up(depth: int, level: int) -> int:
    """Tokens M_level (of a K = `depth` hierarchy) may lack KV for before its next query."""
    return depth - level + 1


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The per-level widths of a hierarchy with buffer targets T_0..T_{K-1}."""

    buffers: tuple[int, ...]

    def __post_init__(self):
        for i, t in enumerate(self.buffers):
            if isinstance(t, bool) or not isinstance(t, int) or t < 1:
                raise ValueError(f"buffer T_{i} must be an integer >= 1, got {t!r}")

    @classmethod
    def of(cls, buffers: Sequence[int]) -> Schedule:
        return cls(tuple(int(t) for t in buffers))

    @property
    def depth(self) -> int:
        """K: the number of levels above M_0."""
        return len(self.buffers)

    @property
    def capacities(self) -> tuple[int, ...]:
        """cap_i = T_i + cap_{i-1}: the buffer size of each level < K."""
        return tuple(itertools.accumulate(self.buffers))

    def catch_up(self, level: int) -> int:
        return catch_up(self.depth, level)

    def scored(self, level: int) -> int:
        """Positions level >= 1 scores per verify pass: the cap_{level-1} drafts and the next one."""
        return self.capacities[level - 1] + 1

    def verify_width(self, level: int) -> int:
        """Tokens in one verify forward of level >= 1 (fixed, whatever the batch holds)."""
        return self.catch_up(level) + self.capacities[level - 1]

    def draft_widths(self) -> tuple[int, ...]:
        """Widths of M_0's forwards while it drafts one batch of T_0 tokens."""
        return (self.catch_up(0),) + (1,) * (self.buffers[0] - 1)

    def committed_width(self) -> int:
        """Most tokens one target round can commit: the top buffer's capacity and a bonus."""
        return self.capacities[-1] + 1 if self.buffers else 1
