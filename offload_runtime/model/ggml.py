"""GGML block types (what GGUF files store): their sizes, dequantizing them with torch ops, and a layer's "use" of a
linear kept in them.

A GGUF linear W [N, K] is N rows of K / E blocks each; a block holds E weights in B bytes (E = 32 for the legacy
types, 256 for the K-quants' super-blocks). The runtime keeps such a linear exactly as the file stores it, as
uint8 [N, K / E * B] under the name `{linear}.{type key}` (`self_attn.q_proj.q4_k`), so a layer's buffer holds the
file's own bytes and the type travels in the name. A float linear (F32, F16, BF16: E = 1) is kept as its bytes
too, so a sweep moves what the file holds whatever the compute dtype. Blocks (little-endian, fp16 scales),
following ggml-common.h:

    Q4_0  d, qs[16]                      w = d (q - 8);      q: low nibbles of qs are weights 0..15, high 16..31
    Q4_1  d, m, qs[16]                   w = d q + m
    Q5_0  d, qh[4], qs[16]               w = d (q - 16);     bit j of qh (as a little-endian u32) is q_j's 5th bit
    Q5_1  d, m, qh[4], qs[16]            w = d q + m
    Q8_0  d, qs[32] (int8)               w = d q
    Q4_K  d, dmin, scales[12], qs[128]   w = d sc_j q - dmin m_j over 8 sub-blocks j of 32 (6-bit sc, m packed)
    Q5_K  d, dmin, scales[12], qh[32], qs[128]   as Q4_K with a 5th bit: bit j of qh[i] for weight i of sub-block j
    Q6_K  ql[128], qh[64], scales[16] (int8), d  w = d sc_j (q - 32) over 16 sub-blocks of 16

Exactness: every product above is exact in float32 (an fp16 scale has 11 significant bits, a 6-bit scale and a
6-bit integer add at most 13), so each weight is one rounding of an exact value whatever the order of the
operations, and our float32 weights equal the gguf package's `gguf.quants.dequantize` bit for bit (the test
checks every type). Dequantizing into another dtype goes through float32, as transformers does (it dequantizes
with that package, then casts), so float64 runs match it too.

No weight-only int kernel reads these layouts: torch's int4 kernels want their own packed layout and
asymmetric (q - 8) * s + z groups, and its int8 kernel per-channel scales, so using them would mean repacking the
bytes (and, for Q4_0 and Q8_0, storing more of them per weight). GGUF linears always dequantize and matmul.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .quantization import split_nibbles
from .scratch import Buffer, buffers

QK_K = 256
DEQUANT_CHUNK = 1 << 24  # weights dequantized at a time: bounds the float32 temporaries of one linear


@dataclass(frozen=True)
class BlockType:
    """One GGML tensor type: its id in GGUF files, and how many weights one block of how many bytes holds."""

    name: str  # as llama.cpp spells it: "Q4_K"
    id: int
    block: int  # weights per block
    nbytes: int  # bytes per block

    @property
    def key(self) -> str:
        """The suffix of a linear kept in this type, in a layer's tensor names."""
        return self.name.lower()

    @property
    def is_float(self) -> bool:
        return self.block == 1

    def row_bytes(self, k: int) -> int:
        assert k % self.block == 0, (self.name, k)
        return k // self.block * self.nbytes


FLOAT_TYPES = {t.id: t for t in (BlockType("F32", 0, 1, 4), BlockType("F16", 1, 1, 2), BlockType("BF16", 30, 1, 2))}
BLOCK_TYPES = {t.id: t for t in (
    BlockType("Q4_0", 2, 32, 18), BlockType("Q4_1", 3, 32, 20), BlockType("Q5_0", 6, 32, 22),
    BlockType("Q5_1", 7, 32, 24), BlockType("Q8_0", 8, 32, 34), BlockType("Q4_K", 12, QK_K, 144),
    BlockType("Q5_K", 13, QK_K, 176), BlockType("Q6_K", 14, QK_K, 210))}
SUPPORTED_TYPES = {**FLOAT_TYPES, **BLOCK_TYPES}  # by GGUF type id
BY_KEY = {t.key: t for t in SUPPORTED_TYPES.values()}  # a float linear (F16 ...) keeps the file's bytes too
BY_NAME = {t.name: t for t in SUPPORTED_TYPES.values()}
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def supported_names() -> str:
    return ", ".join(t.name for t in sorted(SUPPORTED_TYPES.values(), key=lambda t: t.id))


def ggml_name(linear: str, type_name: str) -> str:
    """The name, in a layer's buffer, of `linear` kept in GGML type `type_name`: `self_attn.q_proj.q4_k`."""
    return f"{linear}.{BY_NAME[type_name].key}"


def ggml_shape(type_name: str, out_features: int, in_features: int) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of a linear's bytes in a layer's buffer: uint8 [N, row bytes], as the file stores them."""
    return (out_features, BY_NAME[type_name].row_bytes(in_features)), torch.uint8


# --- dequantizing, per block type (blocks: uint8 [R, n, B] -> float32 [R, n, E])
#
# Each type's integers are built in uint8 scratch (bit ops write into slices of one buffer), converted once into
# a float32 buffer, and scaled there in place: every pass runs over one dtype, as quantization.dequantize's do,
# and with `reuse` the buffers are this thread's scratch (model/scratch.py). The float ops run in the order of the
# formulas above, so each weight is still one rounding of its exact value.


def _half(b: torch.Tensor, buffer: Buffer, role: str = "scale") -> torch.Tensor:
    """Two bytes per block (the trailing dim) -> their fp16 value as float32 [R, n, 1]."""
    try:
        half = b.view(torch.float16)
    except RuntimeError:  # a byte offset that is not 2-aligned: the view needs a copy
        half = b.contiguous().view(torch.float16)
    return buffer(role, tuple(half.shape), torch.float32).copy_(half)


def _floats(ints: torch.Tensor, buffer: Buffer) -> torch.Tensor:
    return buffer("work", tuple(ints.shape), torch.float32).copy_(ints)


def _fields(x: torch.Tensor, width: int, shifts: Sequence[int], out: torch.Tensor) -> torch.Tensor:
    """out[..., i, :] = the `width`-bit field of the bytes x [..., L] at bit shifts[i] (out [..., len(shifts), L]).
    One shift by a number per field: a shift by a tensor of amounts runs element by element, about twice as slow."""
    mask = (1 << width) - 1
    for i, shift in enumerate(shifts):
        part = out[..., i, :]
        if shift == 0:
            torch.bitwise_and(x, mask, out=part)
        else:
            torch.bitwise_right_shift(x, shift, out=part)
            if shift + width < 8:
                part.bitwise_and_(mask)
    return out


@functools.cache
def _fifth_bit_table(device: torch.device) -> torch.Tensor:
    """[256, 8] uint8: bit j of byte value v, as 0 or 16 (a weight's fifth bit), at [v, j]."""
    with torch.inference_mode(False):  # kept across calls in and out of inference mode
        bits = torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)
        return ((bits & 1) << 4).to(torch.uint8)


def _fifth_bits(x: torch.Tensor, buffer: Buffer) -> torch.Tensor:
    """Bytes x [..., L] -> [..., L, 8]: bit j of byte i as 0 or 16 at [..., i, j]. A row lookup per byte: eight
    shift-and-mask passes (_fields) made Q5_0 half again as slow."""
    index = buffer("index", (x.numel(),), torch.int64).copy_(x.reshape(-1))
    out = buffer("bits", (*x.shape, 8), torch.uint8)
    torch.index_select(_fifth_bit_table(x.device), 0, index, out=out.view(-1, 8))
    return out


def _q4_0(b: torch.Tensor, buffer: Buffer) -> torch.Tensor:
    return _floats(split_nibbles(b[..., 2:18], buffer), buffer).sub_(8).mul_(_half(b[..., 0:2], buffer))


def _q4_1(b: torch.Tensor, buffer: Buffer) -> torch.Tensor:
    d, m = _half(b[..., 0:2], buffer), _half(b[..., 2:4], buffer, "min")
    return _floats(split_nibbles(b[..., 4:20], buffer), buffer).mul_(d).add_(m)


def _q5_0(b: torch.Tensor, buffer: Buffer) -> torch.Tensor:
    q = split_nibbles(b[..., 6:22], buffer).bitwise_or_(_fifth_bits(b[..., 2:6], buffer).flatten(-2))
    return _floats(q, buffer).sub_(16).mul_(_half(b[..., 0:2], buffer))


def _q5_1(b: torch.Tensor, buffer: Buffer) -> torch.Tensor:
    d, m = _half(b[..., 0:2], buffer), _half(b[..., 2:4], buffer, "min")
    q = split_nibbles(b[..., 8:24], buffer).bitwise_or_(_fifth_bits(b[..., 4:8], buffer).flatten(-2))
    return _floats(q, buffer).mul_(d).add_(m)


def _q8_0(b: torch.Tensor, buffer: Buffer) -> torch.Tensor:
    return _floats(b[..., 2:34].view(torch.int8), buffer).mul_(_half(b[..., 0:2], buffer))


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes 4..15 of a Q4_K / Q5_K block -> (d * scales, dmin * mins) [R, n, 8, 1]. Six bits each: bytes 4-7 hold
    scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7, bytes 8-11 the same for the mins, bytes 12-15 the
    low nibbles of scales 4-7 (low) and of mins 4-7 (high)."""
    d, m, md = b[..., 4:8], b[..., 8:12], b[..., 12:16]
    scales = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mins = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    halves = b[..., 0:4].contiguous().view(torch.float16).float()  # d, dmin
    return (halves[..., 0:1] * scales.float())[..., None], (halves[..., 1:2] * mins.float())[..., None]


def _k_low(qs: torch.Tensor, buffer: Buffer) -> torch.Tensor:
    """128 bytes [R, n, 128] -> [R, n, 8, 32] (uint8): sub-block 2i is the low nibbles of bytes 32i..32i+31, 2i+1
    their high nibbles."""
    R, n = qs.shape[:2]
    return _fields(qs.view(R, n, 4, 32), 4, (0, 4), buffer("ints", (R, n, 4, 2, 32), torch.uint8)).view(R, n, 8, 32)


def _q4_k(b: torch.Tensor, buffer: Buffer) -> torch.Tensor:
    d, m = _k_scales(b)
    return _floats(_k_low(b[..., 16:144], buffer), buffer).mul_(d).sub_(m).flatten(-2)


def _q5_k(b: torch.Tensor, buffer: Buffer) -> torch.Tensor:
    d, m = _k_scales(b)
    q = _k_low(b[..., 48:176], buffer)
    q.bitwise_or_(_fifth_bits(b[..., 16:48], buffer).transpose(-1, -2))  # bit j of byte i: weight i of sub-block j
    return _floats(q, buffer).mul_(d).sub_(m).flatten(-2)


def _q6_k(b: torch.Tensor, buffer: Buffer) -> torch.Tensor:
    R, n = b.shape[:2]
    # Each half of the block's 256 weights: 64 bytes of low nibbles (weights 0-63, then 64-127 from the high
    # nibbles) and 32 bytes of 2-bit pairs (weights i, 32 + i, 64 + i, 96 + i of the half from byte i).
    low = _fields(b[..., 0:128].reshape(R, n, 2, 64), 4, (0, 4), buffer("ints", (R, n, 2, 2, 64), torch.uint8))
    high = _fields(b[..., 128:192].reshape(R, n, 2, 32), 2, (0, 2, 4, 6),
                   buffer("bits", (R, n, 2, 4, 32), torch.uint8))
    q = low.view(R, n, QK_K).bitwise_or_(high.bitwise_left_shift_(4).view(R, n, QK_K))
    d = _half(b[..., 208:210], buffer) * b[..., 192:208].view(torch.int8).float()  # one scale per 16 weights
    return _floats(q.view(R, n, 16, 16), buffer).sub_(32).mul_(d[..., None]).view(R, n, QK_K)


_DEQUANT = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0, "Q4_K": _q4_k,
            "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(blocks: torch.Tensor, kind: BlockType, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None, reuse: bool = False) -> torch.Tensor:
    """uint8 [N, K / E * B] rows of blocks -> W [N, K] in `dtype` (worked in float32, rounded once; any device).

    Rows go `DEQUANT_CHUNK` weights at a time into the output, so the float32 temporaries stay bounded. With
    `reuse` the temporaries and (without `out`) W itself live in this thread's scratch buffers: W is valid until
    the next such call (model/scratch.py); a float linear already in `dtype` is then its own bytes, viewed."""
    assert blocks.dtype == torch.uint8 and blocks.dim() == 2 and blocks.shape[1] % kind.nbytes == 0, \
        (blocks.dtype, blocks.shape, kind)
    N, n = blocks.shape[0], blocks.shape[1] // kind.nbytes
    K = n * kind.block
    if kind.is_float and reuse and out is None and FLOAT_DTYPES[kind.name] == dtype:
        return blocks.view(dtype)
    buffer = buffers(blocks.device, reuse)
    if out is None:
        out = buffer("weight", (N, K), dtype)
    assert out.shape == (N, K) and out.dtype == dtype, (out.shape, out.dtype)
    if kind.is_float:
        return out.copy_(blocks.view(FLOAT_DTYPES[kind.name]))
    fn = _DEQUANT[kind.name]
    rows = max(1, DEQUANT_CHUNK // max(1, K))
    for r0 in range(0, N, rows):
        chunk = fn(blocks[r0: r0 + rows].view(-1, n, kind.nbytes), buffer).view(-1, K)
        out[r0: r0 + rows].copy_(chunk)
    return out


# --- the use step


def block_type_of(w: Mapping[str, torch.Tensor], name: str) -> BlockType | None:
    """The block type linear `name` of layer weights `w` is kept in (None: not a GGUF linear)."""
    return next((t for key, t in BY_KEY.items() if f"{name}.{key}" in w), None)


def ggml_linear(x: torch.Tensor, w: Mapping[str, torch.Tensor], name: str, kind: BlockType,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) for linear `name` kept in GGML blocks of type `kind`: dequantize, then the matmul."""
    return F.linear(x, dequantize(w[f"{name}.{kind.key}"], kind, x.dtype, reuse=True), bias)
