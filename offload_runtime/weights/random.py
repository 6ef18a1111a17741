"""Random weights of a model shape: the one builder behind benchmarks and profiles of published shapes.

`RandomWeights` reads like a checkpoint (`read_into(name, out)`), so models are built from it by the same
loader, host store and slots as from files. Values are normal(0, std), norms are ones; each tensor is a
function of (seed, name) only, so a tensor reads the same whatever dtype or buffer it lands in.
"""
from __future__ import annotations

import hashlib
import re

import torch

from ..model.config import ModelArgs

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class RandomWeights:
    """A weight source for `args` with random weights.

    distinct_layers=False gives every decoder layer layer 0's weights (generated once, then copied): building
    a 13B shape then costs one layer of random draws, and a sweep still moves every layer's own bytes.
    """

    def __init__(self, args: ModelArgs, seed: int = 0, std: float = 0.02, distinct_layers: bool = True):
        self.args, self.seed, self.std, self.distinct_layers = args, seed, std, distinct_layers
        self.label = f"random weights (seed {seed})"
        self._first_layer: dict[str, torch.Tensor] = {}

    @property
    def fingerprint(self) -> str:
        """Changes with anything that changes the weights (a disk store of them is keyed by it)."""
        return hashlib.sha256(repr((self.args, self.seed, self.std, self.distinct_layers)).encode()).hexdigest()

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        if not self.distinct_layers:
            base = _LAYER.sub("model.layers.0.", name)
            if base != name or name.startswith("model.layers.0."):
                if base not in self._first_layer:
                    self._first_layer[base] = self._draw(base, torch.empty_like(out))
                return out.copy_(self._first_layer[base])
        return self._draw(name, out)

    def _draw(self, name: str, out: torch.Tensor) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return out.fill_(1.0)
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        g = torch.Generator(device=out.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        if out.dtype == torch.uint8:  # a GGUF linear's blocks (model/ggml.py): random bytes, timed, never trusted
            return out.random_(0, 256, generator=g)
        return out.normal_(0.0, self.std, generator=g)
