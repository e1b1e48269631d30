"""Reference TiDAR transformer in PyTorch: Qwen2, Qwen3 and Llama backbones.

Parameter names equal those of Hugging Face `transformers`, so a checkpoint's safetensors
load as they are. Numerics follow transformers (RMSNorm and softmax in fp32, RoPE tables in
fp32), so logits agree with `AutoModelForCausalLM` to fp32 round-off.

One forward runs over the new tokens of a `Layout` on top of an optional `KVCache`: the new
tokens' keys and values are written into the cache slots after each row's cached length
(nothing is committed; see cache.py) and attention uses the layout's mask. Attention has
four interchangeable implementations, all lowered from the same layout:
  eager   dense boolean mask, explicit softmax (the reference)
  sdpa    dense boolean mask through torch's scaled_dot_product_attention
  flex    FlexAttention with the layout's mask_mod (optionally torch.compile'd)
  triton  the hybrid-mask kernel of tidar.plugins, given the layout's scalars and the rows'
          past lengths (CUDA; on the CPU only under TRITON_INTERPRET=1, slowly, for tests)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import TiDARConfig
from .layout import Layout

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flex", "flex-compiled", "triton")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inverse_frequencies(config: TiDARConfig) -> torch.Tensor:
    """Inverse frequencies of RoPE for the config's theta and scaling (default, linear, llama3)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # Llama 3: long wavelengths are divided by `factor`, short ones kept, the band between smoothed.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class AttentionPlan:
    """What every layer of one forward shares: the lowered mask and where K/V go."""

    layout: Layout
    past_lens: torch.Tensor  # [B] cached length of each row (slots before the new tokens)
    kv_len: int  # slots attended over: max(past_lens) + num_new
    mask: Any  # dense bool [B, 1, Q, kv_len], a FlexAttention BlockMask, or (past_lens, *layout scalars)
    write_slots: torch.Tensor | None  # [B, Q] cache slot of each new token (None: no cache)


class Attention(nn.Module):
    def __init__(self, config: TiDARConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.has_qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, plan: AttentionPlan, cache: KVCache | None, layer: int, attend: Callable):
        batch, num_new, _ = x.shape
        q = self.q_proj(x).view(batch, num_new, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, num_new, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, num_new, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, Q, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            keys, values = cache.write(layer, plan.write_slots, k, v, plan.kv_len)
        else:
            keys, values = k, v
        out = attend(q, keys, values, plan.mask, self.head_dim ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(batch, num_new, -1))


class MLP(nn.Module):
    def __init__(self, config: TiDARConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TiDARConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, plan, cache, layer, attend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, plan, cache, layer, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: TiDARConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ---------------------------------------------------------------- attention implementations
def _expand_kv(keys: torch.Tensor, heads: int) -> torch.Tensor:
    repeat = heads // keys.shape[1]
    return keys if repeat == 1 else keys.repeat_interleave(repeat, dim=1)


def eager_attention(q, k, v, mask, scale):
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def sdpa_attention(q, k, v, mask, scale):
    """PyTorch's fused attention. On CPU grouped-query heads go to the kernel as they are
    (`enable_gqa`): bit-identical to expanding K/V first (tests/test_model.py), without copying
    the whole attended cache once per layer and step. On CUDA K/V are expanded, because with a boolean mask only the math
    kernel takes `enable_gqa` and the memory-efficient one does not."""
    if q.device.type == "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


_compiled_flex: Callable | None = None


def _flex_attention(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if not compiled:
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


def _triton_kernel():
    """The plugin module of the hybrid-mask kernel (imported on first use: it needs triton)."""
    try:
        from ..plugins import hybrid_attention
    except ImportError as error:
        raise ModuleNotFoundError(f"attention 'triton' needs the triton package (pip install 'tidar-trt[kernel]'): "
                                  f"{error}", name=error.name) from error
    return hybrid_attention


def gather_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """tensor [B, Q, ...] at `rows` [B, R] (per batch row indices along Q): [B, R, ...]."""
    index = rows.to(tensor.device).reshape(*rows.shape, *([1] * (tensor.dim() - 2)))
    return tensor.gather(1, index.expand(*rows.shape, *tensor.shape[2:]))


class TiDARModel(nn.Module):
    """The TiDAR transformer: one LM head for AR and diffusion logits alike."""

    def __init__(self, config: TiDARConfig, attention: str = "eager"):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Kept in fp32 outside the module's buffers, so `.to(dtype)` never rounds the RoPE table.
        self.inv_freq = rope_inverse_frequencies(config)
        self._inv_freq_copies: dict[torch.device, torch.Tensor] = {}  # `rope_frequencies`
        self.set_attention(attention)

    def set_attention(self, attention: str) -> None:
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {attention!r}; "
                             f"choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        if attention == "triton":
            _triton_kernel()
        self.attention = attention

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def plan(self, layout: Layout, past_lens: torch.Tensor, cache: KVCache | None,
             kv_len: int | None = None) -> AttentionPlan:
        """Lower the layout once for all layers of a forward. Without a cache the keys are the new
        tokens alone, in slots [0, num_new): the mask then addresses slots with a past of 0, while
        `past_lens` still offsets the position ids. `kv_len` is the number of slots attended over:
        by default the longest cached row plus the new tokens (host-side, so it changes from step
        to step); a caller that needs one shape for every step (a CUDA graph, cuda_graphs.py)
        passes the cache capacity, and checks itself that the rows' new tokens fit: every lowering
        hides the slots after a row's new tokens, so the wider window changes no output."""
        if kv_len is None:
            kv_len = (cache.max_length() if cache is not None else 0) + layout.num_new  # host-side: no device sync
        write_slots = None
        if cache is not None:
            if kv_len > cache.capacity:
                raise ValueError(f"KV cache capacity {cache.capacity} is too small for {kv_len} slots")
            write_slots = past_lens[:, None] + torch.arange(layout.num_new, device=past_lens.device)
            slot_past = past_lens
        else:
            slot_past = torch.zeros_like(past_lens)
        if self.attention.startswith("flex"):
            from torch.nn.attention.flex_attention import create_block_mask

            mask = create_block_mask(layout.mask_mod(slot_past), past_lens.shape[0], None, layout.num_new,
                                     kv_len, device=past_lens.device)
        elif self.attention == "triton":
            _triton_kernel().check_device(past_lens.device)
            mask = (slot_past, *layout.kernel_scalars().values())  # the kernel computes the mask itself
        else:
            mask = layout.dense_mask(slot_past, kv_len)[:, None]
        return AttentionPlan(layout, past_lens, kv_len, mask, write_slots)

    def _attend(self) -> Callable:
        if self.attention == "eager":
            return eager_attention
        if self.attention == "sdpa":
            return sdpa_attention
        if self.attention == "triton":
            kernel = _triton_kernel().hybrid_attention
            return lambda q, k, v, mask, scale: kernel(q, k, v, *mask, scale=scale)
        flex = _flex_attention(self.attention == "flex-compiled")
        return lambda q, k, v, mask, scale: flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)

    def rope_frequencies(self, device: torch.device) -> torch.Tensor:
        """The fp32 RoPE inverse frequencies on `device`, copied there once (a copy from the host
        inside a forward would wait for the device, which a CUDA graph capture forbids)."""
        if device not in self._inv_freq_copies:
            self._inv_freq_copies[device] = self.inv_freq.to(device)
        return self._inv_freq_copies[device]

    def hidden_states(self, input_ids: torch.Tensor, layout: Layout, cache: KVCache | None = None,
                      past_lens: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:
        """Final-norm hidden states of the new tokens, [B, Q, hidden]. `kv_len`: see `plan`."""
        batch, num_new = input_ids.shape
        if num_new != layout.num_new:
            raise ValueError(f"{num_new} input tokens for a layout of {layout.num_new}")
        if past_lens is None:
            past_lens = cache.lengths if cache is not None else torch.zeros(batch, dtype=torch.long,
                                                                               device=input_ids.device)
        plan = self.plan(layout, past_lens, cache, kv_len)
        position_ids = layout.position_ids(past_lens)
        inv_freq = self.rope_frequencies(position_ids.device)
        freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos().to(self.dtype)[:, None], angles.sin().to(self.dtype)[:, None]
        attend = self._attend()
        x = self.model.embed_tokens(input_ids)
        for index, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, plan, cache, index, attend)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, layout: Layout, cache: KVCache | None = None,
                past_lens: torch.Tensor | None = None, logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, Q, vocab] of the new tokens, or with `logits_rows` [B, R] (indices among the
        new tokens) only those rows, [B, R, vocab]: the LM head runs on them alone. With a cache,
        the new tokens' K/V are written after each row's cached length but not committed (call
        `cache.commit`)."""
        hidden = self.hidden_states(input_ids, layout, cache, past_lens)
        return self.lm_head(hidden if logits_rows is None else gather_rows(hidden, logits_rows))

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, capacity, c.head_dim,
                       dtype=self.dtype, device=self.device)
