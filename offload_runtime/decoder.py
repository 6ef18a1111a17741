"""The speculative step over a batch of sequences: draft a tree, one target sweep, verify, commit.

The decoder knows only token ids. Each sequence owns one row of the target's and the draft's KV caches and
keeps the invariant: its last token (the *root*) is not cached yet; tokens[cached:-1] are committed but not
cached (a new prompt, a new chat turn, a path the draft never ran). One target forward per step runs, for every
row, that pending chain with the step's tree grafted onto its end, so prefill and verification share a sweep.
Plain decoding is the same step with a one-node tree.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import sampling, verify
from .inputs import RowChunk, build_forward
from .kv_cache import KVCache
from .model import Transformer
from .tree import Tree


@dataclass
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
    # Wall time of the sweeps this sequence took part in, split by phase (in a batch the rows share them).
    time_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0  # the target sweep
    other_s: float = 0.0  # verification walk, cache compaction, bookkeeping

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


@dataclass
class Request:
    """One generation in flight."""

    tokens: list[int]  # prompt + generated so far; tokens[-1] is the root
    params: SamplingParams
    eos_ids: frozenset[int] = frozenset()
    row: int = -1
    n_prompt: int = 0
    target_cached: int = 0
    draft_cached: int = 0
    finish_reason: str | None = None  # "eos" | "length" | "context" | "stop"
    stats: SequenceStats = field(default_factory=SequenceStats)
    rng: torch.Generator | None = None  # verification and sampling (CPU)
    draft_rng: torch.Generator | None = None  # drafting noise (the draft's device)
    on_tokens: Callable[["Request", list[int]], bool] | None = None  # returns True to stop (stop strings)
    stop: tuple[str, ...] = ()  # text-level stop strings; the engine checks them through on_tokens

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
        self.finish_reason = None


@dataclass
class StepTimes:
    draft_s: float = 0.0
    verify_s: float = 0.0  # the target sweep
    other_s: float = 0.0  # verification walk, cache compaction, bookkeeping
    steps: int = 0  # target sweeps

    def add(self, other: "StepTimes") -> None:
        for f in ("draft_s", "verify_s", "other_s", "steps"):
            setattr(self, f, getattr(self, f) + getattr(other, f))


# --- drafting a level's children


def draw_children(method: str, probs: torch.Tensor, k: list[int], generator: torch.Generator) -> torch.Tensor:
    """Children tokens [rows, max k] for each row of draft probabilities, as each verifier expects them drawn.

    sequoia: without replacement (Gumbel-top-k); specinfer: independently, with replacement; topk: the draft's k
    most likely tokens. -1 marks a child that cannot be drawn (the support is smaller than k).
    """
    kmax = max(k)
    if method == "sequoia":
        return sampling.gumbel_top_k(probs, k, generator)
    if method == "specinfer":
        return torch.multinomial(probs, kmax, replacement=True, generator=generator)
    assert method == "topk", method
    values, ids = torch.topk(probs, min(kmax, probs.shape[-1]), dim=-1)
    return ids.masked_fill(values <= 0, -1)


# --- the decoder


class Decoder:
    def __init__(self, target: Transformer, target_cache: KVCache, draft: Transformer | None = None,
                 draft_cache: KVCache | None = None, tree: Tree | None = None, method: str = "sequoia",
                 max_chunk: int = 2048):
        assert (draft is None) == (draft_cache is None)
        self.target, self.target_cache = target, target_cache
        self.draft, self.draft_cache = draft, draft_cache
        self.tree = tree if (tree is not None and draft is not None) else Tree([-1])
        assert method in verify.METHODS and method != "greedy", method
        self.method = method  # for sampled decoding; temperature 0 always verifies greedily
        self.max_chunk = max_chunk
        self.vocab = target.args.vocab_size
        self.times = StepTimes()

    def _sync(self) -> None:
        for dev in {self.target.device, self.draft.device if self.draft else self.target.device}:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

    def set_tree(self, tree: Tree) -> None:
        """Use another tree from the next step on (benchmarks compare tree shapes on one loaded engine)."""
        self.tree = tree if self.draft is not None else Tree([-1])

    # --- one step

    def step(self, rows: Sequence[Request | None]) -> None:
        """Advance every live row by one target sweep (a prefill chunk, or a verified tree)."""
        t0 = time.perf_counter()
        live = [(b, s) for b, s in enumerate(rows) if s is not None and not s.done]
        assert live
        for b, s in live:
            assert s.row == b, "a sequence must sit in the cache row of its batch position"
        # Rows whose pending chain is too long only prefill this sweep (no tree).
        prefill_only = {b for b, s in live if len(s.tokens) - 1 - s.target_cached > self.max_chunk}
        trees: dict[int, Tree] = {}
        for b, s in live:
            if b in prefill_only:
                continue
            room = self.target_cache.max_len - (len(s.tokens) - 1)
            tree = self.tree if len(self.tree) <= room and s.params.max_new_tokens - len(s.generated) > 1 else Tree([-1])
            trees[b] = tree
        # Drafting: every row with a tree of more than one node.
        drafted: dict[int, tuple[list[int], torch.Tensor | None]] = {}
        spec_rows = [(b, s) for b, s in live if b in trees and len(trees[b]) > 1]
        if spec_rows:
            drafted = self._draft(spec_rows, trees)
        for b, s in live:
            if b in trees and b not in drafted:
                drafted[b] = ([s.tokens[-1]], None)
        self._sync()
        t1 = time.perf_counter()

        # The target sweep.
        chunks: list[RowChunk | None] = [None] * len(rows)
        for b, s in live:
            pending = s.tokens[s.target_cached:-1]
            if b in prefill_only:
                chain = pending[: self.max_chunk]
                chunks[b] = RowChunk(s.target_cached, Tree.chain(len(chain)), chain, range(len(chain)), ())
            else:
                tree = trees[b]
                full = tree.graft(len(pending))
                tokens = pending + drafted[b][0]
                p = len(pending)
                chunks[b] = RowChunk(s.target_cached, full, [max(t, 0) for t in tokens], range(len(full)),
                                     range(p, p + len(tree)))
        batch = build_forward(chunks, self.target_cache.scratch_slot, self.target.args.sliding_window,
                              self.target.device)
        logits = self.target.forward(batch, self.target_cache)  # [B, n, V]
        self._sync()
        t2 = time.perf_counter()

        for b, s in live:
            pending = len(s.tokens) - 1 - s.target_cached
            if b in prefill_only:
                n_chain = len(chunks[b].run)
                s.target_cached = self.target_cache.keep(b, s.target_cached, range(n_chain))
                s.stats.prefill_sweeps += 1
                s.stats.prefill_tokens += n_chain
                continue
            self._verify_and_commit(s, trees[b], drafted[b], logits[b, : len(trees[b])], pending)
        t3 = time.perf_counter()
        self.times.add(StepTimes(draft_s=t1 - t0, verify_s=t2 - t1, other_s=t3 - t2, steps=1))
        for _, s in live:
            s.stats.time_s += t3 - t0
            s.stats.draft_s += t1 - t0
            s.stats.verify_s += t2 - t1
            s.stats.other_s += t3 - t2

    # --- drafting

    def _draft(self, spec_rows: list[tuple[int, Request]], trees: dict[int, Tree]):
        """Grow each row's tree level by level; returns {row: (tokens per node, Q per node [n, V])}."""
        draft, cache = self.draft, self.draft_cache
        assert draft is not None and cache is not None
        B = max(b for b, _ in spec_rows) + 1
        state = {}
        # Catch the draft cache up on long pending chains first (prompts), in chunks.
        for b, s in spec_rows:
            while len(s.tokens) - 1 - s.draft_cached > self.max_chunk:
                chain = s.tokens[s.draft_cached: s.draft_cached + self.max_chunk]
                rows: list[RowChunk | None] = [None] * B
                rows[b] = RowChunk(s.draft_cached, Tree.chain(len(chain)), chain, range(len(chain)), ())
                draft.forward(build_forward(rows, cache.scratch_slot, draft.args.sliding_window, draft.device), cache)
                s.draft_cached = cache.keep(b, s.draft_cached, range(len(chain)))
        for b, s in spec_rows:
            catch = s.tokens[s.draft_cached:-1]
            tree = trees[b]
            full = tree.graft(len(catch))
            tokens = catch + [s.tokens[-1]] + [0] * (len(tree) - 1)
            q = None if s.params.greedy else torch.zeros(len(tree), self.vocab, dtype=torch.float32, device=draft.device)
            state[b] = (s, tree, full, tokens, len(catch), q)
        max_depth = max(trees[b].max_depth for b, _ in spec_rows)
        for level in range(max_depth):
            rows = [None] * B
            runs: dict[int, list[int]] = {}
            for b, (s, tree, full, tokens, c, q) in state.items():
                if level >= len(tree.levels):
                    continue
                nodes = [u for u in tree.levels[level] if tree.children[u]]
                if not nodes:
                    continue
                run = (list(range(c)) if level == 0 else []) + [c + u for u in nodes]
                runs[b] = nodes
                rows[b] = RowChunk(s.draft_cached, full, [max(t, 0) for t in tokens], run,
                                   range(len(run) - len(nodes), len(run)))
            if not runs:
                break
            logits = draft.forward(build_forward(rows, cache.scratch_slot, draft.args.sliding_window, draft.device),
                                   cache)  # [B, N, Vd]
            for b, nodes in runs.items():
                s, tree, full, tokens, c, q = state[b]
                row_logits = self._draft_logits(logits[b, : len(nodes)])
                k = [len(tree.children[u]) for u in nodes]
                if s.params.greedy:  # the draft's top-k; greedy verification never reads Q
                    kids = torch.topk(row_logits, max(k), dim=-1).indices
                else:
                    probs = sampling.warp_probs(row_logits, s.params.temperature, s.params.top_p).float()
                    kids = draw_children(self.method, probs, k, s.draft_rng)
                    q[nodes] = probs
                kids = kids.tolist()
                for u, ku, row in zip(nodes, k, kids):
                    for j, child in enumerate(tree.children[u]):
                        tokens[c + child] = row[j] if j < len(row) else -1
        out = {}
        for b, (s, tree, full, tokens, c, q) in state.items():
            out[b] = (tokens[c:], q)
        return out

    def _draft_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits over the target's vocabulary: cut or pad (-inf) where the two sizes differ."""
        vd = logits.shape[-1]
        if vd == self.vocab:
            return logits
        if vd > self.vocab:
            return logits[..., : self.vocab]
        pad = logits.new_full((*logits.shape[:-1], self.vocab - vd), float("-inf"))
        return torch.cat([logits, pad], dim=-1)

    # --- verification and commit

    def _verify_and_commit(self, s: Request, tree: Tree, drafted: tuple[list[int], torch.Tensor | None],
                           logits: torch.Tensor, pending: int) -> None:
        node_tokens, q = drafted
        params = s.params
        if params.greedy:
            result = verify.verify_greedy(list(tree.parents), node_tokens, logits)
        else:
            P = sampling.WarpedRows(logits, params.temperature, params.top_p)  # only the walk's rows get warped
            Q = q if q is not None else torch.zeros(P.shape, device=logits.device)
            result = verify.verify(self.method, list(tree.parents), node_tokens, P, Q, s.rng)
        emitted = [node_tokens[u] for u in result.path] + [result.bonus_token]
        # Cut where EOS, max_new_tokens or a stop condition fall.
        budget = params.max_new_tokens - len(s.generated)
        emitted = emitted[:budget]
        finish = "length" if len(s.generated) + len(emitted) >= params.max_new_tokens else None
        if not params.ignore_eos:
            for i, t in enumerate(emitted):
                if t in s.eos_ids:
                    emitted, finish = emitted[: i + 1], "eos"
                    break
        accepted_nodes = [0] + result.path[: len(emitted) - 1]
        s.target_cached = self.target_cache.keep(
            s.row, s.target_cached, list(range(pending)) + [pending + u for u in accepted_nodes])
        if self.draft_cache is not None and len(tree) > 1:
            catch = len(s.tokens) - 1 - s.draft_cached
            ran = set(tree.internal)
            kept = 0
            while kept < len(accepted_nodes) and accepted_nodes[kept] in ran:
                kept += 1
            s.draft_cached = self.draft_cache.keep(
                s.row, s.draft_cached, list(range(catch)) + [catch + u for u in accepted_nodes[:kept]])
        s.stats.prefill_tokens += pending
        s.stats.steps += 1
        s.stats.accepted_per_step.append(len(emitted) - 1)
        s.stats.accepted_ranks.append(tuple(tree.children[tree.parents[u]].index(u) + 1 for u in result.path))
        s.tokens.extend(emitted)
        s.stats.new_tokens = len(s.generated)
        if finish is None and s.on_tokens is not None and s.on_tokens(s, emitted):
            finish = "stop"
        if finish is None and len(s.tokens) > self.target_cache.max_len:
            finish = "context"
        s.finish_reason = finish
