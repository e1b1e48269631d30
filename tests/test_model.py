"""Reference model parity: `load_model` logits against transformers, and self-consistency.

For every family of tiny checkpoint (conftest: Qwen2 with q/k/v bias and tied embeddings,
Qwen3 with q/k norm, Llama with Llama-3 RoPE scaling) and every attention implementation,
fp32 logits equal `AutoModelForCausalLM`'s within 1e-5. Also: sharded checkpoints, tied
embeddings, RoPE inverse frequencies (default, linear, llama3) against transformers' own,
position offsets, incremental decoding through the KV cache, rows of different cached
lengths in one batch, and the TiDAR decode layout (eager = sdpa = flex = transformers fed
the layout's mask as a 4-D additive mask).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tidar.runtime.checkpoint import load_model
from tidar.runtime.config import TiDARConfig
from tidar.runtime.layout import Layout
from tidar.runtime.model import rope_inverse_frequencies

FAMILIES = ("qwen2", "qwen3", "llama")  # the families of the conftest fixtures

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

IMPLS = ("eager", "sdpa", "flex")
ATOL = 1e-5
BATCH, SEQ = 2, 33


def random_ids(vocab: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    """{(family, impl): fp32 reference model}."""
    return {(family, impl): load_model(tiny_checkpoints[family], dtype="float32", attention=impl)
            for family in FAMILIES for impl in IMPLS}


# ---------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_logits_equal_transformers(family, impl, models, hf_models):
    model, hf = models[family, impl], hf_models[family]
    ids = random_ids(model.config.vocab_size, BATCH, SEQ)
    ref = hf(ids).logits
    assert ref.std() > 0.1  # logits spread enough that the comparison means something
    assert max_diff(model(ids, Layout.autoregressive(SEQ)), ref) <= ATOL
    mask = model.plan(Layout.autoregressive(SEQ), torch.zeros(BATCH, dtype=torch.long), None).mask
    assert (type(mask).__name__ == "BlockMask") == (impl == "flex")  # each impl really runs its own lowering


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_position_offset_without_cache_equals_transformers(family, models, hf_models):
    """`past_lens` without a cache shifts the position ids only (no cached slots to attend)."""
    model, hf = models[family, "eager"], hf_models[family]
    ids = random_ids(model.config.vocab_size, BATCH, 9, seed=1)
    offsets = torch.tensor([300, 517])
    positions = offsets[:, None] + torch.arange(9)
    ref = hf(ids, position_ids=positions).logits
    for impl in IMPLS:
        got = models[family, impl](ids, Layout.autoregressive(9), past_lens=offsets)
        assert max_diff(got, ref) <= ATOL, impl


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_sharded_checkpoint_equals_single_file(family, tiny_checkpoints, hf_models, models, tmp_path):
    from tidar.train.checkpoint import write_random_checkpoint

    folder = write_random_checkpoint(tmp_path / family, family, seed=FAMILIES.index(family), shard_bytes=40_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (folder / "model.safetensors").exists()
    sharded, single = load_model(folder, dtype="float32"), models[family, "eager"]
    assert sharded.state_dict().keys() == single.state_dict().keys()
    for name, tensor in single.state_dict().items():
        assert torch.equal(sharded.state_dict()[name], tensor), name
    ids = random_ids(single.config.vocab_size, BATCH, SEQ)
    assert max_diff(sharded(ids, Layout.autoregressive(SEQ)), hf_models[family](ids).logits) <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tied_embeddings(family, dtype, tiny_checkpoints, hf_models):
    model = load_model(tiny_checkpoints[family], dtype=dtype)
    tied = model.config.tie_word_embeddings
    assert tied == (family == "qwen2") == hf_models[family].config.tie_word_embeddings
    shares = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert shares == tied
    assert model.lm_head.weight.dtype == getattr(torch, dtype)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


# ---------------------------------------------------------------- RoPE
@pytest.fixture(scope="module")
def linear_rope_checkpoint(tiny_checkpoints, tmp_path_factory):
    """The Llama checkpoint with linear RoPE scaling (factor 4) instead of Llama 3's."""
    folder = tmp_path_factory.mktemp("rope") / "llama-linear"
    shutil.copytree(tiny_checkpoints["llama"], folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize("variant", [*FAMILIES, "llama-linear"])
@torch.no_grad()
def test_rope_inverse_frequencies_equal_transformers(variant, tiny_checkpoints, hf_models, linear_rope_checkpoint):
    if variant == "llama-linear":
        import transformers

        folder = linear_rope_checkpoint
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    else:
        folder, hf = tiny_checkpoints[variant], hf_models[variant]
    config = TiDARConfig.from_file(folder)
    expected_type = {"llama": "llama3", "llama-linear": "linear"}.get(variant)
    assert (config.rope_scaling or {}).get("rope_type") == expected_type
    assert hf.model.rotary_emb.attention_scaling == 1.0
    ours = rope_inverse_frequencies(config)
    torch.testing.assert_close(ours, hf.model.rotary_emb.inv_freq.float(), rtol=1e-6, atol=0)
    if variant == "llama-linear":  # and the whole model, at positions where scaling matters
        model = load_model(folder, dtype="float32")
        ids = random_ids(config.vocab_size, 1, 8, seed=2)
        offsets = torch.tensor([700])
        ref = hf(ids, position_ids=offsets[:, None] + torch.arange(8)).logits
        assert max_diff(model(ids, Layout.autoregressive(8), past_lens=offsets), ref) <= ATOL


def test_llama3_scaling_changes_frequencies(tiny_checkpoints):
    """The Llama-3 rule keeps short wavelengths, divides long ones by `factor` and smooths between."""
    config = TiDARConfig.from_file(tiny_checkpoints["llama"])
    plain = rope_inverse_frequencies(TiDARConfig(**{**config.__dict__, "rope_scaling": None}))
    scaled = rope_inverse_frequencies(config)
    ratio = plain / scaled
    assert ratio[0] == 1.0 and ratio[-1] == pytest.approx(config.rope_scaling["factor"])
    assert ((ratio > 1.0) & (ratio < config.rope_scaling["factor"])).any()


# ---------------------------------------------------------------- KV cache
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_incremental_decoding_equals_full_forward(family, impl, models):
    model = models[family, impl]
    ids = random_ids(model.config.vocab_size, BATCH, SEQ, seed=3)
    full = model(ids, Layout.autoregressive(SEQ))
    prefix = 28
    cache = model.new_cache(BATCH, SEQ + 4)
    steps = [model(ids[:, :prefix], Layout.autoregressive(prefix), cache)]
    cache.commit([prefix] * BATCH)
    for t in range(prefix, SEQ):
        steps.append(model(ids[:, t:t + 1], Layout.autoregressive(1), cache))
        cache.commit([1] * BATCH)
    assert cache.lengths.tolist() == [SEQ] * BATCH
    assert max_diff(torch.cat(steps, dim=1), full) <= ATOL


def prefill_rows(model, cache, prefix: torch.Tensor, lengths: list[int]) -> None:
    """Cache `prefix[r, :lengths[r]]` in row r, one row at a time. (The tests below prefill with the
    eager model, which is cheap on CPU, and run the step under test with each implementation;
    prefill through every implementation is covered by the incremental-decoding test.)"""
    for r, length in enumerate(lengths):
        row = cache.row(r)
        model(prefix[r:r + 1, :length], Layout.autoregressive(length), row)
        row.commit([length])


@pytest.mark.parametrize("layout", [Layout.autoregressive(1), Layout.decode(4), Layout.prefill(5, 3)],
                         ids=["ar1", "decode4", "prefill5+3"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_ragged_batch_rows_equal_rows_alone(family, impl, layout, models):
    model, eager = models[family, impl], models[family, "eager"]
    lengths = [13, 4]
    prefix = random_ids(model.config.vocab_size, len(lengths), max(lengths), seed=4)
    new = random_ids(model.config.vocab_size, len(lengths), layout.num_new, seed=5)
    cache = model.new_cache(len(lengths), max(lengths) + layout.num_new + 2)
    prefill_rows(eager, cache, prefix, lengths)
    batched = model(new, layout, cache)
    for r, length in enumerate(lengths):
        alone_cache = model.new_cache(1, length + layout.num_new)
        prefill_rows(eager, alone_cache, prefix[r:r + 1], [length])
        alone = model(new[r:r + 1], layout, alone_cache)
        assert max_diff(batched[r:r + 1], alone) <= ATOL, f"row {r} (cached {length})"


# ---------------------------------------------------------------- the TiDAR decode layout
@pytest.mark.parametrize("b", [3, 16])
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_decode_layout_same_for_every_impl_and_transformers(family, b, models, hf_models):
    """One TiDAR step over ragged cached prefixes: eager, sdpa and flex agree, and equal
    transformers run over prefix + new tokens with the layout's positions and mask (4-D, additive)."""
    layout = Layout.decode(b)
    lengths = [6, 11]
    vocab = models[family, "eager"].config.vocab_size
    prefix = random_ids(vocab, len(lengths), max(lengths), seed=6)
    new = random_ids(vocab, len(lengths), layout.num_new, seed=7)
    outs = {}
    for impl in IMPLS:
        model = models[family, impl]
        cache = model.new_cache(len(lengths), max(lengths) + layout.num_new)
        prefill_rows(models[family, "eager"], cache, prefix, lengths)
        outs[impl] = model(new, layout, cache)
    for impl in IMPLS[1:]:
        assert max_diff(outs[impl], outs["eager"]) <= ATOL, impl
    for r, past in enumerate(lengths):
        total = past + layout.num_new
        ids = torch.cat([prefix[r:r + 1, :past], new[r:r + 1]], dim=1)
        positions = torch.cat([torch.arange(past), layout.position_ids(torch.tensor([past]))[0]])[None]
        visible = torch.zeros(total, total, dtype=torch.bool)
        visible[:past, :past] = torch.ones(past, past, dtype=torch.bool).tril()
        visible[past:] = layout.dense_mask(torch.tensor([past]), total)[0]
        additive = torch.zeros(1, 1, total, total).masked_fill(~visible, float("-inf"))
        ref = hf_models[family](input_ids=ids, position_ids=positions, attention_mask=additive).logits[:, past:]
        assert max_diff(outs["eager"][r:r + 1], ref) <= ATOL, f"row {r}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,new,kv", [(1, 1, 5), (16, 1, 200), (3, 8, 210), (2, 17, 33), (1, 272, 300)])
def test_sdpa_grouped_heads_equal_expanded_kv_bit_for_bit(dtype, batch, new, kv):
    """sdpa_attention hands grouped-query K/V to the fused kernel unexpanded on CPU; the result is
    the same bits as PyTorch's attention over K/V expanded to every query head."""
    from tidar.runtime.model import sdpa_attention

    generator = torch.Generator().manual_seed(batch * 1000 + new)
    q = torch.randn(batch, 8, new, 32, generator=generator).to(dtype)
    k = torch.randn(batch, 2, kv, 32, generator=generator).to(dtype)
    v = torch.randn(batch, 2, kv, 32, generator=generator).to(dtype)
    mask = torch.rand(batch, 1, new, kv, generator=generator) > 0.3
    mask[..., 0] = True
    expanded = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1), attn_mask=mask, scale=32 ** -0.5)
    assert torch.equal(sdpa_attention(q, k, v, mask, 32 ** -0.5), expanded)
