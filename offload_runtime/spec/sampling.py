"""Token sampling: temperature / top-p warping, multinomial draws, Gumbel-top-k, generators.

`warp_probs` reproduces what transformers' `generate(do_sample=True, top_k=0)` samples from:
`TemperatureLogitsWarper` (skipped at temperature 1), then `TopPLogitsWarper` with
min_tokens_to_keep = 1 (skipped at top_p 1), then a softmax, all in float32 (float64 inputs stay
float64, which the exactness tests use). The target and the draft are warped the same way, so the
verifier compares P and Q on equal terms.

All randomness comes from a `torch.Generator` passed in; `make_generator` is the one place that
builds one from a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import UsageError

__all__ = ["MAX_TEMPERATURE", "check_warp", "make_generator", "warp_probs", "WarpedRows", "NodeRows", "gumbel_top_k"]

MAX_TEMPERATURE = 100.0  # beyond this every distribution is uniform to float precision


# --- generators


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded with `seed` (the same seed gives the same draws)."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int(seed))
    return generator


# --- warping


def check_warp(temperature: float, top_p: float) -> None:
    """The one check of sampling settings (the API, the command lines, the planner and the warpers use it)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and 0 <= temperature <= MAX_TEMPERATURE):
        raise UsageError(f"temperature must be a number from 0 to {MAX_TEMPERATURE:g} (0 = greedy), "
                         f"got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1] (1 disables top-p), got {top_p!r}")


def _warp_dtype(dtype: torch.dtype) -> torch.dtype:
    # generate() upcasts logits to float32 before the warpers; float64 is kept for exactness tests
    return torch.float64 if dtype == torch.float64 else torch.float32


def _top_p_mask(scores: Tensor, top_p: float) -> Tensor:
    """Boolean mask of the tokens TopPLogitsWarper removes; scores is [B, V]."""
    # Same operations as the warper, so ties are broken identically: an ascending (non-stable)
    # sort, the cumulative mass of the *least* likely tokens, removal while it is <= 1 - top_p
    # (so mass exactly on the boundary is removed), and the most likely token always kept.
    sorted_scores, order = torch.sort(scores, descending=False)
    tail_mass = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = tail_mass <= (1 - top_p)
    remove_sorted[..., -1:] = False
    return remove_sorted.scatter(-1, order, remove_sorted)


def warp_probs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """Probabilities [..., V] after temperature then top-p warping, as transformers does it.

    temperature == 0 means greedy: the one-hot distribution on the argmax (ties -> lowest index).
    Computed in float32, or float64 if `logits` is float64.
    """
    check_warp(temperature, top_p)
    assert logits.dim() >= 1 and logits.shape[-1] > 0, f"logits must be [..., V], got {tuple(logits.shape)}"
    scores = logits.to(_warp_dtype(logits.dtype))
    if temperature == 0:
        winner = scores.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(scores).scatter_(-1, winner, 1.0)
    if temperature != 1.0:
        scores = scores / float(temperature)
    if top_p < 1.0:
        flat = scores.reshape(-1, scores.shape[-1])
        flat = flat.masked_fill(_top_p_mask(flat, float(top_p)), -math.inf)
        scores = flat.reshape(scores.shape)
    return scores.softmax(dim=-1)


class WarpedRows:
    """warp_probs(logits) [n, V], computed one row at a time when a row is first read.

    The verifier walks a handful of the tree's n rows; warping only those saves a vocabulary-wide sort per
    unvisited node when top-p is on. Indexing a row gives exactly warp_probs(logits[row]).
    """

    def __init__(self, logits: Tensor, temperature: float, top_p: float):
        assert logits.dim() == 2, f"logits must be [n, V], got {tuple(logits.shape)}"
        check_warp(temperature, top_p)
        self.logits, self.temperature, self.top_p = logits, temperature, top_p
        self._rows: dict[int, Tensor] = {}

    @property
    def shape(self) -> torch.Size:
        return self.logits.shape

    def dim(self) -> int:
        return 2

    def __getitem__(self, row: int) -> Tensor:
        row = int(row)
        if row not in self._rows:
            self._rows[row] = warp_probs(self.logits[row], self.temperature, self.top_p)
        return self._rows[row]


class NodeRows:
    """An [n, V] table of per-node distributions that is never materialised: each node's row stays in the
    tensor it was computed in (one tree level's draft probabilities) and is looked up when read.

    The draft computes Q for the internal nodes only, one level at a time; the verifier reads the rows of the
    few nodes its walk visits. Copying every level into an [n, V] table would move n x V floats per step
    (512 nodes x 128k tokens is 256 MB) for a handful of reads.
    """

    def __init__(self, n: int, vocab: int):
        self.shape = torch.Size((n, vocab))
        self._rows: dict[int, tuple[Tensor, int]] = {}

    def dim(self) -> int:
        return 2

    def put(self, nodes: Sequence[int], probs: Tensor) -> None:
        """Rows of `probs` [len(nodes), V] are the distributions at `nodes`."""
        assert probs.shape == (len(nodes), self.shape[1]), (probs.shape, len(nodes))
        for j, u in enumerate(nodes):
            self._rows[u] = (probs, j)

    def __getitem__(self, node: int) -> Tensor:
        probs, j = self._rows[int(node)]
        return probs[j]


# --- drawing tokens


def gumbel_top_k(probs: Tensor, k: int | Sequence[int] | Tensor, generator: torch.Generator) -> Tensor:
    """k distinct tokens drawn without replacement from probs, in sampling order.

    Gumbel-top-k: the k largest of log(probs) + Gumbel noise are distributed as k successive draws
    without replacement. Zero-probability tokens are never returned, so k is capped by the support.

    probs [V], k int           -> int64 [min(k, support)].
    probs [B, V], k int or [B] -> int64 [B, max(k)], row b holding min(k[b], support_b) tokens and
                                  then -1 padding (always at the end of the row). No host sync
                                  unless k is a tensor (its max is read).
    """
    assert probs.dim() in (1, 2), f"probs must be [V] or [B, V], got {tuple(probs.shape)}"
    rows = probs.reshape(-1, probs.shape[-1])
    batch, vocab = rows.shape
    if isinstance(k, int):
        k_max = k
        row_k = None
    else:
        assert probs.dim() == 2, "a per-row k needs probs of shape [B, V]"
        row_k = torch.as_tensor(k, dtype=torch.int64, device=probs.device)
        assert row_k.shape == (batch,), f"per-row k must have shape [{batch}], got {tuple(row_k.shape)}"
        k_max = int(row_k.max()) if batch else 0
        if bool((row_k < 0).any()):
            raise UsageError(f"k must be >= 0 in every row, got {row_k.tolist()}")
    if k_max < 0:
        raise UsageError(f"k must be >= 0, got {k}")

    dtype = _warp_dtype(rows.dtype)
    # Exponential race in log space: -log(E) with E ~ Exp(1) is a Gumbel. E is clamped away from 0
    # (a float draw of exactly 0 would otherwise win regardless of its probability) and the keys
    # stay finite for tiny positive probabilities; log(0) = -inf marks tokens that must never win.
    exp_noise = torch.empty((batch, vocab), dtype=dtype, device=rows.device).exponential_(generator=generator)
    exp_noise.clamp_(min=torch.finfo(dtype).tiny)
    keys = rows.to(dtype).log() - exp_noise.log()
    taken = min(k_max, vocab)
    top_keys, top_ids = torch.topk(keys, taken, dim=-1, largest=True, sorted=True)
    invalid = top_keys == -math.inf
    if row_k is not None:
        column = torch.arange(taken, device=rows.device)
        invalid |= column[None, :] >= row_k[:, None]
    top_ids = top_ids.masked_fill(invalid, -1)
    if probs.dim() == 1:
        return top_ids[0][~invalid[0]]
    if taken < k_max:
        top_ids = torch.nn.functional.pad(top_ids, (0, k_max - taken), value=-1)
    return top_ids
