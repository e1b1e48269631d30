"""The ONNX graphs of a decode step and its LM head (export/onnx_export.py) and their ONNX
Runtime backend.

Oracle: the torch reference backend. The graphs' logits (the step's hidden states through the
head graph) and the K/V the backend writes into the cache match it within 1e-4 for prefill, AR
and TiDAR decode layouts (k = b and k < b blocks) with ragged cached lengths, on every row and on
rows picked per batch row, and step after step of a decode whose rows have different lengths
and commit different counts, with the cache read in place (garbage in the slots the mask hides
changes nothing); one file serves every batch size / new-token count / past length; greedy
decoding through ONNX Runtime gives the torch backend's tokens (docs/design.md invariant I5)
while the head graph sees 2b - 1 rows per step and row (docs/design.md §3.2). The plugin
lowering is checked structurally (ONNX Runtime cannot run tidar::hybrid_attention).
"""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from tidar.export.onnx_export import (LAYOUT_SCALARS, PLUGIN_DOMAIN, PLUGIN_OP, default_head_path,  # noqa: E402
                                      export_decode_step, output_names)
from tidar.runtime.cache import FIT_GRANULARITY  # noqa: E402
from tidar.runtime.generate import DecodeEngine, Request  # noqa: E402
from tidar.runtime.layout import Layout  # noqa: E402
from tidar.runtime.model import gather_rows  # noqa: E402
from tidar.runtime.backends.onnx_backend import OnnxRuntimeBackend  # noqa: E402
from tidar.runtime.sampling import SamplingParams  # noqa: E402
from tidar.runtime.tokenizer import Tokenizer  # noqa: E402

FAMILIES = ("qwen2", "qwen3", "llama")
TOLERANCE = 1e-4
PROMPTS = ("def main():", "import os\nimport sys", "class Stack:\n    def push(self, x):", "x = [")


@pytest.fixture(scope="module")
def onnx_backends(tiny_backends, tmp_path_factory):
    """{family: OnnxRuntimeBackend} of the standard export of each tiny checkpoint."""
    root = tmp_path_factory.mktemp("onnx")
    backends = {}
    for family, torch_backend in tiny_backends.items():
        path = export_decode_step(torch_backend.model, root / f"{family}.onnx")
        backends[family] = OnnxRuntimeBackend(path, default_head_path(path), torch_backend.config, threads=1)
    return backends


def _run_both(torch_backend, onnx_backend, layout: Layout, past_lens: list[int], seed: int):
    """One forward of `layout` on both backends over the same random cached prefixes; returns
    (torch logits, ORT logits, torch cache, ORT cache)."""
    generator = torch.Generator().manual_seed(seed)
    vocab, batch, capacity = torch_backend.config.vocab_size, len(past_lens), max(past_lens) + layout.num_new + 3
    reference, candidate = torch_backend.new_cache(batch, capacity), onnx_backend.new_cache(batch, capacity)
    if max(past_lens):
        prefix = torch.randint(0, vocab, (batch, max(past_lens)), generator=generator)
        torch_backend.forward(prefix, Layout.autoregressive(prefix.shape[1]), reference)
        reference.commit([prefix.shape[1]] * batch)
        reference.truncate(past_lens)
        candidate.keys.copy_(reference.keys)
        candidate.values.copy_(reference.values)
        candidate.lengths = reference.lengths  # device and host copies of the lengths
    input_ids = torch.randint(0, vocab, (batch, layout.num_new), generator=generator)
    return (torch_backend.forward(input_ids, layout, reference), onnx_backend.forward(input_ids, layout, candidate),
            reference, candidate)


CASES = {  # name: (layout, past_lens); batch sizes, new-token counts and past lengths all vary
    "prefill": (Layout.prefill(9, 16), [0, 0]),
    "ar-ragged": (Layout.decode(0), [3, 11, 7]),
    "decode4-ragged": (Layout.decode(4), [12, 5]),
    "decode16": (Layout.decode(16), [6]),
    "decode16-ragged": (Layout.decode(16), [2, 17, 9]),
    "decode4k1": (Layout.decode(4, 1), [7]),  # k of b blocks: the same graph, other scalar inputs
    "decode16k3-ragged": (Layout.decode(16, 3), [13, 4]),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_cache_match_torch(family, tiny_backends, onnx_backends):
    worst = 0.0
    for seed, (name, (layout, past_lens)) in enumerate(CASES.items()):
        expected, actual, reference, candidate = _run_both(tiny_backends[family], onnx_backends[family],
                                                           layout, past_lens, seed)
        assert actual.shape == expected.shape, name
        difference = (actual - expected).abs().max().item()
        worst = max(worst, difference)
        assert difference < TOLERANCE, f"{family} {name}: logits differ by {difference}"
        for row, past in enumerate(past_lens):  # committed prefix and the new tokens' K/V
            slots = slice(0, past + layout.num_new)
            for ours, theirs in ((candidate.keys, reference.keys), (candidate.values, reference.values)):
                kv_difference = (ours[:, row, :, slots] - theirs[:, row, :, slots]).abs().max().item()
                assert kv_difference < TOLERANCE, f"{family} {name} row {row}: K/V differ by {kv_difference}"
        assert torch.equal(candidate.lengths, reference.lengths)  # forward commits nothing
    print(f"{family}: max |logit difference| {worst:.2e}")


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_of_picked_rows_match_torch(family, tiny_backends, onnx_backends):
    """The head graph on rows picked per batch row from the step graph's hidden states equals the
    torch model's LM head on the same rows (qwen2 ties the head to the embedding; the others do not)."""
    generator = torch.Generator().manual_seed(7)
    for seed, (name, (layout, past_lens)) in enumerate(CASES.items()):
        torch_backend, onnx_backend = tiny_backends[family], onnx_backends[family]
        batch = len(past_lens)
        rows = torch.randint(0, layout.num_new, (batch, 5), generator=generator)
        vocab, capacity = torch_backend.config.vocab_size, max(past_lens) + layout.num_new
        input_ids = torch.randint(0, vocab, (batch, layout.num_new), generator=generator)
        reference, candidate = torch_backend.new_cache(batch, capacity), onnx_backend.new_cache(batch, capacity)
        for cache in (reference, candidate):  # same (zero) cache contents, ragged lengths
            cache.commit(past_lens)
        expected = torch_backend.forward(input_ids, layout, reference, logits_rows=rows)
        hidden = onnx_backend.hidden_states(input_ids, layout, candidate)
        assert hidden.shape == (batch, layout.num_new, torch_backend.config.hidden_size)
        actual = onnx_backend.head(gather_rows(hidden, rows))
        assert actual.dtype == torch.float32 and actual.shape == expected.shape == (batch, 5, vocab)
        difference = (actual - expected).abs().max().item()
        assert difference < TOLERANCE, f"{family} {name}: logits of picked rows differ by {difference}"


STEPS = (Layout.decode(4), Layout.decode(0), Layout.decode(16, 3), Layout.decode(0), Layout.decode(4, 1),
         Layout.decode(16))
"""A decode's layouts, one per step (AR steps between TiDAR steps of other shapes)."""


@pytest.mark.parametrize("family", ("qwen3", "llama"))  # grouped-query heads (4:1) and one K/V head per head
def test_multi_step_decode_with_ragged_rows_matches_torch(family, tiny_backends, onnx_backends):
    """Rows of different lengths (prefilled one by one through row views), then decode steps of
    several layouts, each committing a different count per row: at every step the ORT backend's
    logits and the K/V it writes equal torch's, and the cache slots the mask hides (from each
    row's length on) are filled with large garbage before every ORT step, which must change
    nothing: the graph reads the cache in place over its whole capacity."""
    torch_backend, onnx_backend = tiny_backends[family], onnx_backends[family]
    generator = torch.Generator().manual_seed(11)
    vocab, prompts = torch_backend.config.vocab_size, (5, 13, 1)
    capacity = max(prompts) + sum(layout.num_new for layout in STEPS) + 1
    reference, candidate = (backend.new_cache(len(prompts), capacity) for backend in (torch_backend, onnx_backend))
    for row, length in enumerate(prompts):
        prompt = torch.randint(0, vocab, (1, length), generator=generator)
        for backend, cache in ((torch_backend, reference), (onnx_backend, candidate)):
            view = cache.row(row)
            backend.forward(prompt, Layout.autoregressive(length), view)
            view.commit([length])
    for step, layout in enumerate(STEPS):
        lengths = candidate.host_lengths
        for row, length in enumerate(lengths):  # garbage where the mask hides slots
            candidate.keys[:, row, :, length:] = 1e4
            candidate.values[:, row, :, length:] = -1e4
        input_ids = torch.randint(0, vocab, (len(prompts), layout.num_new), generator=generator)
        expected = torch_backend.forward(input_ids, layout, reference)
        actual = onnx_backend.forward(input_ids, layout, candidate)
        difference = (actual - expected).abs().max().item()
        assert difference < TOLERANCE, f"{family} step {step}: logits differ by {difference}"
        for row, length in enumerate(lengths):
            slots = slice(0, length + layout.num_new)
            for ours, theirs in ((candidate.keys, reference.keys), (candidate.values, reference.values)):
                kv_difference = (ours[:, row, :, slots] - theirs[:, row, :, slots]).abs().max().item()
                assert kv_difference < TOLERANCE, f"{family} step {step} row {row}: K/V differ by {kv_difference}"
        assert candidate.host_lengths == lengths  # the forward committed nothing
        counts = [int(c) for c in torch.randint(0, layout.num_new + 1, (len(prompts),), generator=generator)]
        reference.commit(counts)
        candidate.commit(counts)


def test_an_old_graph_with_present_outputs_is_named(tiny_backends, tmp_path):
    """A step graph that returns present_* (exported before the backend read the cache in place)
    is refused by file and output name."""
    from onnx import TensorProto, helper

    config = tiny_backends["qwen2"].config

    def save(name, inputs, outputs):
        nodes = [helper.make_node("Identity", [inputs[0]], [output]) for output in outputs]
        graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info(inputs[0], TensorProto.FLOAT, None)],
                                  [helper.make_tensor_value_info(output, TensorProto.FLOAT, None) for output in outputs])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / name)
        return tmp_path / name

    step = save("old.onnx", ["past_key_0"], ["hidden_states", "present_key_0", "present_value_0"])
    head = save("old.lm_head.onnx", ["hidden_states"], ["logits"])
    with pytest.raises(ValueError, match=r"old\.onnx: the step graph has no output 'new_key_0'.*build it again"):
        OnnxRuntimeBackend(step, head, config)


def test_graph_axes_are_dynamic(onnx_backends):
    backend = onnx_backends["llama"]
    config = backend.config
    session = backend.session
    shapes = {graph_input.name: graph_input.shape for graph_input in session.get_inputs()}
    assert shapes["input_ids"] == ["batch", "new"]
    assert shapes["past_lens"] == ["batch"]
    assert all(shapes[name] == [] for name in LAYOUT_SCALARS)
    assert shapes["past_key_0"][0] == "batch" and shapes["past_key_0"][2] == "past"
    outputs = session.get_outputs()
    assert [output.name for output in outputs] == output_names(config.num_hidden_layers, "standard")
    hidden, new_key = outputs[0], outputs[1]
    assert hidden.name == "hidden_states" and hidden.shape[:2] == ["batch", "new"]
    assert hidden.shape[2] == config.hidden_size
    assert new_key.name == "new_key_0"  # the new tokens' K/V only, not past + new slots
    assert new_key.shape == ["batch", config.num_key_value_heads, "new", config.head_dim]
    (head_input,), (head_output,) = backend.head_session.get_inputs(), backend.head_session.get_outputs()
    assert head_input.name == "hidden_states" and isinstance(head_input.shape[1], str)
    assert head_input.shape[2] == config.hidden_size
    assert head_output.name == "logits" and head_output.type == "tensor(float)"
    assert head_output.shape[2] == config.vocab_size


@pytest.mark.parametrize("family", FAMILIES)
def test_standard_graph_fuses_norms_and_rotary(family, onnx_backends):
    """The standard graph is opset 23 with one RMSNormalization per norm (2 per layer + the final
    one) and one RotaryEmbedding per layer for q and for k, and none of the pieces they replace
    (Pow, Reciprocal, Neg of rotate_half) are left; the logits tests above check its numbers."""
    backend = onnx_backends[family]
    graph = onnx.load(str(backend.model_path), load_external_data=False)
    layers = backend.config.num_hidden_layers
    ops = [node.op_type for node in graph.graph.node]
    assert {(o.domain, o.version) for o in graph.opset_import} == {("", 23)}
    assert ops.count("RMSNormalization") == 2 * layers + 1 + (2 * layers if family == "qwen3" else 0)  # q/k norms
    assert ops.count("RotaryEmbedding") == 2 * layers
    assert not {"Pow", "Reciprocal", "Neg"} & set(ops)


class _CountingSession:
    """An ONNX Runtime session that records the row count [batch * rows] of every run."""

    def __init__(self, session):
        self.session, self.rows = session, []

    def run(self, names, feeds):
        (hidden,) = feeds.values()
        self.rows.append(hidden.shape[0] * hidden.shape[1])
        return self.session.run(names, feeds)


@pytest.mark.parametrize("draft_len,beta", [(0, 1.0), (4, 1.0), (16, 1.0), (4, 0.5)])
def test_head_graph_runs_on_2b_minus_1_rows_per_step(onnx_backends, tiny_checkpoints, monkeypatch, draft_len, beta):
    """docs/design.md §3.2 on ONNX Runtime: per step and row, the LM-head graph sees the b
    verification rows then the b - 1 masks of the selected block (3b - 1 with beta < 1, plus
    the first mask of each block); AR: 1 row. Not b(b + 1)."""
    backend = onnx_backends["qwen2"]
    counting = _CountingSession(backend.head_session)
    monkeypatch.setattr(backend, "head_session", counting)
    tokenizer = Tokenizer(tiny_checkpoints["qwen2"])
    engine = DecodeEngine(backend, tokenizer, draft_len=draft_len, beta=beta)
    engine.add([Request(tokenizer.encode(prompt), 40, eos_ids=()) for prompt in PROMPTS])
    b, mixed = draft_len, draft_len > 0 and beta < 1
    assert counting.rows == [1 + mixed + max(b - 1, 0)] * len(PROMPTS)  # each prefill: d_0 and b - 1 drafts
    for _ in range(3):
        counting.rows.clear()
        engine.step()
        per_row = 1 if b == 0 else (3 * b - 1 if mixed else 2 * b - 1)
        assert sum(counting.rows) == len(PROMPTS) * per_row
        assert len(counting.rows) == (1 if b <= 1 else 2)  # the verification rows, then the drafting rows


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_torch(family, tiny_backends, onnx_backends, tiny_checkpoints):
    """docs/design.md I5: the same greedy tokens on every backend, for AR and TiDAR decoding, batched."""
    tokenizer = Tokenizer(tiny_checkpoints[family])
    requests = [Request(tokenizer.encode(prompt), max_new_tokens=20, eos_ids=()) for prompt in PROMPTS]
    for draft_len, blocks in ((0, None), (4, None), (16, None), (16, 2), (4, 1)):
        expected = DecodeEngine(tiny_backends[family], tokenizer, draft_len, draft_blocks=blocks).generate(requests)
        actual = DecodeEngine(onnx_backends[family], tokenizer, draft_len, draft_blocks=blocks).generate(requests)
        assert [r.token_ids for r in actual] == [r.token_ids for r in expected], f"{family} b={draft_len} k={blocks}"
        assert [r.stats.forward_passes for r in actual] == [r.stats.forward_passes for r in expected]


def test_cache_capacity_follows_the_rows(tiny_backends, onnx_backends, tiny_checkpoints):
    """The ONNX Runtime graph attends over every slot of the cache, so the engine keeps the capacity
    near what the rows use (KVCache.fit): a long AR decode grows it in steps of the granularity,
    never to prompt + max_new_tokens + a (16, 16) step at once, and it shrinks when the long row
    leaves; the tokens equal torch's (whose capacity is sized for the whole request) throughout."""
    tokenizer = Tokenizer(tiny_checkpoints["qwen2"])
    backend = onnx_backends["qwen2"]
    assert backend.reads_whole_cache and not tiny_backends["qwen2"].reads_whole_cache
    long, short = (Request(tokenizer.encode(prompt), max_new_tokens=n, eos_ids=()) for prompt, n in zip(PROMPTS, (260, 4)))
    engine = DecodeEngine(backend, tokenizer, 0)
    reference = DecodeEngine(tiny_backends["qwen2"], tokenizer, 0).generate([long])[0].token_ids
    tokens, capacities = list(engine.add([long])[0].token_ids), []
    while engine.rows:
        tokens += engine.step()[0].token_ids
        capacities.append(engine.cache.capacity)
        if engine.rows:  # (the row leaves after its last step)
            assert engine.cache.max_length() <= engine.cache.capacity <= engine.cache.max_length() + 4 * FIT_GRANULARITY
    assert tokens == reference
    assert sorted(set(capacities)) == capacities[:1] + sorted(set(capacities))[1:] and len(set(capacities)) > 1
    assert max(capacities) < engine._capacity(long)  # what a cache sized by the request would hold
    engine.generate([short])
    assert engine.cache.capacity == 2 * FIT_GRANULARITY < max(capacities)  # shrunk for the short row


def test_seeded_sampling_matches_torch(tiny_backends, onnx_backends, tiny_checkpoints):
    """The same seed gives the same tokens on ONNX Runtime as on torch (fp32), for AR and
    TiDAR decoding, in one batch of several seeds and settings."""
    family = "qwen2"
    tokenizer = Tokenizer(tiny_checkpoints[family])
    settings = (SamplingParams(temperature=0.8, seed=3), SamplingParams(temperature=1.0, top_p=0.9, seed=4),
                SamplingParams(temperature=0.7, top_k=30, seed=5), SamplingParams(temperature=1.2, seed=6))
    requests = [Request(tokenizer.encode(prompt), 20, params, eos_ids=()) for prompt, params in zip(PROMPTS, settings)]
    expected = [r.token_ids for r in DecodeEngine(tiny_backends[family], tokenizer, draft_len=0).generate(requests)]
    for draft_len in (0, 4, 16):
        actual = DecodeEngine(onnx_backends[family], tokenizer, draft_len=draft_len).generate(requests)
        assert [r.token_ids for r in actual] == expected, f"b={draft_len}"


def test_plugin_export_structure(tiny_backends, tmp_path):
    model = tiny_backends["qwen3"].model  # GQA: 4 query heads over 1 key/value head
    config = model.config
    graph = onnx.load(export_decode_step(model, tmp_path / "plugin.onnx", attention="plugin"))
    onnx.checker.check_model(graph, full_check=True)
    plugins = [node for node in graph.graph.node if node.domain == PLUGIN_DOMAIN]
    assert len(plugins) == config.num_hidden_layers
    assert {node.op_type for node in plugins} == {PLUGIN_OP}
    assert {(o.domain, o.version) for o in graph.opset_import} >= {(PLUGIN_DOMAIN, 1)}
    for layer, node in enumerate(plugins):
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes.keys() == {"num_heads", "num_kv_heads", "head_dim", "scale"}
        assert (attributes["num_heads"], attributes["num_kv_heads"], attributes["head_dim"]) == (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        assert attributes["scale"] == pytest.approx(config.head_dim ** -0.5)
        assert list(node.input[1:]) == [f"present_key_{layer}", f"present_value_{layer}", "past_lens",
                                        *LAYOUT_SCALARS]
    # the plugin replaces the whole attention: no softmax is left in the graph
    assert not [node for node in graph.graph.node if node.op_type == "Softmax"]


def test_export_rejects_unknown_attention(tiny_backends, tmp_path):
    with pytest.raises(ValueError, match="unknown attention lowering"):
        export_decode_step(tiny_backends["qwen2"].model, tmp_path / "x.onnx", attention="flash")


def test_missing_onnxruntime_is_a_clear_error(monkeypatch, tmp_path, tiny_backends):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="pip install"):
        OnnxRuntimeBackend(tmp_path / "missing.onnx", tmp_path / "missing.lm_head.onnx", tiny_backends["qwen2"].config)


def test_an_export_without_the_head_graph_is_named(tmp_path):
    """An export made when the LM head was inside the step graph has no onnx/lm_head.onnx: the
    backend says which file is missing and to build again."""
    from tidar.runtime.backends.loading import load_backend
    from tidar.runtime.checkpoint import CheckpointError

    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "decode_step.onnx").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no onnx/lm_head\.onnx.*build it again"):
        load_backend("onnxruntime", tmp_path)


def test_bench_runs_the_runtime_methods_on_onnxruntime(tiny_checkpoints, tmp_path):
    """`tidar bench --backend onnxruntime`: the runtime's methods on the exported standard graph
    (export.onnx_export.onnxruntime_backend), every output equal to AR's, the backend named."""
    from tidar.export.onnx_export import onnxruntime_backend
    from tidar.runtime.bench import bench

    report = bench(tiny_checkpoints["qwen2"], tmp_path, prompts=2, prompt_tokens=16, max_new_tokens=16, repeats=1,
                   draft_lens=(4,), peers=False, progress=lambda _: None, draft_blocks=(1,), autotune_budget_s=5,
                   backend_factory=lambda reference, out: onnxruntime_backend(reference.model, out / "onnx", 1))
    assert report["backend"] == "onnxruntime" and (tmp_path / "onnx" / "decode_step.onnx").is_file()
    assert all(method["equals_ar"] for method in report["methods"].values())
    assert report["default"]["method"] in report["methods"]

