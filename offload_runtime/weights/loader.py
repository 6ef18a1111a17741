"""Build a Transformer from a weight source: globals and resident layers on the device, the streamed layers in the
host store (filled from the source, or mapped from the disk store) or read from the disk store every sweep.

The same path serves checkpoints and random weights (weights/random.py), so benchmarks of published shapes run
through the loader, the host store and the slots that a real model uses.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..memory import check_host_memory
from ..model.transformer import GlobalWeights, ResidentLayers, Transformer
from ..residency import Residency
from ..streaming import StreamedLayers
from .disk import DEFAULT_READ_THREADS, DiskTier, LayerFiles, map_host_layers, padded_bytes
from .layout import layer_bytes
from .source import WeightSource
from .store import HostLayerStore


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


def load_layer(source: WeightSource, i: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    return {name: load_tensor(source, f"model.layers.{i}.{name}", shape, dtype, device)
            for name, shape in source.args.layer_shapes().items()}


def build_model(source: WeightSource, device: torch.device, dtype: torch.dtype, residency: Residency,
                progress: Callable[[int], None] | None = None, disk_store: LayerFiles | None = None,
                read_threads: int = DEFAULT_READ_THREADS) -> Transformer:
    """Load globals and resident layers onto the device; pack the host layers into the host store (mapped from
    `disk_store` when there is one, so processes share them); read the disk layers from `disk_store` every sweep
    (`progress(1)` per layer)."""
    args = source.args
    residency = residency.split(args.n_layers)
    store = None
    if residency.offload:
        assert sorted(residency.resident + residency.streamed) == list(range(args.n_layers)), \
            "every layer has exactly one source"
        assert disk_store is not None or not residency.disk, "disk layers need the disk store"
        store = HostLayerStore(args, dtype, list(residency.host), pin=device.type == "cuda")
    # Checked before anything is allocated; on the CPU the "device" part lives in RAM too.
    on_host = 0 if device.type == "cuda" else \
        (args.global_numel() + len(residency.resident) * args.layer_numel()) * dtype.itemsize
    staging = residency.prefetch * padded_bytes(layer_bytes(args, dtype))
    check_host_memory(on_host + (store.nbytes if store else 0) + staging,
                      f"{'streaming' if store else 'loading'} {source.label} ({args.n_layers} layers, {dtype})")
    resident = {}
    for i in residency.resident:
        resident[i] = load_layer(source, i, dtype, device)
        if progress:
            progress(1)
    globals_ = load_globals(source, dtype, device)
    if store is None:
        return Transformer(args, globals_, ResidentLayers([resident[i] for i in range(args.n_layers)]), device)
    if disk_store is not None:
        map_host_layers(store, disk_store, progress)
    else:
        store.fill(source, progress)
    disk = DiskTier(disk_store, residency.disk, residency.prefetch, read_threads) if residency.disk else None
    layers = StreamedLayers(args.n_layers, resident, store, device, residency.slots, disk)
    if progress and residency.disk:
        progress(len(residency.disk))
    return Transformer(args, globals_, layers, device)
