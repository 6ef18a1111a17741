"""What the loader reads weights from: a checkpoint's shards, or random weights of a shape."""
from __future__ import annotations

from typing import Protocol

import torch

from ..model.config import ModelArgs


class WeightSource(Protocol):
    """Tensors by their transformers name (`model.layers.3.mlp.up_proj.weight`), read into caller memory."""

    args: ModelArgs
    label: str  # how messages name it: a checkpoint directory, "random weights", ...

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Fill `out` (CPU, contiguous, the tensor's shape, any float dtype) with tensor `name`; returns out."""
        ...
