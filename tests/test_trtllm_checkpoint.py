"""HF -> TensorRT-LLM checkpoint conversion (export/trtllm_checkpoint.py), all on CPU.

For every family fixture (Qwen2: q/k/v bias, tied embeddings, 2 KV heads; Qwen3: q/k norm,
1 KV head; Llama: 4 KV heads) plus a Qwen2 with 8 query heads, 2 KV heads, a vocabulary of
301 (not a multiple of any tp > 1) and sharded safetensors, and every tp in {1, 2, 4, 8} the
shapes allow: reassembling the rank files gives the HF tensors exactly, and the reference
model loaded from them gives identical logits. Also checked directly: rank r's fused qkv rows
(KV heads duplicated when fewer than ranks), zero vocabulary padding, dense split on its input
dim, mlp.fc = gate_proj and mlp.gate = up_proj, config.json fields, dtype conversion, errors
that name the field, and `reassemble` refusing tampered rank files.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tidar.export.trtllm_checkpoint import (ConversionError, check_sharding, convert, reassemble,
                                            trtllm_config)
from tidar.runtime.checkpoint import load_model, weight_files
from tidar.runtime.config import TiDARConfig
from tidar.runtime.layout import Layout
from tidar.runtime.model import TiDARModel
from tidar.train.checkpoint import init_random_weights, save_checkpoint, tiny_config

TP_SIZES = (1, 2, 4, 8)
WIDE = "qwen2-8heads"
SOURCES = ("qwen2", "qwen3", "llama", WIDE)
WIDE_VOCAB = 301


@pytest.fixture(scope="module")
def sources(tiny_checkpoints, tmp_path_factory):
    """{name: HF checkpoint folder}: the family fixtures plus WIDE, which tp = 8 can split
    (the fixtures' 4 query heads cannot). Written without a tokenizer (the conversion reads
    none) so its vocabulary can be 301 and exercise the LM-head padding."""
    config = tiny_config("qwen2", WIDE_VOCAB, num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    model = TiDARModel(config)
    init_random_weights(model, seed=7)
    wide = save_checkpoint(model, tmp_path_factory.mktemp("wide"), shard_bytes=40_000)
    assert (wide / "model.safetensors.index.json").is_file()
    return {**tiny_checkpoints, WIDE: wide}


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """converted(name, tp, dtype=None) -> TRT-LLM checkpoint folder (each converted once)."""
    cache = {}

    def get(name: str, tp: int, dtype: str | None = None):
        key = (name, tp, dtype)
        if key not in cache:
            cache[key] = convert(sources[name], tmp_path_factory.mktemp(f"trt-{name}-tp{tp}"), tp, dtype)
        return cache[key]
    return get


def hf_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of an HF checkpoint, exactly as stored."""
    state = {}
    for name, path in weight_files(folder).items():
        with safe_open(path, framework="pt") as handle:
            state[name] = handle.get_tensor(name)
    return state


def rank_files(folder, tp: int) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(folder / f"rank{r}.safetensors")) for r in range(tp)]


# The conversions that must be refused: the family fixtures' 4 query heads cannot be split 8 ways.
# Every other (source, tp) pair converts; a ConversionError there fails its test.
UNSUPPORTED = {(name, 8): "field 'num_attention_heads' (4) is not divisible by tp_size 8"
               for name in ("qwen2", "qwen3", "llama")}
SUPPORTED = [(name, tp) for name in SOURCES for tp in TP_SIZES if (name, tp) not in UNSUPPORTED]


@pytest.mark.parametrize("name,tp", list(UNSUPPORTED))
def test_unsupported_split_is_refused_by_name(sources, tmp_path, name, tp):
    """check_sharding and convert both refuse the split, naming the field, and convert writes nothing."""
    message = UNSUPPORTED[name, tp]
    with pytest.raises(ConversionError) as refused:
        check_sharding(TiDARConfig.from_file(sources[name]), tp)
    assert str(refused.value) == message
    with pytest.raises(ConversionError) as refused:
        convert(sources[name], tmp_path / "out", tp)
    assert str(refused.value) == message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def head_rows(tensor: torch.Tensor, head: int, head_dim: int) -> torch.Tensor:
    return tensor[head * head_dim:(head + 1) * head_dim]


# ---------------------------------------------------------------- round trip, every family x tp
@pytest.mark.parametrize("name,tp", SUPPORTED)
def test_reassembled_tensors_equal_hf(sources, converted, name, tp):
    config, state = reassemble(converted(name, tp))
    original = hf_tensors(sources[name])
    assert config.to_dict() == TiDARConfig.from_file(sources[name]).to_dict()
    assert sorted(state) == sorted(original)
    for tensor_name, tensor in original.items():
        assert torch.equal(state[tensor_name], tensor), tensor_name


@pytest.mark.parametrize("name,tp", SUPPORTED)
def test_reassembled_model_logits_identical(sources, converted, name, tp):
    config, state = reassemble(converted(name, tp))
    rebuilt = TiDARModel(config)
    rebuilt.load_state_dict(state, strict=not config.tie_word_embeddings)
    if config.tie_word_embeddings:
        rebuilt.lm_head.weight = rebuilt.model.embed_tokens.weight
    rebuilt.eval()
    original = load_model(sources[name], dtype="float32")
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(tp))
    layout = Layout.prefill(8, 4)
    with torch.no_grad():
        assert torch.equal(rebuilt(ids, layout), original(ids, layout))


# ---------------------------------------------------------------- the layout, checked directly
@pytest.mark.parametrize("name,tp", [(WIDE, 8), ("qwen3", 4), ("qwen2", 4), ("llama", 2)])
def test_rank_qkv_rows_are_its_heads(sources, converted, name, tp):
    """Rank r: its query heads, then KV heads split by tp, or KV head r * kv // tp duplicated."""
    config = TiDARConfig.from_file(sources[name])
    original = hf_tensors(sources[name])
    heads, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q_per_rank = heads // tp
    kv_heads_of = [[r * kv // tp] if kv < tp else list(range(r * kv // tp, (r + 1) * kv // tp)) for r in range(tp)]
    if kv < tp:
        assert len({h for r in range(tp) for h in kv_heads_of[r]}) == kv  # every KV head lands somewhere
    suffixes = ("weight", "bias") if config.has_qkv_bias else ("weight",)
    for rank, tensors in enumerate(rank_files(converted(name, tp), tp)):
        for layer in range(config.num_hidden_layers):
            for suffix in suffixes:
                hf = lambda proj: original[f"model.layers.{layer}.self_attn.{proj}_proj.{suffix}"]  # noqa: E731
                expected = torch.cat(
                    [head_rows(hf("q"), h, hd) for h in range(rank * q_per_rank, (rank + 1) * q_per_rank)]
                    + [head_rows(hf("k"), h, hd) for h in kv_heads_of[rank]]
                    + [head_rows(hf("v"), h, hd) for h in kv_heads_of[rank]])
                assert torch.equal(tensors[f"transformer.layers.{layer}.attention.qkv.{suffix}"], expected)


def test_lm_head_vocab_padding_rows_are_zero(sources, converted):
    tp = 8
    original = hf_tensors(sources[WIDE])
    embedding = original["model.embed_tokens.weight"]  # tied: the head is the embedding
    padded = -(-WIDE_VOCAB // tp) * tp
    ranks = rank_files(converted(WIDE, tp), tp)
    assert all(r["lm_head.weight"].shape == (padded // tp, embedding.shape[1]) for r in ranks)
    head = torch.cat([r["lm_head.weight"] for r in ranks])
    assert torch.equal(head[:WIDE_VOCAB], embedding)
    assert padded > WIDE_VOCAB and not head[WIDE_VOCAB:].any()
    assert all(torch.equal(r["transformer.vocab_embedding.weight"], embedding) for r in ranks)  # unpadded, full
    config = json.loads((converted(WIDE, tp) / "config.json").read_text())
    assert (config["vocab_size"], config["vocab_size_padded"]) == (WIDE_VOCAB, padded)


@pytest.mark.parametrize("name,tp", [("llama", 2), (WIDE, 8)])
def test_dense_and_mlp_sharding(sources, converted, name, tp):
    """dense = o_proj split on its input dim; fc = gate_proj and gate = up_proj split on rows
    (the classic swap); proj = down_proj split on its input dim; norms full on every rank."""
    config = TiDARConfig.from_file(sources[name])
    original = hf_tensors(sources[name])
    attn_cols = config.num_attention_heads * config.head_dim // tp
    mlp_rows = config.intermediate_size // tp
    for rank, tensors in enumerate(rank_files(converted(name, tp), tp)):
        attn, mlp = slice(rank * attn_cols, (rank + 1) * attn_cols), slice(rank * mlp_rows, (rank + 1) * mlp_rows)
        for layer in range(config.num_hidden_layers):
            hf, trt = f"model.layers.{layer}.", f"transformer.layers.{layer}."
            assert torch.equal(tensors[trt + "attention.dense.weight"],
                               original[hf + "self_attn.o_proj.weight"][:, attn])
            assert torch.equal(tensors[trt + "mlp.fc.weight"], original[hf + "mlp.gate_proj.weight"][mlp])
            assert torch.equal(tensors[trt + "mlp.gate.weight"], original[hf + "mlp.up_proj.weight"][mlp])
            assert not torch.equal(tensors[trt + "mlp.fc.weight"], original[hf + "mlp.up_proj.weight"][mlp])
            assert torch.equal(tensors[trt + "mlp.proj.weight"], original[hf + "mlp.down_proj.weight"][:, mlp])
            assert torch.equal(tensors[trt + "input_layernorm.weight"], original[hf + "input_layernorm.weight"])
            assert torch.equal(tensors[trt + "post_layernorm.weight"],
                               original[hf + "post_attention_layernorm.weight"])
        assert torch.equal(tensors["transformer.ln_f.weight"], original["model.norm.weight"])


def test_qwen3_qk_layernorm_full_on_every_rank(sources, converted):
    original = hf_tensors(sources["qwen3"])
    for tensors in rank_files(converted("qwen3", 2), 2):
        for which in ("q", "k"):
            assert torch.equal(tensors[f"transformer.layers.1.attention.{which}_layernorm.weight"],
                               original[f"model.layers.1.self_attn.{which}_norm.weight"])


def test_config_json_fields(sources, converted):
    config = TiDARConfig.from_file(sources["qwen3"])
    written = json.loads((converted("qwen3", 2) / "config.json").read_text())
    assert written == trtllm_config(config, 2, "float32")
    expected = {
        "architecture": "TiDARForCausalLM", "dtype": "float32", "logits_dtype": "float32",
        "vocab_size": config.vocab_size, "max_position_embeddings": config.max_position_embeddings,
        "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_size": 32, "hidden_act": "silu",
        "intermediate_size": config.intermediate_size, "norm_epsilon": config.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox", "rotary_base": config.rope_theta, "rotary_scaling": None,
        "qkv_bias": False, "qk_layernorm": True, "tie_word_embeddings": False,
        "mapping": {"world_size": 2, "tp_size": 2, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    assert {key: written[key] for key in expected} == expected
    assert written["tidar"]["mask_token_id"] == config.mask_token_id
    assert written["tidar"]["block_size"] == config.block_size
    llama = trtllm_config(TiDARConfig.from_file(sources["llama"]), 1, "bfloat16")
    assert llama["rotary_scaling"]["rope_type"] == "llama3" and llama["dtype"] == "bfloat16"
    qwen2 = trtllm_config(TiDARConfig.from_file(sources["qwen2"]), 4, "float16")
    assert qwen2["qkv_bias"] and qwen2["tie_word_embeddings"] and not qwen2["qk_layernorm"]


def test_dtype_conversion_and_progress(sources, tmp_path):
    lines = []
    out = convert(sources["llama"], tmp_path / "bf16", tp_size=2, dtype="bfloat16", progress=lines.append)
    assert len(lines) == 3 and lines[-1].endswith("config.json")
    assert all(t.dtype == torch.bfloat16 for r in rank_files(out, 2) for t in r.values())
    _, state = reassemble(out)
    for name, tensor in hf_tensors(sources["llama"]).items():
        assert torch.equal(state[name], tensor.to(torch.bfloat16)), name


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("tp,overrides,field", [
    (3, {}, "tp_size"),
    (16, {}, "tp_size"),
    (8, {}, "num_attention_heads"),                                                 # 4 heads
    (8, dict(num_attention_heads=8, intermediate_size=100), "intermediate_size"),
    (4, dict(num_attention_heads=12, num_key_value_heads=3), "num_key_value_heads"),  # 3 vs 4
])
def test_unsplittable_configs_name_the_field(tp, overrides, field):
    config = tiny_config("llama", 512, **overrides)
    with pytest.raises(ConversionError, match=f"'{field}'"):
        trtllm_config(config, tp, "float32")


def test_bad_dtype_and_tp_fail_before_writing(sources, tmp_path):
    with pytest.raises(ConversionError, match="'dtype'"):
        convert(sources["llama"], tmp_path / "a", dtype="int8")
    with pytest.raises(ConversionError, match="'tp_size'"):
        convert(sources["llama"], tmp_path / "b", tp_size=3)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_reassemble_refuses_tampered_rank_files(converted, tmp_path):
    """What `tidar-export verify` relies on: duplicated KV heads, replicated tensors and the
    vocabulary padding are checked, not assumed."""
    source = converted(WIDE, 8)
    cases = {
        "duplicated KV head": ("transformer.layers.0.attention.qkv.weight", -1),  # last row: a V row
        "rank 0's copy": ("transformer.ln_f.weight", 0),
        "padding": ("lm_head.weight", -1),
    }
    for message, (tensor_name, row) in cases.items():
        folder = tmp_path / message.replace(" ", "_").replace("'", "")
        folder.mkdir()
        for r in range(8):
            tensors = load_file(str(source / f"rank{r}.safetensors"))
            if r == 7:
                tensors[tensor_name][row] += 1.0
            save_file(tensors, str(folder / f"rank{r}.safetensors"))
        (folder / "config.json").write_text((source / "config.json").read_text())
        with pytest.raises(ConversionError, match=message):
            reassemble(folder)


# ---------------------------------------------------------------- streamed safetensors
def test_streamed_safetensors_round_trip(tmp_path):
    """write_safetensors (tensors produced whole or as row chunks) gives files safetensors reads
    back exactly; read_tensor reads whole tensors and row ranges; sizes that disagree are errors."""
    from tidar.export.safetensors_stream import TensorSpec, read_header, read_tensor, write_safetensors

    generator = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 5, generator=generator).to(torch.bfloat16),
               "b.bias": torch.randn(3, generator=generator),
               "c.weight": torch.randn(4, 2, generator=generator).half()}
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    def produce(spec):  # one tensor as row chunks, the others whole
        return tensors[spec.name].split(3) if spec.name == "a.weight" else tensors[spec.name]

    path = write_safetensors(tmp_path / "x.safetensors", specs, produce, metadata={"format": "pt"})
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], t) for n, t in tensors.items())
    stored = read_header(path)
    assert torch.equal(read_tensor(stored["a.weight"]), tensors["a.weight"])
    assert torch.equal(read_tensor(stored["a.weight"], rows=(2, 6)), tensors["a.weight"][2:6])
    with pytest.raises(ValueError, match="'b.bias' produced 8 bytes"):
        write_safetensors(tmp_path / "y.safetensors", specs[1:2], lambda spec: torch.zeros(2))
    (tmp_path / "z.safetensors").write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="outside the file"):
        read_header(tmp_path / "z.safetensors")
