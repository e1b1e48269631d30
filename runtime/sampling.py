"""Sampling settings, logit processing, seeded noise and draft verification (docs/design.md §3.2, §3.5).

The decode loop picks every token with one rule, batched over rows on the logits' device:
    token at absolute position n = argmax over v of  processed_logits(v) + G(seed, n, v)
where `processed_logits` applies temperature, the row's penalties, min_tokens and bad words
(runtime/logits_processor.py, docs/design.md §3.7), top-k and top-p (filtered tokens get -inf)
and G(seed, n, v) is Gumbel noise computed by a counter-based hash of (seed, position, token).
Greedy rows use the argmax of the logits (processed at temperature 1 when they have
processors; no noise). By the Gumbel-max trick the token is a sample of
the processed distribution p; the noise at each position is independent of every other
position's, so the committed sequence is distributed exactly as AR sampling (I2). Drafts are
chosen by the same rule on the diffusion logits at their own positions, so verification is a
greedy comparison of each draft with the target's choice at its position, and the committed
tokens are a function of (model, prompt, sampling settings, seed) alone: the same for any
draft length, batch composition or backend (docs/design.md §3.5).

The noise is a 32-bit hash turned into a float64 uniform in (0, 1): a sample differs from an
exact continuous Gumbel-max sample with probability about V * 2**-32 per position (the chance
that a tie or the top of the discretised range decides it), the same order as the float32
uniforms of torch.multinomial.

Words: the *proposals* of a step are the drafts d_1.. it verifies; `proposal_tokens` [B, n] holds
them, `proposal_counts` [B] says how many of each row's n slots are real (the rest are padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Adjust = Callable[[torch.Tensor], torch.Tensor]
"""A batched change of temperature-scaled scores [B, n, V] (runtime/logits_processor.py)."""


class SamplingError(ValueError):
    """Sampling settings out of range; the message names the setting."""


MAX_BAD_WORD_TOKENS = 32
"""Longest bad word, in tokens (the processor keeps this many recent tokens of each row)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens."""

    temperature: float = 0.0
    """0 selects greedy decoding; otherwise logits are divided by it before softmax."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; in (0, 1]."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    seed: int | None = None
    """Key of the row's noise (None: drawn from torch's global generator at admission)."""
    repetition_penalty: float = 1.0
    """> 0; a token already in the sequence (prompt or output) has its logit divided by it when
    positive, multiplied when negative (runtime/logits_processor.py has the exact rule)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already in the sequence."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per occurrence in the sequence."""
    min_tokens: int = 0
    """The end ids are banned while fewer than this many tokens have been generated."""
    bad_words: tuple[tuple[int, ...], ...] = ()
    """Token-id sequences never generated: the last token of each is banned where the sequence
    so far ends with the others (a one-token word is banned everywhere)."""

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise SamplingError(f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1], got {p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2 ** 64):
            raise SamplingError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        r = self.repetition_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise SamplingError(f"repetition_penalty must be a finite number > 0, got {r!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SamplingError(f"{name} must be a finite number, got {value!r}")
        m = self.min_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise SamplingError(f"min_tokens must be an integer >= 0, got {m!r}")
        if isinstance(self.bad_words, (str, bytes)) or not isinstance(self.bad_words, (list, tuple)):
            raise SamplingError(f"bad_words must be a list of token-id sequences, got {self.bad_words!r}")
        words = []
        for word in self.bad_words:
            if isinstance(word, (str, bytes)) or not isinstance(word, (list, tuple)) or not word or any(
                    isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in word):
                raise SamplingError(f"bad_words must hold non-empty sequences of token ids >= 0, got {word!r}")
            if len(word) > MAX_BAD_WORD_TOKENS:
                raise SamplingError(f"bad_words entry {list(word)!r} has {len(word)} tokens, more than "
                                    f"{MAX_BAD_WORD_TOKENS}")
            words.append(tuple(word))
        object.__setattr__(self, "bad_words", tuple(words))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def processes_logits(self) -> bool:
        """Whether a penalty, min_tokens or bad words change this request's logits."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.min_tokens > 0 or bool(self.bad_words))


def process_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None = None,
                   top_p: torch.Tensor | None = None, adjust: Adjust | None = None) -> torch.Tensor:
    """Scaled and filtered logits (float32) over the last dim, batched with per-row settings:
    divide by `temperature`, then `adjust` (the penalties, min_tokens and bad words of
    runtime/logits_processor.py, in TensorRT-LLM's order: after the temperature, before the
    filters), then keep the top_k largest (0: all), then the smallest set of most likely tokens
    whose probability reaches top_p; dropped tokens get -inf. The settings are tensors
    broadcastable to logits.shape[:-1]; None skips that step (decided on the host, so nothing
    here waits for the device)."""
    x = logits.float() / temperature[..., None]
    if adjust is not None:
        x = adjust(x)
    if top_k is None and top_p is None:
        return x
    vocab = x.shape[-1]
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    if top_k is not None:
        k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab).expand(x.shape[:-1])
        kth = sorted_x.gather(-1, (k - 1)[..., None])
        x = x.masked_fill(x < kth, float("-inf"))
        sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
    if top_p is not None:
        sorted_probs = torch.softmax(sorted_x, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        # the first token is never dropped; nor is any of a row with top_p = 1 (round-off of the sum)
        drop_sorted = (mass_before >= top_p[..., None]) & (top_p[..., None] < 1.0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


# ---------------------------------------------------------------- seeded noise
# A counter-based hash on 32-bit words held in int64 tensors (or Python ints): every product
# stays below 2**63, so nothing relies on integer overflow, and the bits are the same on every
# device. (torch.bitwise_* rather than the operators: their scalar forms are far faster on CPU.)
_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for x in [0, 2**32) (tensor or int) and a constant c < 2**32."""
    if not isinstance(x, torch.Tensor):
        return (x * c) & _M32
    low = torch.mul(x, c & 0xFFFF)
    high = torch.bitwise_left_shift(torch.bitwise_and(torch.mul(x, c >> 16), 0xFFFF), 16)
    return torch.bitwise_and(low + high, _M32)


def _xorshift(h, shift: int):
    if not isinstance(h, torch.Tensor):
        return h ^ (h >> shift)
    return torch.bitwise_xor(h, torch.bitwise_right_shift(h, shift))


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser: a bijection of [0, 2**32) with full avalanche."""
    h = _mul32(_xorshift(h, 16), 0x85EBCA6B)
    h = _mul32(_xorshift(h, 13), 0xC2B2AE35)
    return _xorshift(h, 16)


def seed_key(seed: int) -> int:
    """The 32-bit noise key of a 64-bit seed."""
    return _fmix32(_fmix32((seed & _M32) ^ 0x6A09E667) ^ (seed >> 32))


_TOKEN_WORDS: dict[tuple[int, str], torch.Tensor] = {}


def _token_words(vocab: int, device: torch.device) -> torch.Tensor:
    """A distinct pseudo-random 32-bit word per token id (cached per vocabulary and device)."""
    key = (vocab, str(device))
    if key not in _TOKEN_WORDS:
        _TOKEN_WORDS[key] = _fmix32(_mul32(torch.arange(vocab, device=device), 0x9E3779B9) ^ 0xBB67AE85)
    return _TOKEN_WORDS[key]


def _position_words(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One 32-bit word per (row key [B], absolute position [B, n]): [B, n]."""
    return _fmix32(torch.bitwise_xor(keys[:, None], _fmix32(torch.bitwise_xor(positions, 0x3C6EF372))))


def derived_keys(keys: torch.Tensor, stream: int) -> torch.Tensor:
    """Keys for another, independent use of the same rows' randomness (stream 1, 2, ...)."""
    return _fmix32(torch.bitwise_xor(keys, _mul32(stream, 0x9E3779B9)))


def uniforms(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), float64 [B, n], a pure function of (row key, absolute position)."""
    return _position_words(keys, positions).to(torch.float64).add_(0.5).mul_(2.0 ** -32)


def gumbel_noise(keys: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise G(key, position, token), float32 [B, n, vocab], for row keys [B]
    (`seed_key`) and absolute positions [B, n]: a pure function of its arguments. One 32-bit
    word per (row, position) from the key and the position, then per token the finaliser of
    that word xor the token's word (a bijection over tokens: no two tokens of a position share
    a value). Works in place on one buffer (fresh large buffers cost page faults on CPU)."""
    x = torch.bitwise_xor(_position_words(keys, positions)[..., None], _token_words(vocab, keys.device))
    scratch = torch.empty_like(x)
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):  # _fmix32, in place
        x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=scratch))
        torch.mul(x, multiplier >> 16, out=scratch).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
        x.mul_(multiplier & 0xFFFF).add_(scratch).bitwise_and_(_M32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=scratch))
    uniform = x.to(torch.float64).add_(0.5).mul_(2.0 ** -32)  # in (0, 1)
    return uniform.log_().neg_().log_().neg_().float()


@dataclass
class SamplingBatch:
    """The sampling settings of a batch of rows as device tensors (built when rows join or
    leave, never during a step), with the host flags that let `choose` and `verify` skip unused
    work. Sampled rows verify in one of two ways (docs/design.md §3.5): rows with a request seed
    by coupling (drafts and targets share the Gumbel noise of their position, so the output is
    fixed by the seed), rows without one by residual speculative sampling (the highest
    acceptance; there is no reproducibility to keep)."""

    greedy: torch.Tensor  # [B] bool
    temperature: torch.Tensor  # [B] float32 (1 for greedy rows)
    top_k: torch.Tensor | None  # [B] int64, None when no row filters by top-k
    top_p: torch.Tensor | None  # [B] float32, None when no row filters by top-p
    keys: torch.Tensor  # [B] int64 noise keys (`seed_key`)
    residual: torch.Tensor  # [B] bool: sampled rows without a request seed
    sampled_rows: torch.Tensor | None  # [S] int64: the sampled rows, None when every row samples
    all_greedy: bool
    any_residual: bool

    @classmethod
    def of(cls, params: list[SamplingParams], seeds: list[int], device: torch.device | str) -> "SamplingBatch":
        """`seeds`: each row's noise seed (the request's, or one drawn at admission when it has none)."""
        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        residual = [not p.greedy and p.seed is None for p in params]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        return cls(greedy=tensor([p.greedy for p in params], torch.bool),
                   temperature=tensor([p.temperature if not p.greedy else 1.0 for p in params], torch.float32),
                   top_k=tensor([p.top_k for p in params], torch.long) if any(p.top_k for p in params) else None,
                   top_p=tensor([p.top_p for p in params], torch.float32) if any(p.top_p < 1 for p in params)
                   else None,
                   keys=tensor([seed_key(s) for s in seeds], torch.long),
                   residual=tensor(residual, torch.bool),
                   sampled_rows=tensor(sampled, torch.long) if len(sampled) < len(params) else None,
                   all_greedy=not sampled, any_residual=any(residual))

    def choose(self, logits: torch.Tensor, positions: torch.Tensor, adjust: Adjust | None = None) -> torch.Tensor:
        """The token [B, n] each row picks from `logits` [B, n, V] at absolute `positions` [B, n]:
        the argmax for greedy rows, argmax(processed logits + G(seed, position, token)) for
        sampled rows (a sample of the processed distribution). `adjust` (None: nothing to
        adjust) applies the rows' logits processors; greedy rows then take the argmax of the
        adjusted logits at temperature 1."""
        if self.all_greedy and adjust is None:
            return logits.argmax(-1)
        return self._pick(logits, positions, adjust)[0]

    def choose_with_log_probs(self, logits: torch.Tensor, positions: torch.Tensor,
                              adjust: Adjust | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`choose`, and `log_probs` of the chosen tokens."""
        tokens, scores = self._pick(logits, positions, adjust)
        return tokens, self.log_probs(scores, tokens)

    def draft(self, logits: torch.Tensor, positions: torch.Tensor,
              adjust: Adjust | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts [B, n] chosen by `choose` from diffusion `logits`, and the distributions they were
        drawn from ([B, n, V]: the softmax of the processed logits) when a row verifies by residual
        sampling (None otherwise)."""
        if not self.any_residual:
            return self.choose(logits, positions, adjust), None
        tokens, scores = self._pick(logits, positions, adjust)
        return tokens, torch.softmax(scores, dim=-1)

    def verify(self, proposal_tokens: torch.Tensor, proposal_probs: torch.Tensor | None, target_logits: torch.Tensor,
               positions: torch.Tensor, adjust: Adjust | None = None, proposal_counts: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Batched verification. proposal_tokens [B, n] (d_1..d_n, from `draft`), proposal_probs [B, n, V]
        (their distributions; read for residual rows only, None when there are none), target_logits
        [B, n + 1, V] at absolute `positions` [B, n + 1], `adjust` as in `choose`. Returns (accepted
        [B], next [B]: the correction or bonus token, the processed target logits [B, n + 1, V] for
        `log_probs`, None when no row needed them). Greedy and seeded rows accept the prefix of
        proposals equal to the target's own choices; unseeded sampled rows run `verify_residual`.
        `proposal_counts` [B] (None: n): the real proposals of each row; the slots after them are padding
        (docs/design.md §3.4), never accepted, and the token after the last real one is drawn as
        a bonus token."""
        if self.all_greedy and adjust is None:
            choices, scores = target_logits.argmax(-1), None
        else:
            choices, scores = self._pick(target_logits, positions, adjust)
        accepted, next_token = accept_greedy(proposal_tokens, choices, proposal_counts)
        if not self.any_residual:
            return accepted, next_token, scores
        residual_accepted, residual_next = verify_residual(proposal_tokens, proposal_probs,
                                                           torch.softmax(scores, dim=-1), positions, self.keys,
                                                           proposal_counts)
        return (torch.where(self.residual, residual_accepted, accepted),
                torch.where(self.residual, residual_next, next_token), scores)

    def log_probs(self, scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The log-probability (float32 [B, n]) of `tokens` [B, n] under the distributions they were
        drawn from, given by their processed logits `scores` [B, n, V] (temperature, processors,
        top-k, top-p): the same for coupled and residual draws, whose tokens are both distributed
        as the processed target. A greedy row draws from the one-hot distribution of its argmax:
        0, as TensorRT-LLM reports for greedy decoding (top-k 1, normalised log probs)."""
        log_probs = torch.log_softmax(scores, dim=-1).gather(-1, tokens[..., None])[..., 0]
        return torch.where(self.greedy[:, None], 0.0, log_probs)

    def _pick(self, logits: torch.Tensor, positions: torch.Tensor,
              adjust: Adjust | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, n], processed logits [B, n, V] float32). The noise is made for the sampled
        rows only."""
        scores = process_logits(logits, self.temperature[:, None], _rows(self.top_k), _rows(self.top_p), adjust)
        if self.all_greedy:
            return (scores if adjust is not None else logits).argmax(-1), scores
        rows = self.sampled_rows
        if rows is None:
            return (scores + gumbel_noise(self.keys, positions, logits.shape[-1])).argmax(-1), scores
        greedy = (scores if adjust is not None else logits).argmax(-1)
        noisy = scores.index_select(0, rows) + gumbel_noise(self.keys.index_select(0, rows),
                                                             positions.index_select(0, rows), logits.shape[-1])
        return greedy.index_copy(0, rows, noisy.argmax(-1)), scores


def verify_residual(proposal_tokens: torch.Tensor, proposal_probs: torch.Tensor, target_probs: torch.Tensor,
                    positions: torch.Tensor, keys: torch.Tensor,
                    proposal_counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al.; Chen et al.) batched over rows: proposal i is
    accepted when u_i * q_i(d_i) < p_i(d_i); at the first rejection the token is drawn from
    normalize(max(0, p - q)), after n acceptances from p at the bonus position. The uniforms and
    the residual draw are keyed by (row key, position) on streams of their own, independent of the
    noise that drew the proposals. Shapes as in `SamplingBatch.verify`; target_probs [B, n + 1, V];
    `proposal_counts` [B] (None: n) real proposals per row: after them the bonus token is drawn from p."""
    n, vocab = proposal_tokens.shape[1], target_probs.shape[-1]
    proposal_probs = proposal_probs[:, :n]
    p_at = target_probs[:, :n].gather(-1, proposal_tokens[..., None])[..., 0].double()
    q_at = proposal_probs.gather(-1, proposal_tokens[..., None])[..., 0].double()
    u = uniforms(derived_keys(keys, 1), positions[:, :n])
    passed = u * q_at < p_at  # u < p / q without dividing by q
    if proposal_counts is not None:
        passed &= torch.arange(n, device=passed.device) < proposal_counts[:, None]
    accepted = passed.long().cumprod(1).sum(1)
    pick = accepted[:, None, None].expand(-1, 1, vocab)
    p = target_probs.gather(1, pick)[:, 0]
    q = torch.cat([proposal_probs, torch.zeros_like(p[:, None])], dim=1).gather(1, pick)[:, 0]  # bonus: q = 0
    if proposal_counts is not None:
        q = torch.where((accepted < proposal_counts)[:, None], q, 0.0)  # all real proposals accepted: a bonus token
    noise = gumbel_noise(derived_keys(keys, 2), positions.gather(1, accepted[:, None]), vocab)[:, 0]
    return accepted, (residual_distribution(p, q).log() + noise).argmax(-1)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(0, p - q) (unnormalised: Gumbel-max needs no normalisation), or p where p == q up to
    round-off."""
    residual = (p - q).clamp_min(0.0)
    return torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)


def _rows(setting: torch.Tensor | None) -> torch.Tensor | None:
    return None if setting is None else setting[:, None]


def accept_greedy(proposal_tokens: torch.Tensor, choices: torch.Tensor,
                  proposal_counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched acceptance: proposal_tokens [B, n] (d_1..d_n), choices [B, n + 1] (the target's
    tokens at the same positions plus the next). Returns (accepted [B]: the length of the prefix
    of proposals equal to the choices, at most `proposal_counts` [B] (the real proposals; None:
    n), next [B]: the choice after it)."""
    n = proposal_tokens.shape[1]
    matches = proposal_tokens == choices[:, :n]
    if proposal_counts is not None:
        matches &= torch.arange(n, device=proposal_tokens.device) < proposal_counts[:, None]
    accepted = matches.long().cumprod(1).sum(1)
    return accepted, choices.gather(1, accepted[:, None])[:, 0]
