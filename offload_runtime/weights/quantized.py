"""Quantized layers from where they come: AWQ and GPTQ checkpoints as published, or float weights quantized on load.

Each format is turned into the runtime's one packed format (model/quantization.py) linear by linear, as the
layer buffers are filled: `QuantizedSource` is a WeightSource whose decoder linears come out packed, so the
loader, the host store and the slots stay the same for every format, and host RAM never holds more than one
packed linear (q/k/v or gate/up stacked: stored_linears) in another form.

The published layouts (integers of `bits` bits packed into int32 words, low bits first):
- AWQ GEMM (AutoAWQ): qweight int32 [K, N / 8] and qzeros int32 [K / g, N / 8] packed along the output dim in
  AWQ's interleaved order: nibble i of a word holds column AWQ_ORDER[i] of its eight. scales fp16 [K / g, N].
  W[n, k] = (q - z) * s.
- GPTQ (AutoGPTQ, GPTQModel): qweight int32 [K * bits / 32, N] packed along the input dim in order; qzeros int32
  [G, N * bits / 32] along the output dim; scales [G, N]; g_idx int32 [K] (the group of each input column;
  act-order checkpoints permute it). AutoGPTQ stores every zero point minus one (format "gptq", v1): the
  reader adds the one back; GPTQModel's "gptq_v2" stores them as they are.
"""
from __future__ import annotations

import json
import os
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import CheckpointError, ConfigError, OffloadError, StoreError, UsageError
from ..model.config import ModelArgs
from ..model.quantization import (LINEARS, CheckpointQuant, QuantSpec, check_group_size, input_widths,
                                  linear_tensors, pack_int4, stored_linears)
from .source import WeightSource

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i] of its eight
QUANTIZE_CHOICES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128


@dataclass
class LinearInts:
    """One quantized linear as plain integers: W[n, k] = (q[n, k] - zeros[g(k), n]) * scales[g(k), n]."""

    q: torch.Tensor  # [N, K] integer
    zeros: torch.Tensor  # [G, N] int16
    scales: torch.Tensor  # [G, N] float16
    g_idx: torch.Tensor | None = None  # [K] int32; None: column k is in group k // (K / G)


def _unpack_words(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their 32 / bits fields (low bits first), laid out along `dim` (0 or 1) in that order."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    if dim == 1:  # [R, C] -> [R, C * per]
        return ((words[:, :, None] >> shifts) & mask).reshape(words.shape[0], -1)
    return ((words[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, words.shape[1])


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> LinearInts:
    """AWQ GEMM tensors -> integers (see the module docstring for the layout)."""
    inverse = torch.tensor([AWQ_ORDER.index(j) for j in range(8)])  # column j sits in nibble inverse[j]

    def columns(words: torch.Tensor) -> torch.Tensor:
        fields = _unpack_words(words, 4, dim=1).view(words.shape[0], -1, 8)
        return fields[..., inverse].reshape(words.shape[0], -1)

    return LinearInts(q=columns(qweight).t().to(torch.uint8), zeros=columns(qzeros).to(torch.int16),
                      scales=scales.to(torch.float16))


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                bits: int, zero_offset: int) -> LinearInts:
    """GPTQ tensors -> integers; zero_offset 1 undoes AutoGPTQ's stored-minus-one zero points."""
    q = _unpack_words(qweight, bits, dim=0).t()
    zeros = _unpack_words(qzeros, bits, dim=1).to(torch.int16) + zero_offset
    return LinearInts(q=q.to(torch.uint8), zeros=zeros, scales=scales.to(torch.float16),
                      g_idx=None if g_idx is None else g_idx.to(torch.int32))


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, rows: int = 1024) -> LinearInts:
    """Group-wise round-to-nearest with a zero point: scale = (max(hi, 0) - min(lo, 0)) / (2^bits - 1), stored in
    float16, and the integers rounded against that stored scale (so dequantizing gives the nearest grid points).

    Works on `rows` output rows at a time, so temporaries stay a small fraction of the weight."""
    N, K = w.shape
    g = K if group_size == -1 else group_size
    assert K % g == 0, (K, g)  # quant_spec_for refuses such group sizes with a message
    G, maxq = K // g, 2 ** bits - 1
    q = torch.empty(N, K, dtype=torch.uint8)
    zeros = torch.empty(G, N, dtype=torch.int16)
    scales = torch.empty(G, N, dtype=torch.float16)
    for r0 in range(0, N, rows):
        x = w[r0: r0 + rows].to(torch.float32).view(-1, G, g)
        # The range always holds 0, as GPTQ's quantizer's does: the zero point then fits 0..maxq, where a group of
        # one sign (common in small groups) would otherwise clamp it and clip the group's far end.
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
        exact = (hi - lo).clamp(min=1e-5) / maxq
        s = exact.to(torch.float16)
        # Rounded up where float16 rounded it down, so the stored grid still spans the group (a tiny group's scale
        # is subnormal in float16, a step off by several percent, which would clip its far end).
        s = torch.where(s.to(torch.float32) < exact, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
        sf = s.to(torch.float32)
        z = torch.round(-lo / sf).clamp(0, maxq)
        q[r0: r0 + rows] = (torch.round(x / sf[..., None]) + z[..., None]).clamp(0, maxq).view(-1, K).to(torch.uint8)
        zeros[:, r0: r0 + rows] = z.t().to(torch.int16)
        scales[:, r0: r0 + rows] = s.t()
    return LinearInts(q, zeros, scales)


def stack_ints(parts: list[LinearInts]) -> LinearInts:
    """Linears over the same input as one, their output rows stacked in order (stored_linears)."""
    if len(parts) == 1:
        return parts[0]
    assert all(p.g_idx is None for p in parts), "act-order linears are never stacked"
    return LinearInts(torch.cat([p.q for p in parts]), torch.cat([p.zeros for p in parts], dim=1),
                      torch.cat([p.scales for p in parts], dim=1))


def pack_linear(ints: LinearInts, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The packed tensors of one linear (suffix -> tensor), as `linear_tensors` lays them out."""
    N, K = ints.q.shape
    out = {"qweight": pack_int4(ints.q, spec.block_for(N)) if spec.bits == 4 else
           (ints.q.to(torch.int16) - 128).to(torch.int8),
           "scales": ints.scales, "zeros": ints.zeros}
    if spec.act_order:
        out["g_idx"] = ints.g_idx if ints.g_idx is not None else \
            torch.arange(K, dtype=torch.int32) // spec.group(K)
    return out


# --- what a quantized checkpoint holds


def published_linear_tensors(out_features: int, in_features: int,
                             quant: CheckpointQuant) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """suffix -> (shape, dtype) of one linear as AutoAWQ / AutoGPTQ write it."""
    N, K = out_features, in_features
    per = 32 // quant.bits
    G = -(-K // (K if quant.group_size == -1 else quant.group_size))
    if quant.method == "awq":
        return {"qweight": ((K, N // per), torch.int32), "qzeros": ((G, N // per), torch.int32),
                "scales": ((G, N), torch.float16)}
    return {"qweight": ((K // per, N), torch.int32), "qzeros": ((G, N // per), torch.int32),
            "scales": ((G, N), torch.float16), "g_idx": ((K,), torch.int32)}


def expected_checkpoint_tensors(args: ModelArgs) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(required name -> shape, optional names) of a checkpoint with these args, quantized or not."""
    if args.quantization is None:
        return args.expected_tensors(), set()
    expected, optional = dict(args.global_shapes()), set()
    for i in range(args.n_layers):
        for name, shape in args.layer_shapes().items():
            linear = name.removesuffix(".weight")
            if linear not in LINEARS:
                expected[f"model.layers.{i}.{name}"] = shape
                continue
            for suffix, (s, _) in published_linear_tensors(shape[0], shape[1], args.quantization).items():
                expected[f"model.layers.{i}.{linear}.{suffix}"] = s
                if suffix == "g_idx" and not args.quantization.desc_act:
                    optional.add(f"model.layers.{i}.{linear}.{suffix}")
    return expected, optional


# --- a cache of linears quantized on load


class PackedCache:
    """Packed linears of a model quantized on load, one safetensors file per decoder layer in `root`, so a reload
    reads integers instead of quantizing again. The caller keys `root` (checkpoint fingerprint and format); a
    layer file appears whole (temp file + rename) once its linears are packed, `complete` once every layer is."""

    MARKER = "complete.json"

    def __init__(self, root: Path, n_layers: int, linears: int):
        self.root, self.n_layers, self.linears = Path(root), n_layers, linears  # packed linears per layer
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self._headers: dict[int, dict] = {}

    @property
    def complete(self) -> bool:
        return (self.root / self.MARKER).is_file()

    def _file(self, layer: int) -> Path:
        return self.root / f"layer-{layer:05d}.safetensors"

    def read(self, layer: int, prefix: str, suffixes: list[str]) -> dict[str, torch.Tensor]:
        from .checkpoint import read_safetensors_header, read_tensor_into

        try:
            if layer not in self._headers:
                self._headers = {layer: read_safetensors_header(self._file(layer))}  # one layer's header at a time
            infos = self._headers[layer]
            return {sx: read_tensor_into(infos[f"{prefix}.{sx}"], torch.empty(infos[f"{prefix}.{sx}"].shape,
                                                                              dtype=infos[f"{prefix}.{sx}"].dtype))
                    for sx in suffixes}
        except (OffloadError, KeyError) as e:  # the reader's advice (re-download) is for checkpoints, not a cache
            what = f"no tensor {e}" if isinstance(e, KeyError) else str(e).split(";")[0]
            raise CheckpointError(f"the quantized cache {self.root} is damaged ({what}); delete that directory and "
                                  f"load again: it is rebuilt") from None

    def add(self, layer: int, prefix: str, packed: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        pending = self._pending.setdefault(layer, {})
        pending.update({f"{prefix}.{sx}": t.contiguous() for sx, t in packed.items()})
        if len(pending) < self.linears * len(packed):
            return
        tmp = self._file(layer).with_suffix(f".{os.getpid()}.tmp")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            save_file(self._pending.pop(layer), str(tmp))
            os.replace(tmp, self._file(layer))
            if all(self._file(i).is_file() for i in range(self.n_layers)):
                (self.root / self.MARKER).write_text(json.dumps({"layers": self.n_layers}))
        except (OSError, SafetensorError) as e:  # a read-only or full disk: the cache is an extra, said so
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write the quantized cache to {self.root} ({e}); free space there, point "
                             f"OFFLOAD_RUNTIME_HOME at a writable disk, or load without caching (drop "
                             f"--cache-quantized)") from None


# --- the source


class QuantizedSource:
    """A WeightSource whose decoder linears come out in the packed format of `spec`; everything else (norms,
    biases, embeddings, lm_head) passes through from `base` unchanged.

    From a quantized checkpoint (`base.args.quantization` set) the checkpoint's own integers are repacked;
    from a float source each linear is quantized on load (quantize_rtn). The last linear's packed tensors are
    kept, so its three or four reads unpack or quantize it once.
    """

    def __init__(self, base: WeightSource, spec: QuantSpec, cache: PackedCache | None = None):
        self.base, self.spec = base, spec
        self.cache = cache if base.args.quantization is None else None
        self.args = base.args
        self.source_quant = base.args.quantization
        self.label = base.label
        self._shapes = {name.removesuffix(".weight"): shape for name, shape in base.args.layer_shapes().items()}
        self.stored = stored_linears(spec)
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        prefix, _, suffix = name.rpartition(".")
        linear = prefix.split(".", 3)[-1] if prefix.startswith("model.layers.") else ""
        if linear not in self.stored or suffix == "bias":
            return self.base.read_into(name, out)
        if self._cached is None or self._cached[0] != prefix:
            self._cached = (prefix, self._packed(prefix, linear))
        return out.copy_(self._cached[1][suffix])

    def _packed(self, prefix: str, linear: str) -> dict[str, torch.Tensor]:
        layer = int(prefix.split(".")[2])
        parts = self.stored[linear]
        if self.cache is not None and self.cache.complete:
            rows = sum(self._shapes[p][0] for p in parts)
            return self.cache.read(layer, prefix, list(linear_tensors(rows, self._shapes[parts[0]][1], self.spec)))
        base = prefix.removesuffix(linear)
        packed = pack_linear(stack_ints([self._linear_ints(base + p, p) for p in parts]), self.spec)
        if self.cache is not None:
            self.cache.add(layer, prefix, packed)
        return packed

    def _linear_ints(self, prefix: str, linear: str) -> LinearInts:
        N, K = self._shapes[linear]
        quant = self.source_quant
        if quant is None:
            w = self.base.read_into(prefix + ".weight", torch.empty(N, K, dtype=torch.float32))
            return quantize_rtn(w, self.spec.bits, self.spec.group_size)
        tensors = {}
        for suffix in published_linear_tensors(N, K, quant):
            if suffix == "g_idx" and f"{prefix}.g_idx" not in self.base.tensors:
                continue
            tensors[suffix] = self.base.load(f"{prefix}.{suffix}")
        if quant.method == "awq":
            ints = unpack_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"])
        else:
            ints = unpack_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors.get("g_idx"),
                               quant.bits, quant.zero_offset)
            ints = _check_g_idx(ints, prefix, quant)
        if not torch.equal(ints.scales.to(tensors["scales"].dtype), tensors["scales"]):
            raise CheckpointError(f"{prefix}.scales holds values float16 cannot represent exactly; the runtime "
                                  f"stores scales in float16 (re-quantize with float16 scales)")
        return ints


def _check_g_idx(ints: LinearInts, prefix: str, quant: CheckpointQuant) -> LinearInts:
    if ints.g_idx is None:
        return ints
    G, K = ints.scales.shape[0], ints.q.shape[1]
    if int(ints.g_idx.min()) < 0 or int(ints.g_idx.max()) >= G:
        raise CheckpointError(f"{prefix}.g_idx names groups outside 0..{G - 1}; the checkpoint is corrupt")
    if quant.desc_act:
        return ints
    trivial = torch.arange(K, dtype=torch.int32) // (K // G)
    if not torch.equal(ints.g_idx, trivial):
        raise CheckpointError(f"{prefix}.g_idx is permuted but quantization_config.desc_act is false; fix "
                              f"config.json (desc_act true) or re-download the checkpoint")
    return replace(ints, g_idx=None)  # the plain grouping: no gather when dequantizing, kernels apply


# --- the user's options


def quantize_flags(quantize: str | None, group_size: int | None, draft_quantize: str | None) -> str:
    """The command-line flags that ask for these quantize-on-load options (as plans say how to rebuild them)."""
    return " ".join(f"--{name} {value}" for name, value in (
        ("quantize", quantize), ("group-size", group_size), ("draft-quantize", draft_quantize)) if value is not None)


def quant_spec_for(args: ModelArgs, quantize: str | None, group_size: int | None, what: str) -> QuantSpec | None:
    """The packed format a model is held in: the checkpoint's own quantization, or `quantize` ("int8" | "int4",
    group-wise with `group_size`, 128 by default) on an unquantized one; None for a float model and for a GGUF
    file (its linears stay in the file's blocks: model/ggml.py)."""
    if args.ggml_types is not None:
        if quantize is not None or group_size is not None:
            raise UsageError(f"{what} is a GGUF file, already quantized in its own types; drop --quantize / "
                             f"--group-size (quantize= / group_size=) for it")
        return None
    if args.quantization is not None:
        if quantize is not None:
            raise UsageError(f"{what} is already quantized ({args.quantization.label}); drop --quantize / "
                             f"quantize= for it (its own quantization is used)")
        if group_size is not None:
            raise UsageError(f"{what} is already quantized with group size {args.quantization.group_size}; "
                             f"drop --group-size / group_size=")
        return args.quantization.spec()
    if quantize is None:
        if group_size is not None:
            raise UsageError("--group-size / group_size= needs --quantize int8|int4")
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise UsageError(f"quantize {quantize!r} is not supported; use one of {', '.join(QUANTIZE_CHOICES)}")
    group = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or group > 0):
        raise UsageError(f"group_size must be a positive whole number or -1 (per channel), got {group_size!r}")
    spec = QuantSpec(int(quantize.removeprefix("int")), group)
    try:
        check_group_size(spec, input_widths(args.dim, args.q_size, args.intermediate_size), "group_size")
    except ConfigError as e:  # here it is the user's option that is wrong, not config.json
        raise UsageError(f"{what}: {e}") from None
    return spec
