"""Hybrid drafts (docs/design.md §3.9): the n-gram proposer and the per-row choice of a step's
proposal source.

`NgramIndex` proposes the continuation of a row's text found earlier in the text, by the rule of
transformers' prompt lookup (`PromptLookupCandidateGenerator.get_candidates` without logits
processors): for n from min(max_ngram, length - 1) down to 1, the earliest occurrence of the
text's last n tokens that has a continuation; up to `limit` tokens after it, clipped at the end
of the text and cut before the first end id. It keeps the first occurrence of every n-gram up to
`max_ngram`, extended with each committed token, so a lookup never rescans the text.

`SourceEstimate` keeps one source's per-position hazards (P(d_i accepted | d_1..d_{i-1}
accepted)) for one row and the expected accepted proposals of a candidate; `score` turns a
step's committed tokens into its observations. `choose_source` is the per-row rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

DRAFTERS = ("tidar", "hybrid", "ngram")
"""tidar: TiDAR's block only; hybrid: whichever source is expected to commit more; ngram: the
n-gram continuation whenever one of at least `min_match` tokens matches, TiDAR's block otherwise."""
DEFAULT_DRAFTER = "hybrid"
"""The drafter of `tidar generate` and of a served model when none is chosen: lossless like the
others, it places an n-gram continuation only where a row's own record says it commits more
(`choose_source`), so it is never far below TiDAR's block alone and far above it on text that
repeats (docs/design.md §3.9, "Default")."""
SOURCES = ("tidar", "ngram")
"""Where a step's proposals came from (the keys of the per-source counters)."""
MAX_NGRAM = 3
"""Longest suffix matched (transformers' max_matching_ngram_size)."""
MIN_MATCH = 2
"""Shortest match whose continuation the hybrid and ngram drafters use."""
PRIOR_RATE = 0.5
PRIOR_WEIGHT = 1.0
"""The hazards' prior: PRIOR_WEIGHT pseudo-observations at rate PRIOR_RATE per position."""


def check_drafter(drafter, name: str = "drafter") -> str:
    """`drafter` when it is one of DRAFTERS; ValueError naming the value otherwise."""
    if drafter not in DRAFTERS:
        raise ValueError(f"{name} must be one of {', '.join(DRAFTERS)}, got {drafter!r}")
    return drafter


@dataclass(frozen=True)
class NgramProposal:
    """A continuation found in the text: its tokens and the length of the suffix that matched
    (0 and no tokens: no match)."""

    tokens: tuple[int, ...] = ()
    match_len: int = 0


class NgramIndex:
    """One row's text and the first occurrence of each of its n-grams, n <= `max_ngram`."""

    def __init__(self, tokens: Iterable[int] = (), max_ngram: int = MAX_NGRAM, eos_ids: Iterable[int] = ()):
        if isinstance(max_ngram, bool) or not isinstance(max_ngram, int) or max_ngram < 1:
            raise ValueError(f"max_ngram must be a positive integer, got {max_ngram!r}")
        self.max_ngram = max_ngram
        self.eos_ids = frozenset(eos_ids)
        self.tokens: list[int] = []
        self._first: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append committed tokens to the text."""
        for token in tokens:
            self.tokens.append(int(token))
            end = len(self.tokens)
            for n in range(1, min(self.max_ngram, end) + 1):
                self._first.setdefault(tuple(self.tokens[end - n:]), end - n)

    def propose(self, limit: int) -> NgramProposal:
        """Up to `limit` tokens that followed the earliest earlier occurrence of the text's longest
        matching suffix (see the module docstring)."""
        length = len(self.tokens)
        if limit < 1:
            return NgramProposal()
        for n in range(min(self.max_ngram, length - 1), 0, -1):
            start = self._first[tuple(self.tokens[length - n:])] + n
            if start >= length:  # the suffix itself is its only occurrence
                continue
            tokens = self.tokens[start:min(start + limit, length)]
            for index, token in enumerate(tokens):
                if token in self.eos_ids:
                    tokens = tokens[:index]
                    break
            return NgramProposal(tuple(tokens), n) if tokens else NgramProposal()
        return NgramProposal()


@dataclass
class SourceEstimate:
    """One source's acceptance for one row, per proposal position (docs/design.md §3.9)."""

    accepted: list[int] = field(default_factory=list)
    at_risk: list[int] = field(default_factory=list)

    def hazard(self, position: int) -> float:
        """P(d_{position+1} accepted | the proposals before it accepted), with the prior."""
        seen = self.at_risk[position] if position < len(self.at_risk) else 0
        hits = self.accepted[position] if position < len(self.accepted) else 0
        return (hits + PRIOR_WEIGHT * PRIOR_RATE) / (seen + PRIOR_WEIGHT)

    def expected_accepted(self, count: int) -> float:
        """Expected accepted proposals of a candidate of `count` proposals."""
        return self.expected_curve(count)[-1]

    def expected_curve(self, count: int) -> list[float]:
        """`expected_accepted(c)` for c = 0..count, in one pass."""
        curve, survive = [0.0], 1.0
        for position in range(count):
            survive *= self.hazard(position)
            curve.append(curve[-1] + survive)
        return curve

    def observe(self, matched: int, known: int) -> None:
        """Positions 1..min(matched + 1, known) were at risk, 1..matched accepted."""
        risk = min(matched + 1, known)
        grow = risk - len(self.at_risk)
        if grow > 0:
            self.at_risk.extend([0] * grow)
            self.accepted.extend([0] * grow)
        for position in range(risk):
            self.at_risk[position] += 1
            if position < matched:
                self.accepted[position] += 1


def score(candidate: Sequence[int], committed: Sequence[int]) -> tuple[int, int]:
    """(matched, known) of a candidate's proposals against a step's committed tokens t_1..t_a
    (the tokens at the positions of d_1..d_a): the leading proposals equal to them, and the
    positions whose outcome the committed tokens decide (min(len(candidate), a))."""
    known = min(len(candidate), len(committed))
    matched = 0
    while matched < known and candidate[matched] == committed[matched]:
        matched += 1
    return matched, known


def choose_source(drafter: str, tidar: SourceEstimate, ngram: SourceEstimate, tidar_count: int,
                  proposal: NgramProposal, min_match: int = MIN_MATCH) -> str:
    """The source of a row's next proposals: 'ngram' when the drafter allows it, the match is at
    least `min_match` tokens long and (hybrid) its expected accepted proposals beat those of
    TiDAR's `tidar_count` proposals; 'tidar' otherwise."""
    if drafter == "tidar" or not proposal.tokens or proposal.match_len < min_match:
        return "tidar"
    if drafter == "ngram":
        return "ngram"
    return "ngram" if ngram.expected_accepted(len(proposal.tokens)) > tidar.expected_accepted(tidar_count) \
        else "tidar"
