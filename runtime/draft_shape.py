"""The one validation of a decode step's draft shape (b, k) against a checkpoint (docs/design.md §3.4).

A TiDAR step drafts b tokens and carries k <= b blocks of b masks; draft length 0 is AR decoding
(k = 0). A checkpoint decodes only with blocks of the sizes it was trained on: the `tidar` block
of its config.json may list them as `trained_block_sizes`; without the field the only trained
size is `block_size`. k-of-b shapes (k < b blocks of a trained size b) stay allowed: every block
of such a step is a trained block. AR is always allowed.

Every caller that takes a draft shape from a user or a tuner asks `validate_draft_shape`: the
engine (`DecodeEngine`, `set_draft_len`), `tidar generate --draft-len`, the serving request
contract and the autotuner's candidates (`trained_shapes` filters a candidate list).
"""

from __future__ import annotations

from typing import Iterable

from .layout import check_draft_shape


class DraftShapeError(ValueError):
    """A draft shape this checkpoint cannot decode with; the message names the value."""


def trained_block_sizes(config) -> tuple[int, ...]:
    """The block sizes `config` (a TiDARConfig) was trained on: `tidar.trained_block_sizes`
    when it declares them, else (block_size,)."""
    declared = getattr(config, "trained_block_sizes", None)
    return tuple(declared) if declared else (config.block_size,)


def validate_draft_shape(config, draft_len, draft_blocks=None,
                         names: tuple[str, str] = ("draft_len", "draft_blocks"),
                         verify_only: bool = False) -> tuple[int, int]:
    """(b, k) of the step shape (`draft_len`, `draft_blocks`; None: k = b) when `config`'s model
    can decode with it; raises DraftShapeError naming the value otherwise. `names` are how the
    caller's user spells the two settings (e.g. ("--draft-len", "--draft-blocks")), used in the
    messages. Rules: b is an integer in [0, block_size] (0 = AR); k is in [1, b] (0 for AR);
    b > 0 is one of `trained_block_sizes(config)`. With `verify_only`, k = 0 is also accepted for any
    b (a verify-only step drafts nothing, so any b up to block_size will do; docs/design.md §3.10)."""
    length_name, blocks_name = names
    block_size = config.block_size
    if isinstance(draft_len, bool) or not isinstance(draft_len, int) or not 0 <= draft_len <= block_size:
        raise DraftShapeError(f"{length_name} must be an integer in [0, block_size = {block_size}] "
                              f"(0 = AR decoding), got {draft_len!r}")
    try:
        draft_blocks = check_draft_shape(draft_len, draft_blocks, verify_only)
    except ValueError as error:
        raise DraftShapeError(str(error).replace("draft_blocks", blocks_name).replace("draft_len", length_name)) \
            from None
    trained = trained_block_sizes(config)
    # A config object without the field at all (a runtime older than `trained_block_sizes`) is not checked.
    if draft_len and draft_blocks and hasattr(config, "trained_block_sizes") and draft_len not in trained:
        sizes = ", ".join(map(str, trained))
        masks = f"blocks of {trained[0]} masks only" if len(trained) == 1 else f"blocks of {sizes} masks"
        uses = " or ".join(f"{length_name} {b} ({blocks_name} k in 1..{b})" for b in trained)
        raise DraftShapeError(f"{length_name} {draft_len}: this checkpoint was trained on {masks} "
                              f"(config.json tidar.trained_block_sizes = [{sizes}]); use {uses}, or 0 (AR)")
    return draft_len, draft_blocks


def is_trained_shape(config, draft_len, draft_blocks=None) -> bool:
    """Whether `validate_draft_shape` accepts the shape."""
    try:
        validate_draft_shape(config, draft_len, draft_blocks)
    except DraftShapeError:
        return False
    return True


def trained_shapes(config, candidates: Iterable) -> list:
    """The candidates (draft lengths b, or (b, k) shapes) that `config`'s model can decode with,
    in their order: the autotuner's filter."""
    def accepted(candidate) -> bool:
        if isinstance(candidate, tuple):
            return is_trained_shape(config, *candidate)
        return is_trained_shape(config, candidate)

    return [candidate for candidate in candidates if accepted(candidate)]
