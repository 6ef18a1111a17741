"""Load a checkpoint's tensors onto a device: the global weights, and whole resident decoder layers."""
from __future__ import annotations

import torch

from .checkpoint import Checkpoint
from .model import GlobalWeights


def load_tensor(ckpt: Checkpoint, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = ckpt.load(name, dtype)
    return t if device.type == "cpu" else t.to(device)


def load_globals(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device) -> GlobalWeights:
    embed = load_tensor(ckpt, "model.embed_tokens.weight", dtype, device)
    lm_head = embed if ckpt.args.tie_word_embeddings else load_tensor(ckpt, "lm_head.weight", dtype, device)
    return GlobalWeights(embed=embed, norm=load_tensor(ckpt, "model.norm.weight", dtype, device), lm_head=lm_head)


def load_layer(ckpt: Checkpoint, i: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{i}."
    return {name[len(prefix):]: load_tensor(ckpt, name, dtype, device) for name in ckpt.layer_names(i)}
