"""Stand-ins for the `tidar::hybrid_attention` plugin where its kernel cannot run: the TensorRT plugin
behind the ONNX node, and the TensorRT-LLM plugin layer.

`attend` computes the op from its contract (plugins/contract.py) with a dense mask built from the
layout rule (`tidar.runtime.layout.visible`), in float64, and returns the query's dtype. It
checks the attributes against the tensors the way the plugins do (`contract.check_attributes`,
`contract.check_shapes`), and uses them: key/value head `h // (num_heads // num_kv_heads)` for
query head `h`, softmax scale `scale`. So a graph or a network that wires an attribute wrongly
(a swapped head count, a scale that is not 1/sqrt(head_dim)) fails its checks or gives other
numbers than the dense-mask reference model.

- `hybrid_attention` is an `onnx.reference` operator (ReferenceEvaluator(new_ops=[...]) looks a
  custom-domain node up by domain and class name), so the plugin graph
  (onnx/decode_step_plugin.onnx) runs with every one of its nodes evaluated.
- `trtllm_layer` replaces `tidar.plugins.trtllm_plugin.hybrid_attention_trtllm` in a network
  built on the TensorRT-LLM stand-in (fakes/tensorrt_llm_network.py), after that module's own
  checks of the layer's inputs and attributes (`trtllm_plugin._check`).
"""

from __future__ import annotations

import numpy as np
import torch
from onnx.reference.op_run import OpRun

from tidar.plugins import contract, trtllm_plugin
from tidar.runtime.layout import visible


def attend(query, key, value, past_lens, causal_len, num_blocks, block_len, first_visible, visible_stride, *,
           num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> torch.Tensor:
    """The op on torch tensors or numpy arrays; returns a torch tensor of the query's dtype."""
    tensors = [torch.as_tensor(np.asarray(t)) if not isinstance(t, torch.Tensor) else t
               for t in (query, key, value, past_lens, causal_len, num_blocks, block_len, first_visible,
                         visible_stride)]
    query, key, value, past_lens, *scalars = tensors
    contract.check_attributes(num_heads, num_kv_heads, head_dim, scale)
    contract.check_shapes({name: tuple(t.shape) for name, t in zip(contract.INPUTS, tensors)},
                          num_heads, num_kv_heads, head_dim)
    group = num_heads // num_kv_heads
    new, kv_len = query.shape[2], key.shape[2]
    mask = visible(torch.arange(new)[None, :, None], torch.arange(kv_len)[None, None, :],
                   past_lens.long()[:, None, None], *(int(s) for s in scalars))[:, None]  # [batch, 1, new, kv_len]
    keys = key.double().repeat_interleave(group, dim=1)
    values = value.double().repeat_interleave(group, dim=1)
    scores = (query.double() @ keys.transpose(2, 3)) * scale
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (weights @ values).to(query.dtype)


class hybrid_attention(OpRun):  # noqa: N801 (the reference evaluator finds the node by this name)
    """`tidar::hybrid_attention` for onnx.reference.ReferenceEvaluator."""

    op_domain = "tidar"

    def _run(self, query, key, value, past_lens, causal_len, num_blocks, block_len, first_visible, visible_stride,
             num_heads=None, num_kv_heads=None, head_dim=None, scale=None):
        attributes = {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim, "scale": scale}
        missing = [name for name in contract.ATTRIBUTES if attributes[name] is None]
        if missing:
            raise ValueError(f"tidar::hybrid_attention node without attribute(s) {', '.join(missing)}")
        for name in ("num_heads", "num_kv_heads", "head_dim"):  # numpy scalars, as the evaluator gives them
            attributes[name] = int(attributes[name])
        attributes["scale"] = float(attributes["scale"])
        out = attend(query, key, value, past_lens, causal_len, num_blocks, block_len, first_visible, visible_stride,
                     **attributes)
        return (out.numpy(),)


def trtllm_layer(query, key, value, past_lens, causal_len, num_blocks, block_len, first_visible, visible_stride, *,
                 num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
    """Stands in for `hybrid_attention_trtllm` (same signature) in the TensorRT-LLM stand-in network."""
    inputs = (query, key, value, past_lens, causal_len, num_blocks, block_len, first_visible, visible_stride)
    trtllm_plugin._check(inputs, num_heads, num_kv_heads, head_dim, scale)
    out = attend(*inputs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, scale=scale)
    return out.as_subclass(type(query))
