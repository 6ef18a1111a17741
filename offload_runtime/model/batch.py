"""One forward's inputs (`ForwardBatch`: tokens, positions, tree mask, cache slots) for a batch of cache rows.

Each row contributes a *chunk*: a tree over the tokens it has not cached yet (a prompt chain, a speculative
tree, or a chain with a tree grafted on its end). Chunk node t of row b is written at slot length_b + t and
sits at position length_b + depth(t); it attends to the row's whole committed prefix and to its own ancestors
in the chunk. A forward may run only some chunk nodes (the draft grows a tree one level at a time); the others
must already have been written by an earlier forward of the same step.

With a sliding window W, a token at position p sees only keys at positions p - W + 1 .. p (transformers'
rule). Positions, not slots, decide: a tree node sits at the position of its depth, like the token it would be
in the sequence of its own path. Models whose layers mix windowed and full attention (Qwen's
max_window_layers) need both masks, so the batch carries both once the window bites (where every layer slides,
the full one then goes unused: one boolean tensor per forward, small beside a layer's weights).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from .tree import Tree


@dataclass
class ForwardBatch:
    """What one forward processes: T new tokens for each of cache rows 0..B-1 (padded where rows differ)."""

    tokens: torch.Tensor  # [B, T] int64
    positions: torch.Tensor  # [B, T] int64
    mask: torch.Tensor  # [B, 1, T, S] bool over cache slots 0..S-1, full attention
    slots: torch.Tensor  # [B, T] int64: where each token's K/V is written
    logits_at: torch.Tensor  # [B, N] indices into T whose logits are wanted (N may be 0)
    window_mask: torch.Tensor | None = None  # `mask` cut to the sliding window; None: the window cuts nothing

    def to(self, device: torch.device) -> "ForwardBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return ForwardBatch(**{k: None if v is None else v.to(device, non_blocking=True) for k, v in moved.items()})


@dataclass
class RowChunk:
    length: int  # committed prefix length of this cache row
    tree: Tree  # the chunk's shape
    tokens: Sequence[int] | torch.Tensor  # [len(tree)] token of every chunk node
    run: Sequence[int]  # chunk nodes this forward computes, increasing
    logits_at: Sequence[int] = ()  # indices into `run` whose logits are wanted


def build_forward(rows: Sequence[RowChunk | None], scratch_slot: int, sliding_window: int | None,
                  device: torch.device | str) -> ForwardBatch:
    """Inputs for cache rows 0..len(rows)-1; a None row (a hole in the batch) only writes the scratch slot.

    `sliding_window` is the model's (ModelArgs.sliding_window): when it cuts anything, `window_mask` is set.
    """
    B = len(rows)
    live = [r for r in rows if r is not None]
    assert live, "a forward needs at least one row"
    T = max(len(r.run) for r in live)
    S = max(r.length + len(r.tree) for r in live)
    N = max(len(r.logits_at) for r in live)
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    slots = torch.full((B, T), scratch_slot, dtype=torch.long)
    mask = torch.zeros(B, 1, T, S, dtype=torch.bool)
    # Padded queries attend to slot 0 only, so every softmax row has a finite entry; their output is unused.
    mask[:, 0, :, 0] = True
    windowed = sliding_window is not None and S > sliding_window  # else no query is that far from a key
    window_mask = mask.clone() if windowed else None  # holes and padding as in `mask`
    logits_at = torch.zeros(B, N, dtype=torch.long)
    for b, r in enumerate(rows):
        if r is None:
            continue
        run = torch.as_tensor(list(r.run), dtype=torch.long)
        t = len(run)
        depth = torch.as_tensor(r.tree.depth, dtype=torch.long)
        chunk_tokens = torch.as_tensor(r.tokens, dtype=torch.long).cpu()
        assert chunk_tokens.shape == (len(r.tree),), (chunk_tokens.shape, len(r.tree))
        tokens[b, :t] = chunk_tokens[run]
        positions[b, :t] = r.length + depth[run]
        slots[b, :t] = r.length + run
        mask[b, 0, :t, : r.length] = True
        mask[b, 0, :t, r.length : r.length + len(r.tree)] = r.tree.ancestor_mask[run]
        if window_mask is not None:
            key_pos = torch.arange(S)
            key_pos[r.length : r.length + len(r.tree)] = r.length + depth
            window_mask[b] = mask[b]
            window_mask[b, 0, :t] &= (positions[b, :t, None] - key_pos[None, :]) < sliding_window
        if r.logits_at:
            logits_at[b, : len(r.logits_at)] = torch.as_tensor(list(r.logits_at), dtype=torch.long)
    return ForwardBatch(tokens, positions, mask, slots, logits_at, window_mask).to(torch.device(device))
