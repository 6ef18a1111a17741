"""The host store: each streamed decoder layer packed in one contiguous host buffer, page-locked when it can be.

Filled tensor by tensor straight from a weight source (a checkpoint's shards, random weights) into place, so
the model is never held twice. One copy per layer is what a sweep moves (streaming.py).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable

import torch

from ..model.config import ModelArgs
from ..model.quantization import QuantSpec
from .layout import LayerLayout, layer_layout
from .source import WeightSource


def alloc_host(numel: int, dtype: torch.dtype, pin: bool) -> tuple[torch.Tensor, bool]:
    """A host tensor of exactly `numel` elements, page-locked when asked and allowed: (tensor, pinned).

    PyTorch's pinned allocator rounds every block up to a power of two (a 1.6 GiB 70B layer would take 2 GiB), so
    the buffer is allocated pageable and then registered with the driver (cudaHostRegister), which pins exactly
    its own pages; it is unregistered when the tensor is freed. Where registration is refused, the caching
    allocator's pinned memory is the fallback, then pageable memory.
    """
    buf = torch.empty(numel, dtype=dtype)
    if not pin or numel == 0:
        return buf, False
    if pin_pages(buf):
        return buf, True
    try:
        return torch.empty(numel, dtype=dtype, pin_memory=True), True
    except RuntimeError:
        return buf, False


_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly (CUDA 11.1+): pages the process may only read


def pin_pages(buf: torch.Tensor, read_only: bool = False) -> bool:
    """Page-lock the memory under `buf` (contiguous, CPU) with cudaHostRegister, exactly its own pages; it is
    unregistered when `buf` is freed. False where there is no CUDA or the driver refuses.

    `read_only` registers a read-only mapping (a shared mapping of a disk-store file): registering it for writing
    would be refused, and on a private mapping would copy every page, so processes would no longer share them.
    """
    if buf.numel() == 0:
        return False
    try:
        cudart = torch.cuda.cudart()
        flags = _HOST_REGISTER_READ_ONLY if read_only else 0
        if int(cudart.cudaHostRegister(buf.data_ptr(), buf.numel() * buf.element_size(), flags)) == 0:
            weakref.finalize(buf, cudart.cudaHostUnregister, buf.data_ptr())
            return True
        _consume_cuda_error()
    except (RuntimeError, AttributeError, AssertionError):
        pass
    return False


def _consume_cuda_error() -> None:
    """A refused runtime call leaves its error pending in the thread, and torch would report it at its next
    kernel launch, wherever that is; torch binds no cudaGetLastError, so a throwaway launch takes it here."""
    try:
        torch.zeros(1, device="cuda").add_(1)
    except RuntimeError:
        pass


def fill_layer(source: WeightSource, i: int, layout: LayerLayout, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """Read decoder layer i from `source` into the uint8 `buffer` laid out by `layout`; returns the tensors' views.

    The names are the layout's: for a quantized layout the source is a QuantizedSource (weights/quantized.py),
    which turns the checkpoint's own tensors (or fp16 weights) into the packed ones."""
    tensors = layout.views(buffer)
    for name, tensor in tensors.items():
        source.read_into(f"model.layers.{i}.{name}", tensor)
    return tensors


class HostLayerStore:
    """Decoder layers `layer_ids` of a model, one packed byte buffer each in host memory (pinned when it can be),
    in the layout of `dtype` and (for quantized models) `quant`."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype, layer_ids: list[int], pin: bool,
                 quant: QuantSpec | None = None):
        self.args = args
        self.layout: LayerLayout = layer_layout(args, dtype, quant)  # the largest layer's: what a slot holds
        self.layer_ids = list(layer_ids)
        # Layers of GGUF files may differ (model/ggml.py); every other format's share the one layout.
        self.layouts: dict[int, LayerLayout] = {
            i: layer_layout(args, dtype, quant, i) if args.ggml_types is not None else self.layout
            for i in self.layer_ids}
        self.buffers: dict[int, torch.Tensor] = {}
        self.pinned = pin
        self._want_pin = pin

    @property
    def dtype(self) -> torch.dtype:
        return self.layout.dtype

    @property
    def layer_bytes(self) -> int:
        """The largest layer's bytes (a device slot's size)."""
        return self.layout.nbytes

    def layout_of(self, i: int) -> LayerLayout:
        return self.layouts[i]

    @property
    def nbytes(self) -> int:
        return sum(self.layouts[i].nbytes for i in self.layer_ids)

    def _new_buffer(self, layout: LayerLayout) -> torch.Tensor:
        buf, pinned = alloc_host(layout.nbytes, torch.uint8, self._want_pin)
        if self._want_pin and not pinned:
            warnings.warn("pinned host memory was refused; streaming from pageable memory (slower copies)",
                          RuntimeWarning, stacklevel=3)
            self._want_pin = self.pinned = False
        return buf

    def fill(self, source: WeightSource, progress: Callable[[int], None] | None = None) -> None:
        """Read each layer's tensors straight into its buffer: the model is never held twice."""
        for i in self.layer_ids:
            buf = self._new_buffer(self.layouts[i])
            fill_layer(source, i, self.layouts[i], buf)
            self.buffers[i] = buf
            if progress:
                progress(1)
