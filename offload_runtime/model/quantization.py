"""Quantized linear layers: the runtime's one packed format, and how a layer computes with it.

Every quantized linear of a decoder layer, whatever it was read from (an AWQ or GPTQ checkpoint, or an fp16
checkpoint quantized on load), sits in the layer's buffer as the same four tensors (names relative to the
linear, e.g. `self_attn.o_proj`):

    .qweight  4 bits: uint8 [N / B, K, B / 2], byte b of (block j, input k) holds output rows j B + b (low
              nibble) and j B + b + B / 2 (high nibble); B is the layout's block (the CPU int4 kernel's
              when it is used, else N). 8 bits: int8 [N, K] holding q - 128.
    .scales   float16 [G, N], as the checkpoint stores them (AWQ, GPTQ) or rounded once (quantize on load)
    .zeros    int16 [G, N], the integer zero point of each group (GPTQ v1's stored-minus-one already undone)
    .g_idx    int32 [K], the group of each input column (GPTQ act-order only; otherwise column k is in group
              k // group_size)

Linears that read the same input are stored as one, their rows stacked in order (`stored_linears`):
`self_attn.qkv_proj` (q, k, v) and `mlp.gate_up_proj` (gate, up), so a decoded token makes four kernel calls
per layer instead of seven; act-order linears stay apart (each has its own g_idx).

The weight is W[n, k] = (q[n, k] - zeros[g(k), n]) * scales[g(k), n]. An integer of at most 9 bits times a
float16 is exact in float32 and float64, so dequantizing into those dtypes gives the quantized model's own
weights bit for bit; only the matmul rounds.

The "use" step (`quantized_linear`) takes one of two paths: a weight-only int kernel that reads the packed
weights directly (torch's `_weight_int4pack_mm_for_cpu`, `_weight_int4pack_mm` on CUDA, `_weight_int8pack_mm`
for per-channel int8), or dequantizing into a scratch tensor and the ordinary matmul. Which one is faster
depends on the device and on the number of tokens, so it is a measured threshold (`KernelChoice`), not a rule.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..timer import median_seconds
from .scratch import Buffer, buffers

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Linears that read the same input, stored as one packed linear with their rows stacked in this order (one kernel
# call instead of three or two: at one token a decoder layer is mostly per-call cost, not arithmetic).
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
SUPPORTED_BITS = (4, 8)
KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 kernels take
MEASURE_MAX_ROWS = 1024


@dataclass(frozen=True)
class QuantSpec:
    """How the runtime stores a model's quantized linears (see the module docstring)."""

    bits: int
    group_size: int  # -1: one group per whole input row
    act_order: bool = False  # a g_idx per linear (GPTQ desc_act)
    block: int | None = None  # 4 bits: rows paired within blocks of this many (None: the whole output dim)

    def __post_init__(self) -> None:
        assert self.bits in SUPPORTED_BITS and (self.group_size == -1 or self.group_size > 0), self

    def group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def block_for(self, out_features: int) -> int:
        return self.block if self.block and out_features % self.block == 0 else out_features

    @property
    def label(self) -> str:
        g = "channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits}-{g}{'-act_order' if self.act_order else ''}"


def stored_linears(spec: QuantSpec) -> dict[str, tuple[str, ...]]:
    """The packed linears a quantized layer holds, in layer order: stored name -> the decoder linears (LINEARS) whose
    rows it stacks. Act-order linears stay apart: each has its own g_idx, which a stacked linear could not share."""
    if spec.act_order:
        return {name: (name,) for name in LINEARS}
    out: dict[str, tuple[str, ...]] = {}
    for name in LINEARS:
        fused = next((f for f, parts in FUSED.items() if name in parts), None)
        if fused is None:
            out[name] = (name,)
        elif fused not in out:
            out[fused] = FUSED[fused]
    return out


def input_widths(dim: int, q_size: int, intermediate_size: int) -> dict[str, int]:
    """The input width of each kind of decoder linear (what a group size must divide)."""
    return {"q/k/v/gate/up_proj": dim, "o_proj": q_size, "down_proj": intermediate_size}


def check_group_size(spec: QuantSpec, in_features: dict[str, int], field: str) -> None:
    """Every linear's input width must be a whole number of groups."""
    if spec.group_size == -1:
        return
    bad = sorted(f"{n} ({k})" for n, k in in_features.items() if k % spec.group_size)
    if bad:
        fits = [str(g) for g in (256, 128, 64, 32, 16) if all(k % g == 0 for k in in_features.values())]
        raise ConfigError(f"{field} {spec.group_size} does not divide the input width of {', '.join(bad)}; "
                          f"use a group size that divides every linear's input width ({', '.join(fits + ['-1'])})")


def linear_tensors(out_features: int, in_features: int, spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The packed tensors of one quantized linear: suffix -> (shape, dtype)."""
    N, K = out_features, in_features
    G = K // spec.group(K)
    if spec.bits == 4:
        B = spec.block_for(N)
        assert K % 2 == 0 and B % 2 == 0, (N, K, B)
        q = ((N // B, K, B // 2), torch.uint8)
    else:
        q = ((N, K), torch.int8)
    tensors = {"qweight": q, "scales": ((G, N), torch.float16), "zeros": ((G, N), torch.int16)}
    if spec.act_order:
        tensors["g_idx"] = ((K,), torch.int32)
    return tensors


# --- packing and unpacking the integers


def pack_int4(q: torch.Tensor, block: int) -> torch.Tensor:
    """q [N, K] integers in 0..15 -> uint8 [N / B, K, B / 2] (the layout in the module docstring)."""
    N, K = q.shape
    blocks = q.to(torch.uint8).view(N // block, block, K).transpose(1, 2)  # [N / B, K, B]
    half = block // 2
    return (blocks[..., :half] | (blocks[..., half:] << 4)).contiguous()


def split_nibbles(packed: torch.Tensor, buffer: Buffer) -> torch.Tensor:
    """Bytes [..., L] -> uint8 [..., 2 L]: every byte's low nibble, then every byte's high nibble (the order of
    this layout's blocks and of GGML's 4-bit blocks alike)."""
    L = packed.shape[-1]
    out = buffer("nibbles", (*packed.shape[:-1], 2 * L), torch.uint8)
    torch.bitwise_and(packed, 15, out=out[..., :L])
    torch.bitwise_right_shift(packed, 4, out=out[..., L:])
    return out


def unpack_int4(packed: torch.Tensor, buffer: Buffer | None = None) -> torch.Tensor:
    """uint8 [N / B, K, B / 2] -> uint8 [N, K] in 0..15 (for one block, a transposed view: [K, N] in memory)."""
    nb, K, half = packed.shape
    buffer = buffer or buffers(packed.device, reuse=False)
    blocks = split_nibbles(packed, buffer)  # [N / B, K, B]
    if nb == 1:
        return blocks[0].t()
    rows = buffer("ints", (nb, 2 * half, K), torch.uint8).copy_(blocks.transpose(1, 2))
    return rows.view(nb * 2 * half, K)


def dequantize(w: Mapping[str, torch.Tensor], name: str, bits: int, dtype: torch.dtype,
               reuse: bool = False) -> torch.Tensor:
    """W [N, K] in `dtype`: (q - zero) * scale, computed in float32 (float64 for float64) and rounded once.

    W has the memory order of the unpacked integers (a one-block int4 layout unpacks to a transposed view, [K, N]
    in memory; every other layout to rows, [N, K]), and every pass runs in that order over one dtype: on the CPU a pass that
    mixes dtypes (integers and floats, or a float32 result stored as bfloat16) or writes across the order it reads
    runs several times slower. With `reuse`, W and its temporaries live in this thread's scratch buffers
    (model/scratch.py), for a caller that uses W at once: it is valid until the next such call."""
    qweight = w[name + ".qweight"]
    buffer = buffers(qweight.device, reuse)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    scales, zeros = w[name + ".scales"].to(work), w[name + ".zeros"].to(work)  # [G, N]
    if bits == 4:
        q = unpack_int4(qweight, buffer)
    else:  # stored as q - 128: the zero point moves by 128 instead of every integer
        q, zeros = qweight, zeros - 128
    N, K = q.shape
    rows = q.is_contiguous()
    q_mem = q if rows else q.t()  # q in memory order: [N, K] or [K, N]
    G = scales.shape[0]
    g_idx = w.get(name + ".g_idx")
    if g_idx is not None:  # each column's own group (GPTQ act-order), gathered into q's shape
        idx = g_idx.long()
        if rows:  # [N, K]: gather columns of [N, G]
            s, z = (torch.index_select(t.t().contiguous(), 1, idx, out=buffer(role, (N, K), work))
                    for role, t in (("scales", scales), ("zeros", zeros)))
        else:  # [K, N]: gather rows of [G, N]
            s, z = (torch.index_select(t, 0, idx, out=buffer(role, (K, N), work))
                    for role, t in (("scales", scales), ("zeros", zeros)))
        q_groups = q_mem
    elif rows:
        q_groups, s, z = q.view(N, G, K // G), scales.t()[..., None], zeros.t()[..., None]
    else:
        q_groups, s, z = q_mem.view(G, K // G, N), scales[:, None], zeros[:, None]
    # q - z and (q - z) s are exact in `work`: one rounding, into `dtype`.
    out = buffer("work", q_groups.shape, work).copy_(q_groups).sub_(z).mul_(s)
    if dtype != work:
        out = buffer("weight", q_groups.shape, dtype).copy_(out)
    out = out.view(q_mem.shape)
    return out if rows else out.t()


# --- the int kernels torch ships


@functools.cache
def cpu_int4_block() -> int | None:
    """The row block of `_convert_weight_to_int4pack_for_cpu` on this CPU (64 with AVX-512, 32 with AVX2), found
    by packing a probe and comparing with `pack_int4`; None when the op is missing or packs some other way."""
    op = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if op is None:
        return None
    g = torch.Generator().manual_seed(0)
    for block in (64, 32):
        q = torch.randint(0, 16, (2 * block, 64), dtype=torch.int32, generator=g)
        try:
            packed = op(q, 1)
        except RuntimeError:
            return None
        if packed.numel() == q.numel() // 2 and torch.equal(packed.reshape(-1), pack_int4(q, block).reshape(-1)):
            return block
    return None


def kernel_block(device: torch.device) -> int | None:
    """The 4-bit layout block that lets the device's int4 kernel read the packed weights as they are."""
    return cpu_int4_block() if torch.device(device).type == "cpu" else None


@dataclass(frozen=True)
class KernelChoice:
    """Use the int kernel for a linear over at most `max_tokens` tokens, dequantize + matmul above (0: never)."""

    max_tokens: int = 0
    measured: str = ""  # where the threshold came from (a profile, a load-time measurement), for messages

    @classmethod
    def never(cls) -> "KernelChoice":
        return cls(0, "dequantize only")


def exact_kernel_choice(choice: KernelChoice | None, dtype: torch.dtype, device: torch.device) -> KernelChoice | None:
    """The choice that keeps a row's logits independent of how many tokens share its forward.

    On the CPU in 16 bits, the matmul after dequantizing rounds a row differently by the number of rows in the call
    (oneDNN picks another kernel), by enough to flip a greedy token between plain decoding (one token per forward)
    and a verified tree or a batch; the int kernels' rows do not depend on it (tests/test_quant.py checks that).
    So there a kernel that serves any token count serves every one: exact, at up to ~2x the dequantizing path's
    time per linear beyond the measured crossover (prefill, large trees). A choice of 0 (no kernel applies) stays.
    float32 keeps the measured choice: its differences between the paths are ~1e-7 relative, and its greedy tests
    hold. Act-order linears have no kernel (None), so in 16 bits they stay as row-dependent as any 16-bit matmul."""
    sixteen = dtype in (torch.bfloat16, torch.float16)
    if choice is not None and choice.max_tokens > 0 and device.type == "cpu" and sixteen:
        return KernelChoice(1 << 30, f"every token count in {str(dtype).removeprefix('torch.')} (exact)")
    return choice


def _scales_and_zeros(w: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    """[G, N, 2] for torch's int4 kernels, which compute (q - 8) * scale + zero: zero = (8 - z) * scale."""
    s = w[name + ".scales"].to(torch.float32)
    z = w[name + ".zeros"].to(torch.float32)
    return torch.stack([s, (8 - z) * s], dim=-1).to(dtype)


def kernel_extras(w: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """For a resident layer: the scales and zeros of each 4-bit linear the int4 kernel can compute, as the kernel
    takes them (`.kernel_sz`), made once instead of at every call (the same values a streamed layer computes per
    call). A `.kernel_sz` of dtype D is what lets `quantized_linear` skip `kernel_applies` for activations in D."""
    names = [n.removesuffix(".qweight") for n, t in w.items() if n.endswith(".qweight") and t.dtype == torch.uint8]
    probe = torch.empty(1, 0, dtype=dtype, device=next(iter(w.values())).device)
    return {f"{name}.kernel_sz": _scales_and_zeros(w, name, dtype) for name in names
            if kernel_applies(w, name, 4, probe)}


def kernel_applies(w: Mapping[str, torch.Tensor], name: str, bits: int, x: torch.Tensor) -> bool:
    """Whether a weight-only int kernel can compute this linear for activations x."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or name + ".g_idx" in w:
        return False
    qweight, scales = w[name + ".qweight"], w[name + ".scales"]
    if bits == 8:
        return scales.shape[0] == 1 and hasattr(torch.ops.aten, "_weight_int8pack_mm")
    K = qweight.shape[1]
    group = K // scales.shape[0]
    if group not in KERNEL_GROUPS:
        return False
    if x.device.type == "cpu":
        return cpu_int4_block() is not None and qweight.shape[2] * 2 == cpu_int4_block()
    # tinygemm: bfloat16 activations, K in whole tiles of innerKTiles (8) x 16, N in whole tiles of 8.
    N = qweight.shape[0] * qweight.shape[2] * 2
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and K % 128 == 0 and N % 8 == 0


def _int4_kernel(x2: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """torch's int4 kernel on x2 [M, K] with the kernel's scales and zeros `sz` [G, N, 2]."""
    K = x2.shape[1]
    group = K // sz.shape[0]
    if x2.is_cpu:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, qweight.view(-1, K // 2), group, sz)
    # CUDA's tinygemm layout is tiled for tensor cores: repack on the device (a pass over 0.5 B per weight,
    # far below what the layer's copy over PCIe costs).
    q = unpack_int4(qweight)
    tiled = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), 8)
    return torch.ops.aten._weight_int4pack_mm(x2, tiled, group, sz)


def _kernel_linear(x2: torch.Tensor, w: Mapping[str, torch.Tensor], name: str, bits: int) -> torch.Tensor:
    qweight = w[name + ".qweight"]
    if bits == 4:
        return _int4_kernel(x2, qweight, _scales_and_zeros(w, name, x2.dtype))
    scales = w[name + ".scales"][0]
    # (q - z) s = (q - 128) s + (128 - z) s: the kernel takes the first term, the zero point adds a rank-1 term.
    shift = ((128 - w[name + ".zeros"][0].to(torch.float32)) * scales.to(torch.float32)).to(x2.dtype)
    y = torch.ops.aten._weight_int8pack_mm(x2, qweight, scales.to(x2.dtype))
    return y + x2.sum(-1, keepdim=True) * shift


def quantized_linear(x: torch.Tensor, w: Mapping[str, torch.Tensor], name: str, kernel: KernelChoice | None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = x W^T (+ bias) for x [M, K] and the quantized linear `name` of layer weights `w`.

    Runs once per linear per forward, so at one token its Python is a good part of the step: a resident layer's
    `.kernel_sz` (kernel_extras) stands for the kernel_applies check and the scales-and-zeros conversion, and
    goes straight to the op."""
    assert x.dim() == 2, x.shape
    qweight = w[name + ".qweight"]
    use_kernel = kernel is not None and x.shape[0] <= kernel.max_tokens
    sz = w.get(name + ".kernel_sz") if use_kernel else None
    if sz is not None and sz.dtype == x.dtype:
        y = _int4_kernel(x, qweight, sz)
    else:
        bits = 4 if qweight.dtype == torch.uint8 else 8
        if not (use_kernel and kernel_applies(w, name, bits, x)):
            return F.linear(x, dequantize(w, name, bits, x.dtype, reuse=True), bias)
        y = _kernel_linear(x, w, name, bits)
    return y if bias is None else y + bias


# --- choosing the path by measurement


@dataclass(frozen=True)
class KernelTimes:
    """Seconds of one linear by each path at a grid of token counts (planner profiles store these)."""

    grid: tuple[int, ...]
    kernel_s: tuple[float, ...] | None  # None: no kernel applies on this device and dtype
    dequant_s: tuple[float, ...]

    def choice(self, measured: str) -> KernelChoice:
        """The largest token count up to which the kernel is faster at every grid point."""
        if self.kernel_s is None:
            return KernelChoice(0, measured)
        best = 0
        for n, k, d in zip(self.grid, self.kernel_s, self.dequant_s):
            if k >= d:
                break
            best = n
        return KernelChoice(best, measured)

    def to_json(self) -> dict[str, Any]:
        return {"grid": list(self.grid), "kernel_s": None if self.kernel_s is None else list(self.kernel_s),
                "dequant_s": list(self.dequant_s)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "KernelTimes":
        return cls(tuple(d["grid"]), None if d["kernel_s"] is None else tuple(d["kernel_s"]), tuple(d["dequant_s"]))


def measure_kernel_times(out_features: int, in_features: int, spec: QuantSpec, dtype: torch.dtype,
                         device: torch.device, grid: tuple[int, ...] = (1, 4, 16, 64, 256),
                         repeats: int = 3) -> KernelTimes:
    """Time one random quantized linear of this shape by both paths at each token count of `grid`, up to the first
    where the kernel is no longer faster (no timings when no kernel applies)."""
    device = torch.device(device)
    spec = replace(spec, block=kernel_block(device), act_order=False)
    # Both paths scale about linearly in the output width, so a slice of a wide linear shows the same crossover
    # at a bounded cost in memory and time (a 70B MLP linear would be 235 M weights).
    N = min(out_features, MEASURE_MAX_ROWS)
    g = torch.Generator().manual_seed(0)
    G = in_features // spec.group(in_features)
    maxq = 2 ** spec.bits - 1
    q = torch.randint(0, maxq + 1, (N, in_features), generator=g, dtype=torch.uint8)
    w = {"l.scales": (torch.rand(G, N, generator=g) * 1e-2 + 1e-3).half(),
         "l.zeros": torch.randint(0, maxq + 1, (G, N), generator=g).to(torch.int16)}
    w["l.qweight"] = pack_int4(q, spec.block_for(N)) if spec.bits == 4 else (q.to(torch.int16) - 128).to(torch.int8)
    w = {k: v.to(device) for k, v in w.items()}
    probe = torch.zeros(1, in_features, dtype=dtype, device=device)
    has_kernel = kernel_applies(w, "l", spec.bits, probe)
    always, never = KernelChoice(1 << 30), KernelChoice(0)
    if has_kernel:
        try:  # a kernel this torch build refuses for these shapes is no choice at all
            quantized_linear(probe, w, "l", always)
        except RuntimeError as e:
            warn_fallback(f"the int{spec.bits} kernel failed on {device.type} ({str(e).splitlines()[0]})")
            has_kernel = False
    kernel_s, dequant_s = [], []
    if not has_kernel:  # nothing to choose: dequantize + matmul at every token count
        return KernelTimes((), None, ())
    with torch.inference_mode():
        for n in grid:
            x = torch.randn(n, in_features, generator=g).to(device=device, dtype=dtype)
            dequant_s.append(median_seconds(lambda: quantized_linear(x, w, "l", never), device, max_repeats=repeats))
            kernel_s.append(median_seconds(lambda: quantized_linear(x, w, "l", always), device, max_repeats=repeats))
            if kernel_s[-1] >= dequant_s[-1]:
                break  # the crossover: the kernel's cost grows with the tokens, dequantizing's is mostly fixed
    return KernelTimes(tuple(grid[:len(kernel_s)]), tuple(kernel_s), tuple(dequant_s))


def warn_fallback(what: str) -> None:
    warnings.warn(f"{what}; using dequantize + matmul instead (exact, slower for few tokens)", RuntimeWarning,
                  stacklevel=3)


# --- quantization_config in config.json (checkpoints quantized by AutoAWQ, AutoGPTQ, GPTQModel)

SUPPORTED_METHODS = ("awq", "gptq")
AWQ_VERSIONS = ("gemm",)
GPTQ_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class CheckpointQuant:
    """How a published checkpoint stores its quantized linears (from config.json's quantization_config)."""

    method: str  # "awq" | "gptq"
    bits: int
    group_size: int  # -1: per output channel
    sym: bool = False
    desc_act: bool = False  # GPTQ act-order: a g_idx per linear
    zero_offset: int = 0  # added to the stored zero points: 1 for AutoGPTQ's (v1) format, 0 for v2 and AWQ

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, act_order=self.desc_act)

    @property
    def label(self) -> str:
        return f"{self.method} {self.spec().label}"


def parse_quantization_config(qc: Any, in_features: dict[str, int]) -> CheckpointQuant:
    """A CheckpointQuant from config.json's `quantization_config`; every unsupported setting names its field."""
    if not isinstance(qc, dict):
        raise ConfigError("quantization_config in config.json is not an object; re-download the checkpoint")
    method = str(qc.get("quant_method", "")).lower()
    if method not in SUPPORTED_METHODS:
        raise ConfigError(f"quantization_config.quant_method {qc.get('quant_method')!r} is not supported; "
                          f"supported: {', '.join(SUPPORTED_METHODS)} (or an unquantized checkpoint)")
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size", 128))
    if method == "awq":
        version = str(qc.get("version", qc.get("format", "gemm"))).lower()
        if version not in AWQ_VERSIONS:
            raise ConfigError(f"quantization_config.version {version!r} (AWQ) is not supported; supported: "
                              f"{', '.join(AWQ_VERSIONS)}")
        if bits != 4:
            raise ConfigError(f"quantization_config.bits {bits!r} is not supported for AWQ; supported: 4")
        if not qc.get("zero_point", True):
            raise ConfigError("quantization_config.zero_point false (AWQ without zero points) is not supported; "
                              "supported: zero_point true")
        skipped = [m for m in qc.get("modules_to_not_convert") or [] if m and "lm_head" not in m]
        if skipped:
            raise ConfigError(f"quantization_config.modules_to_not_convert {skipped} keeps decoder linears "
                              f"unquantized, which the runtime does not support; supported: none or lm_head")
        out = CheckpointQuant("awq", 4, _group(group), sym=False)
    else:
        fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
        if fmt not in GPTQ_FORMATS:
            raise ConfigError(f"quantization_config.checkpoint_format {fmt!r} (GPTQ) is not supported; "
                              f"supported: {', '.join(GPTQ_FORMATS)}")
        if bits not in SUPPORTED_BITS:
            raise ConfigError(f"quantization_config.bits {bits!r} is not supported for GPTQ; supported: "
                              f"{', '.join(map(str, SUPPORTED_BITS))}")
        if qc.get("lm_head"):
            raise ConfigError("quantization_config.lm_head true (a quantized lm_head) is not supported; "
                              "supported: lm_head false")
        out = CheckpointQuant("gptq", int(bits), _group(group), sym=bool(qc.get("sym", True)),
                              desc_act=bool(qc.get("desc_act", False)), zero_offset=1 if fmt == "gptq" else 0)
    check_group_size(out.spec(), in_features, "quantization_config.group_size")
    return out


def _group(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or value > 0):
        raise ConfigError(f"quantization_config.group_size {value!r} is not supported; supported: a positive "
                          f"whole number that divides every linear's input width, or -1 (per channel)")
    return value
