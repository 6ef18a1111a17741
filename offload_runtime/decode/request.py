"""A generation in flight (`Request`), its sampling settings and its statistics. Token ids only: text lives in
api/text.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model.tree import Tree
from ..spec.growth import DynamicTree


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    ignore_eos: bool = False
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class SequenceStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0  # target sweeps that verified a tree for this sequence
    prefill_sweeps: int = 0  # sweeps that only cached prompt tokens
    prefill_tokens: int = 0  # tokens the target ran as pending chains (prompt, chat turns, cut paths)
    accepted_per_step: list[int] = field(default_factory=list)  # path length (without the bonus) per step
    accepted_ranks: list[tuple[int, ...]] = field(default_factory=list)  # per step: sibling rank of each path node
    tree_sizes: list[int] = field(default_factory=list)  # per step: nodes of the verified tree (grown trees vary)
    root_confidence: list[float] = field(default_factory=list)  # per drafted step: the draft's top probability at
    # the root (warped as sampled; the plain softmax when greedy): planner/acceptance.py bins acceptance by it
    draft_nodes: int = 0  # tree nodes the draft ran forward, catch-up chains left out
    # Time of the steps this sequence took part in, split by phase (in a batch the rows share them).
    time_s: float = 0.0
    draft_s: float = 0.0  # growing the trees
    sweep_s: float = 0.0  # the target's forward over every row's chunk
    host_s: float = 0.0  # verification walk, cache compaction, bookkeeping

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    def histogram(self) -> dict[int, int]:
        """Tokens emitted per step -> number of steps."""
        hist: dict[int, int] = {}
        for a in self.accepted_per_step:
            hist[a + 1] = hist.get(a + 1, 0) + 1
        return dict(sorted(hist.items()))

    def acceptance_by_depth(self) -> list[float]:
        """Fraction of steps whose accepted path reached depth k, for k = 1 .. deepest seen."""
        if not self.accepted_per_step:
            return []
        deepest = max(self.accepted_per_step)
        n = len(self.accepted_per_step)
        return [sum(a >= k for a in self.accepted_per_step) / n for k in range(1, deepest + 1)]


# (request, the step's tokens about to be emitted) -> None to go on, or k to stop after the first k of them (the
# step's tokens are not in request.tokens yet; every check sees each token once, in order).
StopCheck = Callable[["Request", list[int]], "int | None"]


@dataclass(eq=False)  # a request is equal only to itself (schedulers look requests up by identity)
class Request:
    """One generation in flight.

    Invariant kept by the decoder: tokens[-1] (the *root*) is not cached yet; tokens[cached:-1] are committed
    but not cached (a new prompt, a new chat turn, a path the draft never ran).
    """

    tokens: list[int]  # prompt + generated so far
    params: SamplingParams
    tree: Tree | DynamicTree = field(default_factory=lambda: Tree([-1]))  # every step's tree, or how to grow it
    eos_ids: frozenset[int] = frozenset()
    rng: torch.Generator | None = None  # verification and sampling (CPU)
    draft_rng: torch.Generator | None = None  # drafting noise (the draft's device)
    stop_check: StopCheck | None = None  # text-level stops (stop strings), set by the text layer
    row: int = -1
    n_prompt: int = 0
    target_cached: int = 0
    draft_cached: int = 0
    finish_reason: str | None = None  # "eos" | "length" | "context" | "stop" | "cancelled" | "error"
    error: Exception | None = None  # why decoding this request failed (finish_reason "error")
    stats: SequenceStats = field(default_factory=SequenceStats)

    def __post_init__(self) -> None:
        assert self.tokens, "a sequence needs at least one token"
        self.n_prompt = self.n_prompt or len(self.tokens)
        self.stats.prompt_tokens = self.n_prompt

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.n_prompt:]

    def fail(self, error: Exception) -> None:
        """End the request because decoding it raised `error`; its cached K/V is not to be trusted."""
        self.finish_reason, self.error = "error", error
        self.target_cached = self.draft_cached = 0

    def reset_tokens(self, tokens: list[int]) -> None:
        """Replace the token list (a new chat turn), keeping the longest cached prefix that still matches."""
        common = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            common += 1
        limit = min(common, len(tokens) - 1)
        self.target_cached = min(self.target_cached, limit)
        self.draft_cached = min(self.draft_cached, limit)
        self.tokens = list(tokens)
        self.n_prompt = len(tokens)
        self.finish_reason, self.error = None, None
        self.stats = SequenceStats(prompt_tokens=len(tokens))
