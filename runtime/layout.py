"""The hybrid attention mask of TiDAR, defined once and lowered to every form the project uses.

A `Layout` describes the new tokens of one forward pass over a (possibly empty) cached
prefix:

    new tokens = [ causal run: C tokens ] [ block 0: B masks ] [ block 1: B masks ] ...

- causal token i sits at position past + i and sees the whole prefix and causal tokens <= i;
- block k sees the whole prefix, the first v_k = first_visible + k * visible_stride causal
  tokens, and every mask of its own block (bidirectional); nothing else. Its mask m sits at
  position past + v_k + m: a block predicts the tokens right after what it sees.

Decode steps, prefill with a mask block, the training objective and plain AR are all
instances (the constructors below). The visibility rule is written once, as tensor code
(`visible`), and lowered to a dense boolean mask (reference, eager/SDPA attention, ONNX),
to a FlexAttention `mask_mod`, and to the scalar arguments of the attention kernel.

Keys are addressed by KV-cache *slot*: slots [0, past) hold the cached prefix of the row
and the new tokens are written to slots [past, past + num_new). Rows of a batch may have
different `past` lengths; every lowering takes them as a per-row tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """Shape of the new tokens of one forward pass (see the module docstring)."""

    causal_len: int
    """C: number of causal (clean / draft) tokens; they come first."""
    num_blocks: int = 0
    """Number of mask blocks after the causal run."""
    block_len: int = 0
    """Masks per block."""
    first_visible: int = 0
    """Causal tokens that block 0 sees."""
    visible_stride: int = 0
    """Each further block sees this many more causal tokens than the previous one."""

    def __post_init__(self) -> None:
        if self.causal_len < 0 or self.num_blocks < 0 or self.block_len < 0:
            raise ValueError(f"layout sizes must be non-negative: {self}")
        if self.num_blocks and self.block_len == 0:
            raise ValueError(f"layout has {self.num_blocks} blocks of length 0")
        if self.num_blocks:
            last = self.first_visible + (self.num_blocks - 1) * self.visible_stride
            if min(self.first_visible, last) < 0 or max(self.first_visible, last) > self.causal_len:
                raise ValueError(f"layout blocks see causal tokens outside [0, {self.causal_len}]: {self}")
        if self.num_new == 0:
            raise ValueError("layout has no tokens")

    # ------------------------------------------------------------ instances
    @classmethod
    def autoregressive(cls, num_tokens: int) -> "Layout":
        """Plain causal attention over `num_tokens` new tokens."""
        return cls(causal_len=num_tokens)

    @classmethod
    def prefill(cls, prompt_len: int, draft_len: int) -> "Layout":
        """The prompt, causal, plus one block of `draft_len` masks that sees all of it."""
        if draft_len == 0:
            return cls.autoregressive(prompt_len)
        return cls(causal_len=prompt_len, num_blocks=1, block_len=draft_len, first_visible=prompt_len)

    @classmethod
    def decode(cls, draft_len: int, draft_blocks: int | None = None) -> "Layout":
        """One TiDAR step (docs/design.md §3.2, §3.4): drafts d_0..d_{b-1}, then blocks j = 1..k of b
        masks, block j seeing d_0..d_{j-1} (the pre-drafts for the outcome "j tokens committed").
        k = `draft_blocks` (1..b; None: k = b, the paper's step of b(b+1) tokens); b + k*b new
        tokens. Draft length 0 is AR decoding: d_0 alone, no blocks (k must be None or 0). k = 0
        with b > 0 is a verify-only step (§3.10): the b drafts, no blocks."""
        k = check_draft_shape(draft_len, draft_blocks, verify_only=True)
        if draft_len == 0:
            return cls.autoregressive(1)
        if k == 0:
            return cls.autoregressive(draft_len)
        return cls(causal_len=draft_len, num_blocks=k, block_len=draft_len,
                   first_visible=1, visible_stride=1)

    @classmethod
    def training(cls, seq_len: int, block_size: int) -> "Layout":
        """The full-mask objective (docs/design.md §2): S clean tokens then S masks in blocks of b; the
        block starting at position p sees the clean tokens before p. S must be a multiple of b."""
        if block_size <= 0 or seq_len % block_size:
            raise ValueError(f"training sequence length {seq_len} is not a multiple of block size {block_size}")
        return cls(causal_len=seq_len, num_blocks=seq_len // block_size, block_len=block_size,
                   first_visible=0, visible_stride=block_size)

    # ------------------------------------------------------------ geometry
    @property
    def num_new(self) -> int:
        """Number of new query tokens."""
        return self.causal_len + self.num_blocks * self.block_len

    def block_start(self, block: int) -> int:
        """Query index (index among the new tokens) of the first mask of `block`."""
        return self.mask_index(block, 0)

    def mask_index(self, block, mask):
        """Query index of mask `mask` of `block` (Python ints or integer tensors, elementwise)."""
        return self.causal_len + block * self.block_len + mask

    def causal_index(self, count: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """Query indices of the first `count` causal tokens (None: all of them): [count]. In a decode
        step the output at causal token i (d_i) is the AR prediction for the position of d_{i+1}."""
        return torch.arange(self.causal_len if count is None else count, device=device)

    def block_visible(self, block: int) -> int:
        """Causal tokens that `block` sees."""
        return self.first_visible + block * self.visible_stride

    def position_offsets(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Position id of every new token minus the row's cached length: shape [num_new]."""
        return position_offset(torch.arange(self.num_new, device=device), **self.kernel_scalars())

    def position_ids(self, past_lens: torch.Tensor) -> torch.Tensor:
        """Position ids of the new tokens for rows with cached lengths `past_lens`: [B, num_new]."""
        return past_lens[:, None] + self.position_offsets(past_lens.device)

    # ------------------------------------------------------------ the rule
    def visible(self, q_idx: torch.Tensor, kv_slot: torch.Tensor, past_len: torch.Tensor) -> torch.Tensor:
        """Whether new token `q_idx` may attend to KV slot `kv_slot` of a row whose cache holds
        `past_len` tokens. Pure elementwise tensor code, so it broadcasts for the dense mask and
        traces inside FlexAttention's `mask_mod` (see `visible`, the module-level rule)."""
        return visible(q_idx, kv_slot, past_len, **self.kernel_scalars())

    # ------------------------------------------------------------ lowerings
    def dense_mask(self, past_lens: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Boolean mask [B, num_new, kv_len] over KV slots (True = attend)."""
        device = past_lens.device
        q = torch.arange(self.num_new, device=device)[None, :, None]
        s = torch.arange(kv_len, device=device)[None, None, :]
        return self.visible(q, s, past_lens[:, None, None])

    def mask_mod(self, past_lens: torch.Tensor):
        """FlexAttention `mask_mod(b, h, q_idx, kv_idx)` for rows with cached lengths `past_lens`."""

        def mask_mod(b, h, q_idx, kv_idx):
            return self.visible(q_idx, kv_idx, past_lens[b])

        return mask_mod

    def kernel_scalars(self) -> dict[str, int]:
        """The layout as the scalar arguments of the attention kernel and plugin attributes
        (the per-row past lengths travel as a tensor)."""
        return {
            "causal_len": self.causal_len,
            "num_blocks": self.num_blocks,
            "block_len": self.block_len,
            "first_visible": self.first_visible,
            "visible_stride": self.visible_stride,
        }


# ---------------------------------------------------------------- the draft shape
def check_draft_shape(draft_len: int, draft_blocks: int | None = None, verify_only: bool = False) -> int:
    """The number of mask blocks k of a decode step of `draft_len` b drafts: `draft_blocks`, or b
    when it is None. Raises ValueError naming the value unless 1 <= k <= b (k = 0 when b = 0, AR;
    with `verify_only`, k = 0 for any b: a step that verifies drafts and drafts nothing, §3.10)."""
    if isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 0:
        raise ValueError(f"draft_len must be a non-negative integer, got {draft_len!r}")
    if draft_blocks is None:
        return draft_len
    if isinstance(draft_blocks, bool) or not isinstance(draft_blocks, int):
        raise ValueError(f"draft_blocks must be an integer, got {draft_blocks!r}")
    low = 1 if draft_len and not verify_only else 0
    if not low <= draft_blocks <= draft_len:
        raise ValueError(f"draft_blocks must be in [{low}, draft_len = {draft_len}], got {draft_blocks}")
    return draft_blocks


def next_proposals(accepted, draft_len: int, draft_blocks: int):
    """Where the next step's proposals come from (docs/design.md §3.4), after a step of b =
    `draft_len` drafts and k = `draft_blocks` blocks accepted `accepted` proposals (0..b-1; a
    Python int or an integer tensor, elementwise). Returns (block, first_mask, count): the
    proposals d_1..d_count are masks first_mask.. of block `block` (0-based: block j sees
    d_0..d_j). With accepted < k that is block `accepted`, masks 1..b-1; with accepted >= k the
    block of the longest outcome, k-1, at its masks after the new d_0 (fewer proposals). A
    verify-only step (k = 0) has no blocks: count 0."""
    if draft_blocks == 0:
        return accepted * 0 - 1, accepted * 0 + 1, accepted * 0
    shift = (accepted >= draft_blocks) * (accepted - draft_blocks + 1)  # masks at or before the new d_0
    return accepted - shift, 1 + shift, draft_len - 1 - shift


# ---------------------------------------------------------------- the rule, on scalar arguments
# The layout's two elementwise rules, written once on the layout scalars (`kernel_scalars`).
# The scalars are Python ints (the `Layout` methods above) or 0-d integer tensors (an exported
# graph, where the layout is a runtime input), so the code uses no Python branching on them.


def position_offset(q_idx, causal_len, num_blocks, block_len, first_visible, visible_stride):
    """Position id of new token `q_idx` minus the row's cached length."""
    step = block_len + (block_len == 0)  # max(block_len, 1): no blocks means no mask tokens
    in_block = q_idx - causal_len
    block = torch.div(in_block, step, rounding_mode="floor")
    mask_position = first_visible + block * visible_stride + in_block - block * step
    return torch.where(q_idx < causal_len, q_idx, mask_position)


def visible(q_idx, kv_slot, past_len, causal_len, num_blocks, block_len, first_visible, visible_stride):
    """Whether new token `q_idx` may attend to KV slot `kv_slot` of a row whose cache holds
    `past_len` tokens (see the module docstring)."""
    c = causal_len
    k_idx = kv_slot - past_len  # index of the key among the new tokens (< 0: cached)
    q_causal = q_idx < c
    k_causal = (k_idx >= 0) & (k_idx < c)
    causal_to_causal = q_causal & k_causal & (k_idx <= q_idx)
    if isinstance(num_blocks, int) and not num_blocks:  # shortcut when the layout is known
        return (kv_slot < past_len) | causal_to_causal
    step = block_len + (block_len == 0)  # max(block_len, 1): no blocks means no mask tokens
    q_block = torch.div(q_idx - c, step, rounding_mode="floor")
    k_block = torch.div(k_idx - c, step, rounding_mode="floor")
    sees = first_visible + q_block * visible_stride
    num_new = c + num_blocks * block_len
    block_to_causal = ~q_causal & k_causal & (k_idx < sees)
    block_to_own_block = ~q_causal & (k_idx >= c) & (k_idx < num_new) & (k_block == q_block)
    return (kv_slot < past_len) | causal_to_causal | block_to_causal | block_to_own_block
