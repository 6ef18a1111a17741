"""Build a Transformer from a weight source: globals and resident layers on the device, the streamed layers in the
host store (filled from the source, or mapped from the disk store) or read from the disk store every sweep.

The same path serves checkpoints and random weights (weights/random.py), float and quantized layers alike, so
benchmarks of published shapes run through the loader, the host store and the slots that a real model uses.
"""
from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..memory import check_host_memory, fmt_bytes
from ..model.config import ModelArgs
from ..model.quantization import (KernelChoice, QuantSpec, exact_kernel_choice, kernel_block, kernel_extras,
                                  measure_kernel_times, stored_linears)
from ..model.transformer import GlobalWeights, ResidentLayers, Transformer, packed_head
from ..residency import Residency
from ..streaming import StreamedLayers
from .disk import DEFAULT_READ_THREADS, DiskTier, LayerFiles, map_host_layers, padded_bytes
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
    return GlobalWeights(embed=embed, norm=norm, lm_head=lm_head, lm_head_packed=packed_head(lm_head))


def load_layer(source: WeightSource, i: int, dtype: torch.dtype, device: torch.device,
               quant: QuantSpec | None = None) -> dict[str, torch.Tensor]:
    """Decoder layer i in one packed buffer on `device` (the same layout a streamed layer has in its slot)."""
    layout = layer_layout(source.args, dtype, quant, i)
    buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
    fill_layer(source, i, layout, buffer)
    views = layout.views(buffer if device.type == "cpu" else buffer.to(device))
    if quant is not None and dtype in (torch.float32, torch.bfloat16, torch.float16):
        views.update(kernel_extras(views, dtype))
    return views


def quant_key(quant: QuantSpec) -> str:
    """The cache subdirectory of a packed format (the 4-bit block differs between devices)."""
    return f"{quant.label}-b{quant.block or 0}-v2"  # v2: q/k/v and gate/up stacked


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


def packed_source(source: WeightSource, quant: QuantSpec | None, device: torch.device,
                  quant_cache: Path | None = None) -> tuple[WeightSource, QuantSpec | None]:
    """The source as the loader reads it, and its packed format for `device`: decoder linears packed (`quant`,
    else a quantized checkpoint's own format), or the source itself for a float model. Idempotent."""
    if isinstance(source, QuantizedSource):
        return source, source.spec
    if quant is None and source.args.quantization is not None:
        quant = source.args.quantization.spec()
    quant = device_spec(quant, device)
    if quant is None:
        return source, None
    cache = None if quant_cache is None else PackedCache(Path(quant_cache) / quant_key(quant), source.args.n_layers,
                                                         len(stored_linears(quant)))
    return QuantizedSource(source, quant, cache), quant


def ram_fix(device: torch.device, caches_first: bool, caches: bool) -> str:
    """What to do when a load does not fit the host RAM, the likeliest remedy first."""
    gpu = ["give the GPU a larger --gpu-memory budget so more layers stay resident"] if device.type == "cuda" else []
    fixes = ["close other programs", "pick a 16-bit dtype or fewer bits (--quantize int4)", *gpu,
             "cap --host-memory below what is available to read the layers beyond it from disk"]
    if caches:
        fixes.insert(0 if caches_first else len(fixes),
                     "lower the batch size (--batch-size) or the context (--max-seq-len), which size the KV caches")
    return "; ".join(fixes[:-1]) + "; or " + fixes[-1]


def build_model(source: WeightSource, device: torch.device, dtype: torch.dtype, residency: Residency,
                progress: Callable[[int], None] | None = None, *, quant: QuantSpec | None = None,
                kernel: KernelChoice | None = None, quant_cache: Path | None = None,
                disk_store: LayerFiles | None = None, read_threads: int = DEFAULT_READ_THREADS,
                shared_globals: GlobalWeights | None = None, beside: Mapping[str, int] | None = None) -> Transformer:
    """Load globals and resident layers onto the device; pack the host layers into the host store (mapped from
    `disk_store` when there is one, so processes share them); read the disk layers from `disk_store` every sweep
    (`progress(1)` per layer). `quant` holds the decoder linears packed (a quantized checkpoint's own format
    when not given); `kernel` says when the int kernels run (default: measured now); `quant_cache`, a directory
    for the linears quantized on load (read from it when complete, else written to it). A disk store must hold
    the layers as this call packs them: write it from `packed_source(...)`'s source. `shared_globals`: another
    model's embedding, norm and head, used as they are (a self-draft shares its target's). `beside`: what the
    caller will hold in host RAM with this model (name -> bytes: KV caches, a draft, ... on the CPU), so that the
    one check of host RAM before allocating counts everything the load will take."""
    args = source.args
    assert shared_globals is None or shared_globals.embed.dtype == dtype, "shared globals are in the model's dtype"
    source, quant = packed_source(source, quant, device, quant_cache)
    if quant is not None:
        kernel = exact_kernel_choice(kernel if kernel is not None else default_kernel(args, quant, dtype, device),
                                     dtype, torch.device(device))
    residency = residency.split(args.n_layers)
    store = None
    if residency.offload:
        assert sorted(residency.resident + residency.streamed) == list(range(args.n_layers)), \
            "every layer has exactly one source"
        assert disk_store is not None or not residency.disk, "disk layers need the disk store"
        store = HostLayerStore(args, dtype, list(residency.host), pin=device.type == "cuda", quant=quant)
    # Checked before anything is allocated; on the CPU the "device" part lives in RAM too.
    on_host = 0 if device.type == "cuda" else \
        (shared_globals is None) * args.global_numel() * dtype.itemsize + \
        len(residency.resident) * layer_bytes(args, dtype, quant)
    staging = residency.prefetch * padded_bytes(layer_bytes(args, dtype, quant))
    beside = {k: v for k, v in (beside or {}).items() if v}
    need = on_host + (store.nbytes if store else 0) + staging + sum(beside.values())
    also = f" with its {', '.join(f'{k} ({fmt_bytes(v)})' for k, v in beside.items())}" if beside else ""
    check_host_memory(need, f"{'streaming' if store else 'loading'} {source.label} ({args.n_layers} layers, {dtype}"
                            f"{', ' + quant.label if quant else ''}){also}",
                      ram_fix(device, beside.get("KV caches", 0) * 2 > need, "KV caches" in beside))
    resident = {}
    for i in residency.resident:
        resident[i] = load_layer(source, i, dtype, device, quant)
        if progress:
            progress(1)
    globals_ = load_globals(source, dtype, device) if shared_globals is None else shared_globals
    if store is None:
        return Transformer(args, globals_, ResidentLayers([resident[i] for i in range(args.n_layers)]), device,
                           kernel)
    if disk_store is not None:
        map_host_layers(store, disk_store, progress)
    else:
        store.fill(source, progress)
    disk = DiskTier(disk_store, residency.disk, residency.prefetch, read_threads) if residency.disk else None
    layers = StreamedLayers(args.n_layers, resident, store, device, residency.slots, disk)
    if progress and residency.disk:
        progress(len(residency.disk))
    return Transformer(args, globals_, layers, device, kernel)
