"""How one decoder layer's tensors sit in one contiguous byte buffer: the layout every layer store and slot uses.

A streamed layer moves as one copy, so its tensors are packed back to back at aligned byte offsets, each with
its own dtype: float weights and norms, or (quantized models) packed integers, float16 scales and integer zero
points beside the norms (model/quantization.py). The streamer, the slots and the residency code only see bytes.
`layer_bytes` is the one definition of what a layer costs to hold and to stream (budgets, the planner and the
tools use it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from ..model.config import ModelArgs
from ..model.ggml import ggml_name, ggml_shape
from ..model.quantization import LINEARS, QuantSpec, linear_tensors, stored_linears

ALIGN_BYTES = 256  # every tensor starts on a boundary that copies and kernels like


@dataclass(frozen=True)
class Slot:
    offset: int  # bytes from the start of the layer's buffer
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class LayerLayout:
    slots: Mapping[str, Slot]  # tensor name (relative to model.layers.{i}.) -> where it sits
    nbytes: int  # buffer length
    dtype: torch.dtype  # the compute dtype of the layer's float tensors
    quant: QuantSpec | None = None

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layer's tensors as views into the uint8 `buffer` (any device), by name."""
        assert buffer.numel() == self.nbytes and buffer.dtype == torch.uint8, (buffer.shape, buffer.dtype)
        return {name: buffer[s.offset: s.offset + s.nbytes].view(s.dtype).view(s.shape)
                for name, s in self.slots.items()}


def layer_tensors(args: ModelArgs, dtype: torch.dtype, quant: QuantSpec | None = None,
                  layer: int = 0) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor decoder layer `layer` holds in this format (the layer matters only
    for GGUF files, whose layers may keep their linears in different GGML types: model/ggml.py)."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    ggml = dict(zip(LINEARS, args.ggml_types[layer])) if args.ggml_types is not None else {}
    shapes = args.layer_shapes()
    # A packed linear sits where its first part would (stored_linears: q, k, v as one, gate and up as one).
    stored = {parts[0]: (name, parts) for name, parts in stored_linears(quant).items()} if quant is not None else {}
    for name, shape in shapes.items():
        linear = name.removesuffix(".weight")
        if linear in ggml:
            out[ggml_name(linear, ggml[linear])] = ggml_shape(ggml[linear], *shape)
        elif quant is not None and linear in LINEARS:
            if linear in stored:
                packed, parts = stored[linear]
                rows = sum(shapes[f"{p}.weight"][0] for p in parts)
                for suffix, spec in linear_tensors(rows, shape[1], quant).items():
                    out[f"{packed}.{suffix}"] = spec
        else:
            out[name] = (tuple(shape), dtype)
    return out


def layer_layout(args: ModelArgs, dtype: torch.dtype, quant: QuantSpec | None = None,
                 layer: int | None = None) -> LayerLayout:
    """Decoder layer `layer`'s layout; None: the largest layer's (what a device slot must hold; the layers of
    every format but GGUF share one layout)."""
    if layer is None:
        if args.ggml_types is None:
            layer = 0
        else:
            kinds = {t: i for i, t in enumerate(args.ggml_types)}  # one layer of each distinct mix of types
            return max((layer_layout(args, dtype, quant, i) for i in kinds.values()), key=lambda lay: lay.nbytes)
    slots: dict[str, Slot] = {}
    offset = 0
    for name, (shape, dt) in layer_tensors(args, dtype, quant, layer).items():
        slots[name] = Slot(offset, tuple(shape), dt)
        offset += -(-math.prod(shape) * dt.itemsize // ALIGN_BYTES) * ALIGN_BYTES
    return LayerLayout(slots, offset, dtype, quant)


def layer_bytes(args: ModelArgs, dtype: torch.dtype, quant: QuantSpec | None = None, layer: int | None = None) -> int:
    """Bytes of one packed decoder layer: what a device slot holds and a sweep copies per streamed layer (None:
    the largest layer, which is every layer but in GGUF files)."""
    return layer_layout(args, dtype, quant, layer).nbytes


def model_bytes(args: ModelArgs, dtype: torch.dtype, quant: QuantSpec | None = None) -> int:
    """Bytes of a whole model on the device: globals (16-bit or the dtype, never quantized) and every layer."""
    layers = args.n_layers * layer_bytes(args, dtype, quant) if args.ggml_types is None else \
        sum(layer_bytes(args, dtype, quant, i) for i in range(args.n_layers))  # GGUF layers may differ
    return args.global_numel() * dtype.itemsize + layers


def buffer_over_bytes(layout: LayerLayout, raw: torch.Tensor) -> torch.Tensor:
    """The layer buffer `layout.views` takes, over raw bytes (a uint8 CPU tensor of at least `layout.nbytes`, such
    as a page-aligned staging buffer or a mapping of a disk-store file). Stores that keep layers as opaque bytes
    (weights/disk.py) go through this one function, so they hold every weight format the layout describes."""
    assert raw.dtype == torch.uint8 and raw.dim() == 1 and raw.numel() >= layout.nbytes, (raw.dtype, raw.shape)
    return raw[: layout.nbytes]
