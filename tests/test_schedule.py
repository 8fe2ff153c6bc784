"""The round schedule (`decoding.schedule`) is what the decoder runs: every forward pass of every
level has the width the schedule gives, and the pass counts match its prediction.

A recording drafter (a third-party implementation of the `Drafter` interface) logs each call.
With copies of the target as drafts every draft is accepted, so the number of passes per round
follows from the schedule alone.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from families import family

from hsd_jax.decoding.ar import ar_generate
from hsd_jax.decoding.drafter import Drafter
from hsd_jax.decoding.hsd import Hierarchy, hsd_generate
from hsd_jax.decoding.schedule import Schedule
from hsd_jax.models import Model

VOCAB = 32
PROMPT = np.array([[1, 2, 3, 4, 5, 6]], np.int32)
LENGTH = np.array([6], np.int32)


class Recording:
    """Wraps a model; records (window, scored positions) of every `score` call."""

    def __init__(self, model: Model):
        self.model, self.calls = model, []

    vocab_size = property(lambda self: self.model.vocab_size)
    num_params = property(lambda self: self.model.num_params)

    def init_state(self, batch, size):
        return self.model.init_state(batch, size)

    def score(self, state, seq, ends, window):
        self.calls.append((window, ends.shape[1]))
        return self.model.score(state, seq, ends, window)


def _all_accepted_passes(schedule: Schedule) -> list[int]:
    """Passes per target round of levels 0..K when every draft is accepted."""
    handed, passes = schedule.buffers[0], [schedule.buffers[0]]  # M_0: T_0 single-token steps
    for level in range(1, schedule.depth):
        fills = math.ceil(schedule.buffers[level] / (handed + 1))  # each verify gains handed + 1
        passes = [p * fills for p in passes] + [fills]
        handed = fills * (handed + 1)
    return passes + [1]


def test_the_recording_drafter_is_a_drafter():
    assert isinstance(Recording(family(vocab=VOCAB)[-1]), Drafter)


@pytest.mark.parametrize("buffers", [(1,), (3,), (2, 3), (1, 4), (2, 2, 5)])
def test_widths_and_passes_follow_the_schedule(buffers):
    target = family(vocab=VOCAB)[-1]
    levels = [Recording(target) for _ in buffers] + [Recording(target)]
    hierarchy = Hierarchy(levels, buffers)
    schedule = hierarchy.schedule
    out = hsd_generate(hierarchy, PROMPT, LENGTH, jax.random.PRNGKey(0), max_new_tokens=12, trace=False)
    reference = ar_generate(target, PROMPT, LENGTH, jax.random.PRNGKey(0), max_new_tokens=12)
    np.testing.assert_array_equal(out.tokens, reference.tokens)

    rounds = int(out.stats.target_rounds[0])
    for level, recorder in enumerate(levels):
        calls = recorder.calls[1:]  # the first call of every level is its prompt prefill
        if level == 0:
            drafted = [window for window, scored in calls if scored == 1]
            per_batch = list(schedule.draft_widths())
            assert drafted == per_batch * (len(drafted) // len(per_batch))
        else:
            assert set(calls) == {(schedule.verify_width(level), schedule.scored(level))}
        assert len(calls) == int(out.stats.forward_passes[0, level])

    expected = _all_accepted_passes(schedule)
    assert int(out.stats.forward_passes[0, -1]) == rounds
    np.testing.assert_array_equal(np.asarray(out.stats.forward_passes[0, :-1]),
                                  [p * rounds for p in expected[:-1]])
    assert int(out.stats.accepted.sum()) == int(out.stats.proposed.sum())  # all accepted, as assumed


def test_schedule_rejects_bad_buffers():
    with pytest.raises(ValueError, match="integer >= 1"):
        Schedule.of([2, 0])
