"""The speculative step over a batch of sequences, in three phases: draft the trees, the target sweep, verify
and commit.

The decoder knows only token ids. Each sequence owns one row of the target's and the draft's KV caches and
keeps the invariant of `Request`: its last token (the *root*) is not cached yet; tokens[cached:-1] are
committed but not cached. One target forward per step runs, for every row, that pending chain with the row's
tree grafted onto its end, so prefill and verification share a sweep. Plain decoding is the same step with a
one-node tree. Every row has its own tree (its request's) and its own sampling settings; one draft forward
per tree level serves all rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..model.batch import RowChunk, build_forward
from ..model.kv_cache import KVCache
from ..model.transformer import Transformer
from ..model.tree import Tree
from ..spec.methods import Method, get_method
from ..spec.sampling import NodeRows
from .request import Request
from .timing import StepClock, StepTimes

ONE_NODE = Tree([-1])


@dataclass
class RowStep:
    """One live row's share of a step."""

    seq: Request
    pending: int  # committed tokens the target cache lacks: run as a chain in front of the tree
    tree: Tree | None  # the row's speculation tree this step; None: the sweep only prefills (long chain)
    method: Method  # how its children are drawn and verified (greedy at temperature 0)
    tokens: list[int]  # the token of every tree node, node 0 (the root) first; filled by draft_trees
    draft_probs: NodeRows | None = None  # Q at every internal node [n, V] when drafting samples; else None


@dataclass
class Growth:
    """A row's tree while the draft grows it, one level per draft forward."""

    step: RowStep
    catch: int  # tokens the draft cache lacks before the root: they run with level 0
    chunk: Tree  # the tree grafted on that catch-up chain
    tokens: list[int]  # catch-up tokens, then the tree's (filled level by level; -1: not drawn)


class Decoder:
    def __init__(self, target: Transformer, target_cache: KVCache, draft: Transformer | None = None,
                 draft_cache: KVCache | None = None, method: str | Method = "sequoia", max_chunk: int = 2048,
                 clock: StepClock | None = None):
        assert (draft is None) == (draft_cache is None)
        self.target, self.target_cache = target, target_cache
        self.draft, self.draft_cache = draft, draft_cache
        self.method = get_method(method)  # for sampled requests; temperature 0 always verifies greedily
        self.max_chunk = max_chunk
        self.vocab = target.args.vocab_size
        self.clock = clock or StepClock(target.device)
        self.times = StepTimes()  # every resolved step, for stats screens

    # --- one step

    def step(self, rows: Sequence[Request | None]) -> None:
        """Advance every live row by one target sweep (a prefill chunk, or a verified tree)."""
        live = [s for s in rows if s is not None and not s.done]
        assert live
        assert all(rows[s.row] is s for s in live), "a sequence must sit in the cache row of its batch position"
        marks = self.clock.start()
        plan = [self._plan_row(s) for s in live]
        # 1. Draft the trees: one draft forward per level for every row that speculates.
        self.draft_trees([r for r in plan if r.tree is not None and len(r.tree) > 1])
        marks.mark()
        # 2. The target sweep: every row's pending chain and tree in one forward.
        logits = self.target_sweep(plan, len(rows))  # [B, N, V]
        marks.mark()
        # 3. Verify each tree and commit the accepted path to both caches.
        for r in plan:
            if r.tree is None:
                self._commit_prefill(r)
            else:
                self.verify_and_commit(r, logits[r.seq.row, : len(r.tree)])
        marks.mark()
        seqs = [r.seq for r in plan]
        self.clock.finish(marks, lambda t: self._record(t, seqs))

    def _plan_row(self, s: Request) -> RowStep:
        pending = len(s.tokens) - 1 - s.target_cached
        method = self.method.for_sampling(s.params.temperature)
        if pending > self.max_chunk:  # too long for one forward: this sweep only prefills
            return RowStep(s, pending, None, method, [])
        room = self.target_cache.max_len - (len(s.tokens) - 1)
        speculate = (self.draft is not None and len(s.tree) <= room
                     and s.params.max_new_tokens - len(s.generated) > 1)
        tree = s.tree if speculate else ONE_NODE
        return RowStep(s, pending, tree, method, [s.tokens[-1]] + [-1] * (len(tree) - 1))

    def _record(self, times: StepTimes, seqs: list[Request]) -> None:
        self.times.add(times)
        for s in seqs:
            s.stats.time_s += times.total_s
            s.stats.draft_s += times.draft_s
            s.stats.sweep_s += times.sweep_s
            s.stats.host_s += times.host_s

    # --- 1. drafting

    def draft_trees(self, rows: list[RowStep]) -> None:
        """Grow each row's tree level by level: fills `tokens` (and `draft_probs` when sampling)."""
        if not rows:
            return
        draft, cache = self.draft, self.draft_cache
        assert draft is not None and cache is not None
        B = max(r.seq.row for r in rows) + 1
        for r in rows:
            self._catch_up_draft(r.seq, B)
        growing = []
        for r in rows:
            s = r.seq
            catch = s.tokens[s.draft_cached:-1]
            growing.append(Growth(r, len(catch), r.tree.graft(len(catch)), catch + r.tokens))
            if not r.method.greedy:
                r.draft_probs = NodeRows(len(r.tree), self.vocab)
        for level in range(max(r.tree.max_depth for r in rows)):
            chunks: list[RowChunk | None] = [None] * B
            expanding: dict[int, tuple[Growth, list[int]]] = {}
            for g in growing:
                tree = g.step.tree
                if level >= len(tree.levels):
                    continue
                nodes = [u for u in tree.levels[level] if tree.children[u]]
                if not nodes:
                    continue
                run = (list(range(g.catch)) if level == 0 else []) + [g.catch + u for u in nodes]
                chunks[g.step.seq.row] = RowChunk(g.step.seq.draft_cached, g.chunk, self._draft_ids(g.tokens),
                                                  run, range(len(run) - len(nodes), len(run)))
                expanding[g.step.seq.row] = (g, nodes)
            if not expanding:
                break
            logits = draft.forward(build_forward(chunks, cache.scratch_slot, draft.args.sliding_window,
                                                 draft.device), cache)  # [B, N, Vd]
            for b, (g, nodes) in expanding.items():
                r, tree = g.step, g.step.tree
                k = [len(tree.children[u]) for u in nodes]
                params = r.seq.params
                drawn = r.method.draw(self._draft_logits(logits[b, : len(nodes)]), params.temperature,
                                      params.top_p, k, r.seq.draft_rng)
                if drawn.probs is not None:
                    r.draft_probs.put(nodes, drawn.probs)
                for u, row in zip(nodes, drawn.tokens.tolist()):
                    for j, child in enumerate(tree.children[u]):
                        token = row[j] if j < len(row) else -1
                        g.tokens[g.catch + child] = r.tokens[child] = token

    def _catch_up_draft(self, s: Request, B: int) -> None:
        """Run a long pending chain (a prompt) through the draft in chunks, so level 0 stays small."""
        draft, cache = self.draft, self.draft_cache
        while len(s.tokens) - 1 - s.draft_cached > self.max_chunk:
            chain = s.tokens[s.draft_cached: s.draft_cached + self.max_chunk]
            chunks: list[RowChunk | None] = [None] * B
            chunks[s.row] = RowChunk(s.draft_cached, Tree.chain(len(chain)), self._draft_ids(chain),
                                     range(len(chain)), ())
            draft.forward(build_forward(chunks, cache.scratch_slot, draft.args.sliding_window, draft.device), cache)
            s.draft_cached = cache.keep(s.row, s.draft_cached, range(len(chain)))

    def _draft_ids(self, tokens: Sequence[int]) -> list[int]:
        """Tokens as the draft's embedding takes them: a node not drawn yet (-1) as 0, and an id past the draft's
        table (a padding row of a larger target table, which sampling can emit) as its last row. The draft only
        proposes, so what it sees there can change acceptance, never the output."""
        top = self.draft.args.vocab_size - 1
        return [min(max(t, 0), top) for t in tokens]

    def _draft_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits over the target's vocabulary: cut or pad (-inf) where the two sizes differ."""
        vd = logits.shape[-1]
        if vd == self.vocab:
            return logits
        if vd > self.vocab:
            return logits[..., : self.vocab]
        pad = logits.new_full((*logits.shape[:-1], self.vocab - vd), float("-inf"))
        return torch.cat([logits, pad], dim=-1)

    # --- 2. the target sweep

    def target_sweep(self, plan: list[RowStep], batch: int) -> torch.Tensor:
        """One target forward over every row's chunk; logits [B, N, V] at each row's tree nodes."""
        chunks: list[RowChunk | None] = [None] * batch
        for r in plan:
            s = r.seq
            pending = s.tokens[s.target_cached:-1]
            if r.tree is None:
                chain = pending[: self.max_chunk]
                chunks[s.row] = RowChunk(s.target_cached, Tree.chain(len(chain)), chain, range(len(chain)), ())
            else:
                full = r.tree.graft(len(pending))
                tokens = pending + [max(t, 0) for t in r.tokens]
                p = len(pending)
                chunks[s.row] = RowChunk(s.target_cached, full, tokens, range(len(full)), range(p, p + len(r.tree)))
        batch_inputs = build_forward(chunks, self.target_cache.scratch_slot, self.target.args.sliding_window,
                                     self.target.device)
        return self.target.forward(batch_inputs, self.target_cache)

    # --- 3. verification and commit

    def _commit_prefill(self, r: RowStep) -> None:
        s = r.seq
        n_chain = min(r.pending, self.max_chunk)
        s.target_cached = self.target_cache.keep(s.row, s.target_cached, range(n_chain))
        s.stats.prefill_sweeps += 1
        s.stats.prefill_tokens += n_chain

    def verify_and_commit(self, r: RowStep, logits: torch.Tensor) -> None:
        """Walk the row's tree against the target's logits [n, V], emit the accepted path and the bonus token,
        and keep exactly those tokens' K/V in both caches."""
        s, tree, params = r.seq, r.tree, r.seq.params
        result = r.method.verify(tree, r.tokens, logits, r.draft_probs, params.temperature, params.top_p, s.rng)
        emitted = [r.tokens[u] for u in result.path] + [result.bonus_token]
        # Cut where EOS, max_new_tokens or a stop condition fall.
        budget = params.max_new_tokens - len(s.generated)
        emitted = emitted[:budget]
        finish = "length" if len(s.generated) + len(emitted) >= params.max_new_tokens else None
        if not params.ignore_eos:
            for i, t in enumerate(emitted):
                if t in s.eos_ids:
                    emitted, finish = emitted[: i + 1], "eos"
                    break
        # The root and the accepted nodes whose tokens are kept; the last emitted token is the next root.
        accepted_nodes = [0] + result.path[: len(emitted) - 1]
        s.target_cached = self.target_cache.keep(
            s.row, s.target_cached, list(range(r.pending)) + [r.pending + u for u in accepted_nodes])
        if self.draft_cache is not None and len(tree) > 1:
            # The draft ran forward only over internal nodes (a leaf's token was drawn from its parent's
            # logits, but the leaf itself never went through the draft), so its cache holds K/V for the
            # accepted path only as far as the path stays on internal nodes. The rest stays pending and
            # is caught up with the next step's first level.
            catch = len(s.tokens) - 1 - s.draft_cached
            ran = set(tree.internal)
            kept = 0
            while kept < len(accepted_nodes) and accepted_nodes[kept] in ran:
                kept += 1
            s.draft_cached = self.draft_cache.keep(
                s.row, s.draft_cached, list(range(catch)) + [catch + u for u in accepted_nodes[:kept]])
        s.stats.prefill_tokens += r.pending
        s.stats.steps += 1
        s.stats.accepted_per_step.append(len(emitted) - 1)
        s.stats.accepted_ranks.append(tuple(tree.ranks[u] for u in result.path))
        s.tokens.extend(emitted)
        s.stats.new_tokens = len(s.generated)
        # The text layer sees every emitted token (it streams them), even on a step that ends the request.
        stopped = s.stop_check is not None and s.stop_check(s, emitted)
        if finish is None and stopped:
            finish = "stop"
        if finish is None and len(s.tokens) > self.target_cache.max_len:
            finish = "context"
        s.finish_reason = finish
