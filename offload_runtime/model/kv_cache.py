"""A static, preallocated KV cache with one row per sequence.

Each row holds its committed prefix in slots 0..length-1 (the sequence in the row knows its length; the cache
does not keep a second copy). A forward writes new tokens (a prompt chunk, a token tree) at slots length,
length+1, ...; `keep` then moves the K/V of the accepted ones to the end of the committed prefix, so the prefix
stays contiguous and a token's slot equals its position.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .config import ModelArgs


class KVCache:
    def __init__(self, args: ModelArgs, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        self.max_len = max_len
        # [L, k|v, B, H_kv, S + 1, Dh]; slot S is a scratch slot that padded queries write to.
        self.kv = torch.zeros(args.n_layers, 2, batch, args.n_kv_heads, max_len + 1, args.head_dim,
                              dtype=dtype, device=device)
        # Each layer's (k, v) [B, H_kv, S + 1, Dh], made once: views of `kv`, so `keep` and `clear` show in them.
        self.layer_views = [tuple(layer.unbind(0)) for layer in self.kv.unbind(0)]

    @property
    def batch(self) -> int:
        return self.kv.shape[2]

    @property
    def scratch_slot(self) -> int:
        return self.max_len

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def clear(self, row: int) -> None:
        """Zero a row. What a failed request left there (NaN K/V, say) must not reach the row's next user: its
        masked-out positions still meet these values, and a zero attention weight times NaN is NaN."""
        self.kv[:, :, row].zero_()

    def keep(self, row: int, start: int, indices: Sequence[int]) -> int:
        """Move the K/V written at slots start + indices (increasing) to slots start.. ; returns the new length."""
        m = len(indices)
        assert all(b > a for a, b in zip(indices, indices[1:])), indices
        assert not m or (indices[0] >= 0 and start + indices[-1] < self.max_len), (start, indices)
        # indices[j] >= j, so reading the sources before writing never overwrites an unread source.
        if list(indices) != list(range(m)):
            src = torch.tensor(indices, device=self.kv.device) + start
            kv_row = self.kv[:, :, row]  # [L, 2, H_kv, S + 1, Dh], a view
            kv_row[:, :, :, start:start + m] = kv_row[:, :, :, src]
        return start + m
