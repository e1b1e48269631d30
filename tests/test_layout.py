"""The hybrid attention mask `Layout` against the design document (docs/design.md), and its lowerings against each other.

The expected positions and visibility are rebuilt here, independently of layout.py, from
the words of docs/design.md §2 (training) and §3 (prefill, decode step) with plain Python loops over
tokens; `Layout.dense_mask` / `position_ids` must equal them entry by entry (over KV slots,
with per-row cached lengths, slots past a row's new tokens invisible). The FlexAttention
`mask_mod` lowering must equal the dense one, `kernel_scalars()` must round-trip, and
invalid layouts must raise ValueError.
"""

from __future__ import annotations

import pytest
import torch

from tidar.runtime.layout import Layout, check_draft_shape, next_proposals

PASTS = (0, 1, 7)
SLACK = 3  # extra KV slots after the longest row's new tokens: never visible


# ---------------------------------------------------------------- oracles from the design document's words
# A token is (kind, group, index, position offset): kind 'clean' / 'draft' / 'mask'.

def spec_decode_tokens(b: int, k: int | None = None) -> list[tuple[str, int, int, int]]:
    """docs/design.md §3.2 step: row 0 = drafts d_0..d_{b-1} at L..L+b-1; rows j = 1..b = b masks at L+j..L+j+b-1.
    §3.4: with k blocks only rows j = 1..k, at the same positions."""
    tokens = [("draft", 0, i, i) for i in range(b)]
    for j in range(1, (b if k is None else k) + 1):
        tokens += [("mask", j, m, j + m) for m in range(b)]
    return tokens


def spec_decode_sees(q, k) -> bool:
    """Drafts: causal among themselves, never masks. Block j: d_0..d_{j-1} and its own block's masks."""
    q_kind, q_row, q_i, _ = q
    k_kind, k_row, k_i, _ = k
    if q_kind == "draft":
        return k_kind == "draft" and k_i <= q_i
    return (k_kind == "draft" and k_i < q_row) or (k_kind == "mask" and k_row == q_row)


def spec_prefill_tokens(prompt: int, b: int) -> list[tuple[str, int, int, int]]:
    """docs/design.md §3 prefill: the prompt (causal), then b masks at positions P..P+b-1."""
    return [("clean", 0, i, i) for i in range(prompt)] + [("mask", 0, m, prompt + m) for m in range(b)]


def spec_prefill_sees(q, k) -> bool:
    """Prompt causal and blind to masks; masks see the whole prompt and each other."""
    if q[0] == "clean":
        return k[0] == "clean" and k[2] <= q[2]
    return True


def spec_training_tokens(seq_len: int, b: int) -> list[tuple[str, int, int, int]]:
    """docs/design.md §2: x_1..x_S then m_1..m_S; mask i at the position of x_i; masks in blocks of b."""
    return [("clean", 0, i, i) for i in range(seq_len)] + [("mask", i // b, i, i) for i in range(seq_len)]


def spec_training_sees_for(b: int):
    def sees(q, k) -> bool:
        """Clean causal, never masks; a mask in block [p, p+b) sees clean positions < p and its own block."""
        if q[0] == "clean":
            return k[0] == "clean" and k[3] <= q[3]
        block_start = q[1] * b
        return (k[0] == "clean" and k[3] < block_start) or (k[0] == "mask" and k[1] == q[1])
    return sees


def spec_ar_tokens(n: int) -> list[tuple[str, int, int, int]]:
    return [("clean", 0, i, i) for i in range(n)]


def spec_ar_sees(q, k) -> bool:
    return k[2] <= q[2]


def expected(tokens, sees, pasts: list[int], kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, Q] and visibility [B, Q, kv_len] per row: every new token sees the whole
    cached prefix (slots < past); new token k sits in slot past + k; nothing else is visible."""
    positions, mask = [], []
    for past in pasts:
        positions.append([past + t[3] for t in tokens])
        rows = []
        for q in tokens:
            row = [slot < past for slot in range(kv_len)]
            for k_index, k in enumerate(tokens):
                row[past + k_index] = sees(q, k)
            rows.append(row)
        mask.append(rows)
    return torch.tensor(positions), torch.tensor(mask)


def check(layout: Layout, tokens, sees, pasts: list[int]) -> None:
    assert layout.num_new == len(tokens)
    kv_len = max(pasts) + len(tokens) + SLACK
    past_lens = torch.tensor(pasts)
    want_pos, want_mask = expected(tokens, sees, pasts, kv_len)
    assert torch.equal(layout.position_ids(past_lens), want_pos)
    got = layout.dense_mask(past_lens, kv_len)
    assert got.dtype == torch.bool and got.shape == want_mask.shape
    if not torch.equal(got, want_mask):
        row, q, slot = (got != want_mask).nonzero()[0].tolist()
        pytest.fail(f"{layout}: row {row} (past {pasts[row]}) token {tokens[q]} vs slot {slot}: "
                    f"got {bool(got[row, q, slot])}, the design says {bool(want_mask[row, q, slot])}")


# ---------------------------------------------------------------- design conformance
@pytest.mark.parametrize("b", range(1, 17))
def test_decode_layout_matches_spec(b):
    """Layout.decode(b): b(b+1) tokens, positions and visibility as docs/design.md §3 words them, for single
    rows with past 0, 1, 7 and for one batch mixing those past lengths."""
    layout = Layout.decode(b)
    assert layout.num_new == b * (b + 1)
    tokens = spec_decode_tokens(b)
    for past in PASTS:
        check(layout, tokens, spec_decode_sees, [past])
    check(layout, tokens, spec_decode_sees, [7, 0, 1])


K_OF_B = [(1, 1), (2, 1), (4, 1), (4, 2), (4, 3), (8, 3), (16, 1), (16, 4), (16, 16)]


@pytest.mark.parametrize("b,k", K_OF_B, ids=[f"b{b}k{k}" for b, k in K_OF_B])
def test_decode_k_of_b_layout_matches_spec(b, k):
    """Layout.decode(b, k): b + k*b tokens; the kept blocks are those of the paper's step, at the
    same positions and with the same attention (docs/design.md §3.4); k = b is Layout.decode(b)."""
    layout = Layout.decode(b, k)
    assert layout.num_new == b + k * b
    tokens = spec_decode_tokens(b, k)
    for past in PASTS:
        check(layout, tokens, spec_decode_sees, [past])
    check(layout, tokens, spec_decode_sees, [7, 0, 1])
    full = Layout.decode(b)
    assert torch.equal(layout.position_offsets(), full.position_offsets()[:layout.num_new])
    assert torch.equal(layout.dense_mask(torch.tensor([5]), 40)[:, :, :5 + layout.num_new],
                       full.dense_mask(torch.tensor([5]), 40)[:, :layout.num_new, :5 + layout.num_new])
    if k == b:
        assert layout == full


@pytest.mark.parametrize("b,k", [(4, 5), (0, 1), (3, -1), (4, 2.0), (4, True)])
def test_decode_rejects_bad_block_counts(b, k):
    with pytest.raises(ValueError, match="draft_blocks"):
        Layout.decode(b, k)


def test_a_verify_only_step_is_its_drafts_alone_and_drafts_nothing():
    """(b, 0): the b drafts, causal, no blocks (docs/design.md §3.10); the next step has no
    block proposals whatever was accepted. A user's shape still needs k >= 1."""
    assert Layout.decode(4, 0) == Layout.autoregressive(4)
    for accepted in range(4):
        assert next_proposals(accepted, 4, 0)[2] == 0
    assert next_proposals(torch.tensor([0, 3]), 4, 0)[2].tolist() == [0, 0]
    with pytest.raises(ValueError, match=r"draft_blocks must be in \[1, draft_len = 4\], got 0"):
        check_draft_shape(4, 0)


def test_decode_272_tokens_for_b16():
    assert Layout.decode(16).num_new == 272


def test_decode_without_drafts_is_ar():
    assert Layout.decode(0) == Layout.autoregressive(1)


@pytest.mark.parametrize("seq_len,b", [(4, 1), (4, 4), (8, 2), (12, 4), (16, 8), (32, 16), (24, 3)])
def test_training_layout_matches_spec(seq_len, b):
    check(Layout.training(seq_len, b), spec_training_tokens(seq_len, b), spec_training_sees_for(b), [0])


@pytest.mark.parametrize("seq_len,b", [(10, 4), (7, 2), (4, 8), (8, 0), (8, -2)])
def test_training_rejects_length_not_multiple_of_block(seq_len, b):
    with pytest.raises(ValueError, match="multiple of block size"):
        Layout.training(seq_len, b)


@pytest.mark.parametrize("prompt,b", [(1, 1), (5, 4), (9, 16), (3, 2)])
def test_prefill_layout_matches_spec(prompt, b):
    tokens = spec_prefill_tokens(prompt, b)
    layout = Layout.prefill(prompt, b)
    for past in PASTS:  # a prompt may also continue a cached prefix
        check(layout, tokens, spec_prefill_sees, [past])
    check(layout, tokens, spec_prefill_sees, [1, 7, 0])


def test_prefill_without_drafts_is_ar():
    assert Layout.prefill(6, 0) == Layout.autoregressive(6)


@pytest.mark.parametrize("n", [1, 2, 9])
def test_autoregressive_layout_is_causal(n):
    layout = Layout.autoregressive(n)
    for past in PASTS:
        check(layout, spec_ar_tokens(n), spec_ar_sees, [past])
    check(layout, spec_ar_tokens(n), spec_ar_sees, [0, 7, 1])


# ---------------------------------------------------------------- lowerings agree
FLEX_LAYOUTS = {
    **{f"decode{b}": Layout.decode(b) for b in (1, 2, 4, 8, 16)},
    **{f"decode{b}k{k}": Layout.decode(b, k) for b, k in ((4, 1), (8, 3), (16, 2))},
    "prefill": Layout.prefill(11, 4),
    "training": Layout.training(16, 4),
    "ar": Layout.autoregressive(5),
    "ar1": Layout.autoregressive(1),
}


@pytest.mark.parametrize("name", list(FLEX_LAYOUTS))
@pytest.mark.parametrize("pasts", [[0], [5], [0, 3, 130]], ids=["past0", "past5", "ragged"])
def test_flex_mask_mod_equals_dense_mask(name, pasts):
    from torch.nn.attention.flex_attention import create_mask

    layout = FLEX_LAYOUTS[name]
    past_lens = torch.tensor(pasts)
    kv_len = max(pasts) + layout.num_new + SLACK
    flex = create_mask(layout.mask_mod(past_lens), len(pasts), 1, layout.num_new, kv_len, device="cpu")
    dense = layout.dense_mask(past_lens, kv_len)
    assert flex.shape == (len(pasts), 1, layout.num_new, kv_len)
    assert torch.equal(flex[:, 0], dense)


@pytest.mark.parametrize("layout", [
    Layout.autoregressive(3), Layout.prefill(7, 4), Layout.decode(1), Layout.decode(16), Layout.training(12, 3),
    Layout.decode(16, 1), Layout.decode(8, 3),
    Layout(causal_len=6, num_blocks=3, block_len=2, first_visible=6, visible_stride=-2),
], ids=str)
def test_kernel_scalars_round_trip(layout):
    scalars = layout.kernel_scalars()
    assert all(type(v) is int for v in scalars.values())
    assert Layout(**scalars) == layout


# ---------------------------------------------------------------- invalid layouts
@pytest.mark.parametrize("kwargs", [
    dict(causal_len=0),  # no tokens
    dict(causal_len=0, num_blocks=0, block_len=4),  # still no tokens
    dict(causal_len=-1),
    dict(causal_len=2, num_blocks=-1, block_len=2),
    dict(causal_len=2, num_blocks=2, block_len=0),  # blocks of no masks
    dict(causal_len=4, num_blocks=1, block_len=2, first_visible=5),  # sees past the causal run
    dict(causal_len=4, num_blocks=3, block_len=2, first_visible=1, visible_stride=2),  # last block sees 5 > 4
    dict(causal_len=4, num_blocks=1, block_len=2, first_visible=-1),  # sees before the run
    dict(causal_len=4, num_blocks=3, block_len=2, first_visible=2, visible_stride=-2),  # last block sees -2
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_invalid_layouts_raise(kwargs):
    with pytest.raises(ValueError):
        Layout(**kwargs)


@pytest.mark.parametrize("make", [lambda: Layout.autoregressive(0), lambda: Layout.prefill(0, 0)],
                         ids=["ar0", "prefill0"])
def test_constructors_reject_zero_tokens(make):
    with pytest.raises(ValueError, match="no tokens"):
        make()


@pytest.mark.parametrize("b,k", [(1, 1), (4, 1), (4, 4), (6, 3), (16, 2)])
def test_query_index_helpers_address_the_tokens_the_loop_reads(b, k):
    """`causal_index` and `mask_index` (the loop's only query-index arithmetic) point at the
    tokens whose position offsets the design gives: d_i at offset i, mask m of block j (0-based,
    it sees d_0..d_j) at offset 1 + j + m; and at the mask token of the input."""
    layout = Layout.decode(b, k)
    offsets = layout.position_offsets()
    assert offsets[layout.causal_index()].tolist() == list(range(b))
    for j in range(k):
        masks = layout.mask_index(j, torch.arange(b))
        assert offsets[masks].tolist() == [1 + j + m for m in range(b)]
        assert bool((masks >= layout.causal_len).all()) and int(masks.max()) < layout.num_new
        assert layout.block_start(j) == int(masks[0])
    blocks, mask = torch.tensor([[0], [k - 1]]), torch.tensor([[b - 1], [0]])
    assert layout.mask_index(blocks, mask).tolist() == [[layout.causal_len + b - 1], [layout.causal_len + (k - 1) * b]]
