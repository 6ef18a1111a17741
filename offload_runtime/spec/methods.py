"""Speculative methods: how a node's children are drawn from the draft, paired with how they are verified.

Output is lossless only when the verifier's rule matches the way the children were drawn (spec/verify.py
proves each rule for its drawing), so the two are one object here and nothing else picks either half:

- sequoia:   children drawn without replacement (Gumbel-top-k); Sequoia's verifier (Q loses each rejected child)
- specinfer: children drawn independently, with replacement; SpecInfer's verifier (Q fixed)
- topk:      the draft's k most likely tokens (deterministic); each child tested as a point mass
- greedy:    temperature 0: the draft's top k by logit; the target's argmax path

`METHODS` is the one registry of names. A request at temperature 0 is always verified greedily
(`Method.for_sampling`), whatever method the engine was built with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..errors import UsageError
from ..model.tree import Tree
from .sampling import NodeRows, WarpedRows, gumbel_top_k, warp_probs
from .verify import VerifyResult, verify_greedy, verify_sequoia, verify_specinfer, verify_topk

Drawer = Callable[[Tensor, Sequence[int], torch.Generator], Tensor]  # probs [rows, V], k per row -> [rows, max k]
Verifier = Callable[..., VerifyResult]  # (tree, tokens, P [n, V], Q [n, V] | None, generator)


# --- the ways of drawing children (-1 marks a child that cannot be drawn: the support is smaller than k)


def draw_without_replacement(probs: Tensor, k: Sequence[int], generator: torch.Generator) -> Tensor:
    return gumbel_top_k(probs, list(k), generator)


def draw_with_replacement(probs: Tensor, k: Sequence[int], generator: torch.Generator) -> Tensor:
    return torch.multinomial(probs, max(k), replacement=True, generator=generator)


def draw_top_k(probs: Tensor, k: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
    values, ids = torch.topk(probs, min(max(k), probs.shape[-1]), dim=-1)
    return ids.masked_fill(values <= 0, -1)


def draw_top_logits(logits: Tensor, k: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
    return torch.topk(logits, min(max(k), logits.shape[-1]), dim=-1).indices


@dataclass(frozen=True)
class Drawn:
    """A level's children: tokens [rows, max k] (-1: absent), and Q [rows, V] they came from (None: greedy)."""

    tokens: Tensor
    probs: Tensor | None


@dataclass(frozen=True)
class Method:
    """A drawing rule and the verifier that is lossless for it."""

    name: str
    draw_children: Drawer
    verifier: Verifier
    greedy: bool = False  # children and verification by argmax: temperature 0

    def draft_probs(self, logits: Tensor, temperature: float, top_p: float) -> Tensor:
        """The draft's distribution at each row of logits [rows, V]: Q, warped as the target is, when sampling;
        at temperature 0 the plain softmax (verification never reads it; dynamic trees rank children by it)."""
        if self.greedy:
            return torch.softmax(logits.float(), dim=-1)
        return warp_probs(logits, temperature, top_p).float()

    def draw(self, logits: Tensor, temperature: float, top_p: float, k: Sequence[int],
             generator: torch.Generator, probs: Tensor | None = None) -> Drawn:
        """Children of each row of draft logits [rows, V]; k[r] of them for row r. `probs`: draft_probs(logits),
        when the caller has it already."""
        if self.greedy:  # greedy verification never reads Q, so no warping either
            return Drawn(self.draw_children(logits, k, generator), None)
        if probs is None:
            probs = self.draft_probs(logits, temperature, top_p)
        return Drawn(self.draw_children(probs, k, generator), probs)

    def verify(self, tree: Tree, tokens: Sequence[int], logits: Tensor, draft_probs: "Tensor | NodeRows | None",
               temperature: float, top_p: float, generator: torch.Generator) -> VerifyResult:
        """Walk the tree against the target's logits [n, V]; only the rows the walk visits are warped."""
        if self.greedy:
            return self.verifier(tree, tokens, logits)
        target = WarpedRows(logits, temperature, top_p)
        q = draft_probs if draft_probs is not None else NodeRows(*target.shape)  # no children: Q is never read
        return self.verifier(tree, tokens, target, q, generator)

    def for_sampling(self, temperature: float) -> "Method":
        return GREEDY if temperature == 0 else self


SEQUOIA = Method("sequoia", draw_without_replacement, verify_sequoia)
SPECINFER = Method("specinfer", draw_with_replacement, verify_specinfer)
TOPK = Method("topk", draw_top_k, verify_topk)
GREEDY = Method("greedy", draw_top_logits, verify_greedy, greedy=True)

METHODS: dict[str, Method] = {m.name: m for m in (SEQUOIA, SPECINFER, TOPK, GREEDY)}
SAMPLING_METHODS = tuple(name for name, m in METHODS.items() if not m.greedy)


def get_method(method: "str | Method") -> Method:
    """A Method by name (one of SAMPLING_METHODS), or the object itself."""
    if isinstance(method, Method):
        return method
    if method not in METHODS or METHODS[method].greedy:
        raise UsageError(f"unknown verification method {method!r}; use one of {', '.join(SAMPLING_METHODS)} "
                         f"(temperature 0 verifies greedily by itself)")
    return METHODS[method]


def verify(method: str, tree: Tree | Sequence[int], tokens: Tensor | Sequence[int], target_probs: Tensor,
           draft_probs: Tensor | None = None, generator: torch.Generator | None = None) -> VerifyResult:
    """The verifier of `method` (one of METHODS) on probabilities already warped; greedy needs no Q or generator."""
    if method not in METHODS:
        raise UsageError(f"unknown verification method {method!r}; choose one of {', '.join(METHODS)}")
    m = METHODS[method]
    if m.greedy:
        return m.verifier(tree, tokens, target_probs)
    return m.verifier(tree, tokens, target_probs, draft_probs, generator)
