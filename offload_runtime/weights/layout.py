"""How one decoder layer's tensors sit in one contiguous buffer: the layout every layer store and slot uses.

A streamed layer moves as one copy, so its tensors are packed back to back at aligned offsets. `layer_bytes`
is the one definition of what a layer costs to hold and to stream (budgets, the planner and the tools use it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from ..model.config import ModelArgs

ALIGN_BYTES = 256  # every tensor starts on a boundary that copies and kernels like


@dataclass(frozen=True)
class Slot:
    offset: int  # in elements of the layout's dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LayerLayout:
    slots: Mapping[str, Slot]  # tensor name (relative to model.layers.{i}.) -> where it sits
    numel: int  # buffer length in elements
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layer's tensors as views into `buffer` (any device), by name."""
        assert buffer.numel() == self.numel and buffer.dtype == self.dtype, (buffer.shape, buffer.dtype)
        return {name: buffer[s.offset: s.offset + s.numel].view(s.shape) for name, s in self.slots.items()}


def layer_layout(args: ModelArgs, dtype: torch.dtype) -> LayerLayout:
    align = max(1, ALIGN_BYTES // dtype.itemsize)
    slots: dict[str, Slot] = {}
    offset = 0
    for name, shape in args.layer_shapes().items():
        slots[name] = Slot(offset, tuple(shape))
        offset += -(-math.prod(shape) // align) * align
    return LayerLayout(slots, offset, dtype)


def layer_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    """Bytes of one packed decoder layer: what a device slot holds and a sweep copies per streamed layer."""
    return layer_layout(args, dtype).nbytes


def buffer_over_bytes(layout: LayerLayout, raw: torch.Tensor) -> torch.Tensor:
    """The layer buffer `layout.views` takes, over raw bytes (a uint8 CPU tensor of at least `layout.nbytes`, such
    as a page-aligned staging buffer or a mapping of a disk-store file). Stores that keep layers as opaque bytes
    (weights/disk.py) go through this one function, so they hold every weight format the layout describes."""
    assert raw.dtype == torch.uint8 and raw.dim() == 1 and raw.numel() >= layout.nbytes, (raw.dtype, raw.shape)
    return raw[: layout.nbytes].view(layout.dtype)
