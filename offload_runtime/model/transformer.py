"""The Llama-family forward pass over weights handed in from outside, one decoder layer at a time.

Decoder-layer weights are plain mappings `{"self_attn.q_proj.weight": tensor, ...}` (names relative to
`model.layers.{i}.`) produced by a `LayerSource`: resident tensors for the draft, slots filled by the copy
stream for a streamed target. Attention takes an explicit boolean mask, so one forward can verify a whole
token tree: each new token sees the cached prefix and its own ancestors.

Numerics follow transformers on purpose, including its quirks (RoPE angles in float32, RMSNorm statistics in
float32 whatever the model dtype), so float64 logits match the reference to ~1e-12.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Protocol

import torch
import torch.nn.functional as F

from .batch import ForwardBatch
from .config import ModelArgs
from .kv_cache import KVCache
from .ggml import block_type_of, ggml_linear
from .quantization import FUSED, KernelChoice, quantized_linear

LayerWeights = Mapping[str, torch.Tensor]


class LayerSource(Protocol):
    """Yields every decoder layer's weights in order, ready for compute on the compute stream.

    A source may do work between yields (record events, issue the next copy); the consumer asks for layer
    i+1 only after it has enqueued all compute that reads layer i.
    """

    def sweep(self) -> Iterator[tuple[int, LayerWeights]]: ...


class ResidentLayers:
    """All decoder layers already where compute runs (the draft model, or a target that fits)."""

    def __init__(self, layers: list[dict[str, torch.Tensor]]):
        self.layers = layers

    def sweep(self) -> Iterator[tuple[int, LayerWeights]]:
        yield from enumerate(self.layers)


@dataclass
class GlobalWeights:
    embed: torch.Tensor  # [V, D]
    norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D]; the embedding itself when tied
    lm_head_packed: torch.Tensor | None = None  # lm_head in oneDNN's blocked layout (packed_head), or None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] normed -> logits [..., V]."""
        if self.lm_head_packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.lm_head_packed, None, "none", [], "")
        return F.linear(x, self.lm_head)


def packs_head(dtype: torch.dtype, device_type: str) -> bool:
    """Whether a head in `dtype` on this kind of device gets a pre-blocked copy (packed_head, where its probe
    passes): bfloat16 on the CPU. Memory budgets count the copy wherever this says so."""
    return device_type == "cpu" and dtype == torch.bfloat16


def packed_head(lm_head: torch.Tensor) -> torch.Tensor | None:
    """lm_head laid out once in oneDNN's blocked format, for bfloat16 on the CPU; None elsewhere.

    At one decoded token the head is the largest single matmul of a small model, and torch's bf16 F.linear on the
    CPU runs it at half the speed of the same oneDNN matmul on a pre-blocked weight (SmolLM2-135M's 49152 x 576
    head at 2 threads: 5.1 vs 2.7 ms). It is a second copy of the head in host RAM, used only where a probe shows
    each row's logits independent of the rows beside it, so that a token scores the same alone or in a tree
    (F.linear's 16-bit rows are not, on some CPUs and shapes; where the probe fails, F.linear it is)."""
    if not packs_head(lm_head.dtype, lm_head.device.type) or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(lm_head, 1)
    except (RuntimeError, AttributeError):  # a torch or CPU without these ops: the plain matmul
        return None
    g = torch.Generator().manual_seed(0)
    probe = GlobalWeights(lm_head, lm_head[0], lm_head, packed)
    with torch.inference_mode():
        for rows in (2, 3, 5, 17, 64):
            x = torch.randn(rows, lm_head.shape[1], generator=g).to(lm_head.dtype)
            if not torch.equal(probe.logits(x), torch.cat([probe.logits(x[i:i + 1]) for i in range(rows)])):
                return None
    return packed


# --- rotary embeddings


def rope_inv_freq(args: ModelArgs, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in float32, with linear or llama3 scaling as transformers computes them."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling
    if scaling is None:
        pass
    elif scaling["rope_type"] == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling["rope_type"] == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    else:  # config.py rejects other types
        raise AssertionError(scaling)
    return inv_freq.to(device)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, head_dim] for positions [B, T]; angles in float32 like the reference. The first half of
    `sin` is negated: rotate_half's sign folded in once per forward (see apply_rope)."""
    freqs = positions[..., None].float() * inv_freq.float()
    sin = freqs.sin()
    return torch.cat((freqs, freqs), dim=-1).cos().to(dtype)[:, None], torch.cat((-sin, sin), dim=-1).to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin, as transformers computes it, with the sign of rotate_half(x) = cat(-x2, x1)
    carried by `sin` (rope_cos_sin): (-a) b and a (-b) are the same float, so the bits are the reference's, in
    fewer ops per layer."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


# --- attention masks
#
# A forward has at most two masks: the batch's full one and, once a sliding window bites, its windowed one
# (ForwardBatch.window_mask); each layer uses the one its config names (ModelArgs.slides), and each mask is
# turned into a layer mask once per forward, not once per layer.
#
# A layer's mask is additive, [B, 1, G*T, S] with G = H / H_kv query heads per K/V head ("folded"): the G query
# heads that share a K/V head are laid along the query axis, so attention runs with H_kv heads and no K/V
# expansion. On CUDA that is what keeps a tree's attention in the memory-efficient kernel: flash attention takes no
# mask and the memory-efficient kernel takes no grouped heads, so enable_gqa with a mask falls to the math path,
# which forms the whole [B, H, T, S] score matrix (over a gigabyte per layer for a 1024-node tree on 70B at 4k
# context). On the CPU, the flash kernel runs the folded layout faster at every size measured: ~2x for one
# decoded token (SmolLM2-135M's 9 / 3 heads, 40 keys: 28 vs 59 us), ~1.2x for 16-256-node trees. Multi-head
# models (G = 1) take the additive mask too: SDPA turns a boolean mask into that same 0 / -inf mask in every call,
# which is the same bits once per forward instead of once per layer.


def layer_mask(args: ModelArgs, mask: torch.Tensor, dtype: torch.dtype, fold: bool = True) -> torch.Tensor:
    """The mask every decoder layer of one forward uses, built once per forward (not per layer). fold=False keeps
    the boolean mask [B, 1, T, S] (attention by enable_gqa: the unfolded reference the tests compare with)."""
    if not fold:
        return mask
    G = args.n_heads // args.n_kv_heads
    B, _, T, S = mask.shape
    # Rows 16-aligned in memory: the memory-efficient kernel would otherwise pad a copy in every layer.
    width = -(-S // 16) * 16
    bias = torch.zeros(B, 1, G * T, width, dtype=dtype, device=mask.device)[..., :S]
    bias.view(B, 1, G, T, S).masked_fill_(~mask[:, :, None], float("-inf"))  # row g * T + t is token t's
    return bias


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh) + mask) v over [B, H, T, Dh] queries and [B, H_kv, S, Dh] keys and values."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # The CPU kernels round a query's 16-bit output by how many queries and masked keys share the call, enough
        # to flip a greedy token between plain decoding and a verified tree. In float64 the differences are far
        # below a 16-bit rounding step, so each row's result no longer depends on its neighbours.
        wide = mask if mask.dtype == torch.bool else mask.to(torch.float64)
        return _attend(q.to(torch.float64), k.to(torch.float64), v.to(torch.float64), wide).to(q.dtype)
    B, H, T, Dh = q.shape
    H_kv = k.shape[1]
    if mask.dtype == torch.bool:  # [B, 1, T, S]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H_kv != H)
    G = H // H_kv
    assert mask.shape[-2] == G * T and mask.dtype == q.dtype, (mask.shape, mask.dtype, q.shape)
    # Query heads h = j * G + g share K/V head j (transformers' repeat_kv order).
    out = F.scaled_dot_product_attention(q.reshape(B, H_kv, G * T, Dh), k, v, attn_mask=mask)
    # reshape, not view: CUDA's memory-efficient kernel returns [B, G*T, H_kv, Dh] memory seen transposed.
    return out.reshape(B, H, T, Dh)


# --- layers


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (h rsqrt(mean(h^2) + eps)).to(x.dtype), h = x in float32, as transformers computes it (float64
    included: its statistics are taken in float32 too). torch's rms_norm gives those bits in one op on the CPU,
    and takes 16-bit input as it is, computing in float32 and rounding once (tests/test_model.py checks both)."""
    if x.dtype != torch.float64:
        return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)
    return weight * F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=eps).to(x.dtype)


def _linear(x: torch.Tensor, w: LayerWeights, name: str, kernel: KernelChoice | None = None) -> torch.Tensor:
    """The one place a layer's weights are used, on x [M, K]: a float matmul, a quantized linear
    (model/quantization.py) by the int kernel or dequantize + matmul, as `kernel` says for this many tokens, or a
    GGUF linear kept in the file's blocks (model/ggml.py: dequantize + matmul)."""
    weight = w.get(name + ".weight")
    if weight is not None:
        return F.linear(x, weight, w.get(name + ".bias"))
    if name + ".qweight" in w:
        return quantized_linear(x, w, name, kernel, w.get(name + ".bias"))
    kind = block_type_of(w, name)
    assert kind is not None, f"layer weights hold no form of {name}"
    return ggml_linear(x, w, name, kind, w.get(name + ".bias"))


def _linears(x: torch.Tensor, w: LayerWeights, fused: str, kernel: KernelChoice | None) -> torch.Tensor:
    """The outputs of the linears FUSED[fused] over the same x [M, K], side by side [M, sum of their widths]: one
    call on their stacked packed linear where the layer holds one (quantized layers: model/quantization.py
    stored_linears), else one call each, concatenated. Biases are each part's (added as one stacked vector: the
    same sums)."""
    parts = FUSED[fused]
    if fused + ".qweight" not in w:
        return torch.cat([_linear(x, w, p, kernel) for p in parts], dim=-1)
    y = quantized_linear(x, w, fused, kernel)
    if parts[0] + ".bias" in w:  # a model has all of a stacked linear's biases or none (ModelArgs)
        y = y + torch.cat([w[p + ".bias"] for p in parts])
    return y


@functools.lru_cache(maxsize=64)
def _batch_rows(B: int, device: torch.device) -> torch.Tensor:
    """[B, 1] row indices for the KV-cache writes (made once per batch size, not once per layer; never written)."""
    return torch.arange(B, device=device)[:, None]


def attention(
    args: ModelArgs,
    w: LayerWeights,
    x: torch.Tensor,  # [B*T, D], already normed
    cos: torch.Tensor,
    sin: torch.Tensor,  # [B, 1, T, Dh]
    mask: torch.Tensor,  # [B, 1, G*T, S] additive (layer_mask), or [B, 1, T, S] bool (unfolded)
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,  # [B, H_kv, S_max + 1, Dh]
    slots: torch.Tensor,  # [B, T] where the new K/V go in cache rows 0..B-1
    kernel: KernelChoice | None = None,
) -> torch.Tensor:
    B, T = slots.shape
    H, H_kv = args.n_heads, args.n_kv_heads
    qkv = _linears(x, w, "self_attn.qkv_proj", kernel).view(B, T, H + 2 * H_kv, args.head_dim)
    qk, v = qkv[:, :, :H + H_kv], qkv[:, :, H + H_kv:]
    if args.qk_norm:  # Qwen3: each head normalised on its own, before RoPE
        qk = torch.cat((rms_norm(qk[:, :, :H], w["self_attn.q_norm.weight"], args.rms_norm_eps),
                        rms_norm(qk[:, :, H:], w["self_attn.k_norm.weight"], args.rms_norm_eps)), dim=2)
    qk = apply_rope(qk.transpose(1, 2), cos, sin)  # queries and keys rotated in one pass: [B, H + H_kv, T, Dh]
    q, k = qk[:, :H], qk[:, H:]
    rows = _batch_rows(B, slots.device)
    # Advanced indices around a slice put the indexed dims first: the target view is [B, T, H_kv, Dh].
    k_cache[rows, :, slots] = k.transpose(1, 2)
    v_cache[rows, :, slots] = v
    S = mask.shape[-1]
    out = _attend(q, k_cache[:B, :, :S], v_cache[:B, :, :S], mask)  # [B, H, T, Dh]
    return _linear(out.transpose(1, 2).reshape(B * T, args.q_size), w, "self_attn.o_proj", kernel)


def mlp(args: ModelArgs, w: LayerWeights, x: torch.Tensor, kernel: KernelChoice | None = None) -> torch.Tensor:
    gate_up = _linears(x, w, "mlp.gate_up_proj", kernel)
    width = args.intermediate_size
    return _linear(F.silu(gate_up[:, :width]) * gate_up[:, width:], w, "mlp.down_proj", kernel)


def decoder_layer(args: ModelArgs, w: LayerWeights, x: torch.Tensor, cos, sin, mask, k_cache, v_cache, slots,
                  kernel: KernelChoice | None = None) -> torch.Tensor:
    """One decoder layer over x [B*T, D]: the batch's tokens as rows (slots [B, T] gives the split), so every
    linear takes its input as it is."""
    h = x + attention(args, w, rms_norm(x, w["input_layernorm.weight"], args.rms_norm_eps), cos, sin, mask,
                      k_cache, v_cache, slots, kernel)
    return h + mlp(args, w, rms_norm(h, w["post_attention_layernorm.weight"], args.rms_norm_eps), kernel)


# --- the whole model


class Transformer:
    """Embeddings and head (resident) plus a LayerSource for the decoder layers."""

    def __init__(self, args: ModelArgs, globals_: GlobalWeights, layers: LayerSource, device: torch.device,
                 kernel: KernelChoice | None = None):
        self.args = args
        self.kernel = kernel  # quantized layers: up to how many tokens the int kernel runs (model/quantization.py)
        self.globals = globals_
        self.layers = layers
        self.device = torch.device(device)
        self.dtype = globals_.embed.dtype
        self.inv_freq = rope_inv_freq(args, self.device)
        self.fold_groups = True  # the additive mask layout (layer_mask); tests turn it off for the unfolded reference
        self.mask_kinds = {args.slides(i) for i in range(args.n_layers)}  # which of the two masks layers use

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Logits [B, N, V] at the positions `logits_at` names; writes every token's K/V into `cache`."""
        args = self.args
        assert batch.tokens.shape == batch.positions.shape == batch.slots.shape
        assert batch.mask.dtype == torch.bool and batch.mask.shape[:3] == (batch.tokens.shape[0], 1, batch.tokens.shape[1])
        assert batch.mask.shape[-1] <= cache.max_len + 1
        assert batch.window_mask is None or batch.window_mask.shape == batch.mask.shape
        B, T = batch.tokens.shape
        x = F.embedding(batch.tokens.view(B * T), self.globals.embed)  # [B*T, D]
        cos, sin = rope_cos_sin(self.inv_freq, batch.positions, self.dtype)
        masks = self._layer_masks(batch)
        for i, w in self.layers.sweep():
            x = decoder_layer(args, w, x, cos, sin, masks[args.slides(i)], *cache.layer_views[i], batch.slots,
                              self.kernel)
        x = torch.gather(x.view(B, T, -1), 1, batch.logits_at[..., None].expand(-1, -1, x.shape[-1]))
        x = rms_norm(x, self.globals.norm, args.rms_norm_eps)
        return self.globals.logits(x)

    def _layer_masks(self, batch: ForwardBatch) -> dict[bool, torch.Tensor]:
        """Layer masks by whether the layer slides: each built once, and only when some layer uses it."""
        if batch.window_mask is None:  # no window bites in this forward: one mask serves every layer
            mask = layer_mask(self.args, batch.mask, self.dtype, self.fold_groups)
            return {False: mask, True: mask}
        sources = {False: batch.mask, True: batch.window_mask}
        return {kind: layer_mask(self.args, sources[kind], self.dtype, self.fold_groups) for kind in self.mask_kinds}
