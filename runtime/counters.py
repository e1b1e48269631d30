"""The one counter struct of draft-verify decoding (`Stats`), in the style of vLLM's
speculative-decoding metrics.

The same struct counts one forward of one request (a `Delta`'s `step_stats`: the increments),
a request's totals (`Result.stats`: the sum of its deltas' increments plus its decode time), and
the replay's totals over prompts (runtime/replay.py, which predicts what the engine counts).
A proposal position i is d_{i+1}, the (i+1)-th draft after the step's d_0; the position lists
are as long as the longest draft length counted so far (b - 1). Steps, proposals and accepted
proposals are also counted per source of the proposals (docs/design.md §3.9: "tidar", TiDAR's
block, or "ngram", a continuation found in the text); the engine counts them, the sums over
sources are the totals.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence


def add_per_position(totals: list[int], increments: Sequence[int]) -> None:
    """Add `increments` to `totals` position by position, extending `totals` with zeros first when
    it is shorter (the draft length, hence the number of proposal positions, may change)."""
    totals.extend([0] * (len(increments) - len(totals)))
    for position, count in enumerate(increments):
        totals[position] += count


def acceptance_rates(accepted_per_position: Sequence[int], proposed) -> list[float]:
    """P(d_1..d_i all accepted), per position: accepted over proposed there (accepting stops at
    the first miss, so the count at position i is already the count of 'all of the first i
    accepted'). `proposed`: per position the steps that had a proposal there, or one number for
    every position (the steps that verified proposals; the same with k = b)."""
    proposed = list(proposed) if isinstance(proposed, (list, tuple)) else [proposed] * len(accepted_per_position)
    return [count / n if n else 0.0 for count, n in zip(accepted_per_position, proposed)]


@dataclass
class Stats:
    """Counters of draft-verify decoding: one forward's increments or the sum of many (`add`)."""

    forward_passes: int = 0
    """Forwards counted (a prefill or a step is 1; a delta that no forward made is 0)."""
    drafts: int = 0
    """Steps that verified proposals."""
    draft_tokens: int = 0
    """Proposals verified (b - 1 per step with k = b blocks; fewer after a step that committed
    more than k tokens with k < b: a padded draft slot is never a proposal and never accepted)."""
    accepted_tokens: int = 0
    """Proposals accepted."""
    accepted_per_position: list[int] = field(default_factory=list)
    """accepted_per_position[i]: how often proposal d_{i+1} was accepted."""
    proposed_per_position: list[int] = field(default_factory=list)
    """proposed_per_position[i]: how often there was a proposal d_{i+1} to verify."""
    drafts_by_source: dict[str, int] = field(default_factory=dict)
    """Per proposal source: steps that verified its proposals (sum: `drafts`)."""
    proposed_by_source: dict[str, int] = field(default_factory=dict)
    """Per proposal source: its proposals verified (sum: `draft_tokens`)."""
    accepted_by_source: dict[str, int] = field(default_factory=dict)
    """Per proposal source: its proposals accepted (sum: `accepted_tokens`)."""
    prefill_seconds: float = 0.0
    """The prefill's wall time (in a request's first delta and its totals)."""
    decode_seconds: float = 0.0
    """Wall time from the end of the prefill to the request's end (totals of a finished request)."""

    @classmethod
    def positions(cls, draft_len: int, **counts) -> "Stats":
        """Counters with b - 1 proposal positions (all 0) for draft length b = `draft_len`."""
        width = max(draft_len - 1, 0)
        return cls(accepted_per_position=[0] * width, proposed_per_position=[0] * width, **counts)

    @classmethod
    def of_step(cls, draft_len: int, proposed: int, accepted: int, source: str | None = None) -> "Stats":
        """The increments of one step at draft length b = `draft_len` that verified `proposed`
        proposals (0: none) and accepted the first `accepted` of them; counted for `source` too
        when given (where the proposals came from)."""
        if not proposed:
            return cls(forward_passes=1)
        step = cls.positions(draft_len, forward_passes=1, drafts=1, draft_tokens=proposed, accepted_tokens=accepted)
        if source is not None:
            step.drafts_by_source, step.proposed_by_source = {source: 1}, {source: proposed}
            step.accepted_by_source = {source: accepted}
        step.proposed_per_position[:proposed] = [1] * proposed
        step.accepted_per_position[:accepted] = [1] * accepted
        return step

    def add(self, other: "Stats") -> None:
        """Count `other`'s increments (timings included)."""
        self.forward_passes += other.forward_passes
        self.drafts += other.drafts
        self.draft_tokens += other.draft_tokens
        self.accepted_tokens += other.accepted_tokens
        add_per_position(self.accepted_per_position, other.accepted_per_position)
        add_per_position(self.proposed_per_position, other.proposed_per_position)
        for mine, theirs in ((self.drafts_by_source, other.drafts_by_source),
                             (self.proposed_by_source, other.proposed_by_source),
                             (self.accepted_by_source, other.accepted_by_source)):
            for source, count in theirs.items():
                mine[source] = mine.get(source, 0) + count
        self.prefill_seconds += other.prefill_seconds
        self.decode_seconds += other.decode_seconds

    def widen(self, draft_len: int) -> None:
        """Make room for the proposal positions of draft length `draft_len` (b - 1 of them)."""
        add_per_position(self.accepted_per_position, [0] * (draft_len - 1))
        add_per_position(self.proposed_per_position, [0] * (draft_len - 1))

    def copy(self) -> "Stats":
        """A copy that shares no list or dict with this one."""
        return dataclasses.replace(self, accepted_per_position=list(self.accepted_per_position),
                                   proposed_per_position=list(self.proposed_per_position),
                                   drafts_by_source=dict(self.drafts_by_source),
                                   proposed_by_source=dict(self.proposed_by_source),
                                   accepted_by_source=dict(self.accepted_by_source))

    @property
    def acceptance(self) -> list[float]:
        """Per position: accepted over proposed there (`acceptance_rates`)."""
        return acceptance_rates(self.accepted_per_position, self.proposed_per_position)


StepStats = Stats
"""The name deltas' increments had before they became `Stats` (kept for callers)."""
