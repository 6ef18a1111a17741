"""Build a Transformer from a weight source: globals and resident layers on the device, the rest in the host store.

The same path serves checkpoints and random weights (weights/random.py), float and quantized layers alike, so
benchmarks of published shapes run through the loader, the host store and the slots that a real model uses.
"""
from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..memory import check_host_memory
from ..model.config import ModelArgs
from ..model.quantization import KernelChoice, QuantSpec, kernel_block, kernel_extras, measure_kernel_times
from ..model.transformer import GlobalWeights, ResidentLayers, Transformer
from ..residency import Residency
from ..streaming import StreamedLayers
from .layout import layer_bytes, layer_layout
from .quantized import PackedCache, QuantizedSource
from .source import WeightSource
from .store import HostLayerStore, fill_layer


def load_tensor(source: WeightSource, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    t = source.read_into(name, torch.empty(shape, dtype=dtype))
    return t if device.type == "cpu" else t.to(device)


def load_globals(source: WeightSource, dtype: torch.dtype, device: torch.device) -> GlobalWeights:
    shapes = source.args.global_shapes()
    embed = load_tensor(source, "model.embed_tokens.weight", shapes["model.embed_tokens.weight"], dtype, device)
    lm_head = embed if source.args.tie_word_embeddings else \
        load_tensor(source, "lm_head.weight", shapes["lm_head.weight"], dtype, device)
    norm = load_tensor(source, "model.norm.weight", shapes["model.norm.weight"], dtype, device)
    return GlobalWeights(embed=embed, norm=norm, lm_head=lm_head)


def load_layer(source: WeightSource, i: int, dtype: torch.dtype, device: torch.device,
               quant: QuantSpec | None = None) -> dict[str, torch.Tensor]:
    """Decoder layer i in one packed buffer on `device` (the same layout a streamed layer has in its slot)."""
    layout = layer_layout(source.args, dtype, quant)
    buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
    fill_layer(source, i, layout, buffer)
    views = layout.views(buffer if device.type == "cpu" else buffer.to(device))
    if quant is not None and dtype in (torch.float32, torch.bfloat16, torch.float16):
        views.update(kernel_extras(views, dtype))
    return views


def quant_key(quant: QuantSpec) -> str:
    """The cache subdirectory of a packed format (the 4-bit block differs between devices)."""
    return f"{quant.label}-b{quant.block or 0}-v1"


def device_spec(quant: QuantSpec | None, device: torch.device) -> QuantSpec | None:
    """The packed layout for this device: 4-bit rows blocked the way the device's int4 kernel reads them."""
    return None if quant is None else replace(quant, block=kernel_block(device))


@functools.lru_cache(maxsize=32)
def measured_kernel_choice(out_features: int, in_features: int, quant: QuantSpec, dtype: torch.dtype,
                           device: torch.device) -> KernelChoice:
    """Up to how many tokens the int kernel beats dequantize + matmul, timed now on this device (once per
    process and shape); a planner profile's measurement is used instead when a plan is loaded."""
    return measure_kernel_times(out_features, in_features, quant, dtype, device).choice("measured at load")


def default_kernel(args: ModelArgs, quant: QuantSpec | None, dtype: torch.dtype, device: torch.device) -> KernelChoice | None:
    """The kernel choice measured on the model's widest linear (the MLP's), where most of a layer's bytes are."""
    if quant is None or quant.act_order:
        return None
    return measured_kernel_choice(args.intermediate_size, args.dim, replace(quant, block=None), dtype,
                                  torch.device(device))


def build_model(source: WeightSource, device: torch.device, dtype: torch.dtype, residency: Residency,
                progress: Callable[[int], None] | None = None, quant: QuantSpec | None = None,
                kernel: KernelChoice | None = None, quant_cache: Path | None = None) -> Transformer:
    """Load globals and resident layers onto the device; pack the rest into the host store (`progress(1)` per
    layer). `quant` holds the decoder linears packed (a quantized checkpoint's own format when not given);
    `kernel` says when the int kernels run (default: measured now); `quant_cache`, a directory for the linears
    quantized on load (read from it when complete, else written to it)."""
    args = source.args
    if quant is None and args.quantization is not None:
        quant = args.quantization.spec()
    quant = device_spec(quant, device)
    if quant is not None:
        cache = None if quant_cache is None else PackedCache(Path(quant_cache) / quant_key(quant), args.n_layers)
        source = QuantizedSource(source, quant, cache)
        kernel = kernel if kernel is not None else default_kernel(args, quant, dtype, device)
    store = None
    if residency.offload:
        store = HostLayerStore(args, dtype, [i for i in range(args.n_layers) if i not in residency.resident],
                               pin=device.type == "cuda", quant=quant)
    # Checked before anything is allocated; on the CPU the "device" part lives in RAM too.
    on_host = 0 if device.type == "cuda" else \
        args.global_numel() * dtype.itemsize + len(residency.resident) * layer_bytes(args, dtype, quant)
    check_host_memory(on_host + (store.nbytes if store else 0),
                      f"{'streaming' if store else 'loading'} {source.label} ({args.n_layers} layers, {dtype}"
                      f"{', ' + quant.label if quant else ''})")
    resident = {}
    for i in residency.resident:
        resident[i] = load_layer(source, i, dtype, device, quant)
        if progress:
            progress(1)
    globals_ = load_globals(source, dtype, device)
    if store is None:
        layers = ResidentLayers([resident[i] for i in range(args.n_layers)])
    else:
        store.fill(source, progress)
        layers = StreamedLayers(args.n_layers, resident, store, device, residency.slots)
    return Transformer(args, globals_, layers, device, kernel)

