"""The speculative step over a batch of sequences, in three phases: draft the trees, the target sweep, verify
and commit.

The decoder knows only token ids. Each sequence owns one row of the target's and the draft's KV caches and
keeps the invariant of `Request`: its last token (the *root*) is not cached yet; tokens[cached:-1] are
committed but not cached. One target forward per step runs, for every row, that pending chain with the row's
tree grafted onto its end, so prefill and verification share a sweep. Plain decoding is the same step with a
one-node tree. Every row has its own tree and its own sampling settings; one draft forward per tree level serves
all rows. A row's tree is either its request's fixed tree, or grown during the draft phase from the draft's own
probabilities (a `DynamicTree`, spec/growth.py): then the draft phase decides the shape, level by level, and
the sweep and the verifier see the kept tree like any other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..model.batch import RowChunk, build_forward
from ..model.kv_cache import KVCache
from ..model.transformer import Transformer
from ..model.tree import Tree
from ..spec.growth import DynamicTree, TreeGrowth
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
    tree: Tree | None  # the row's speculation tree this step (a grown row's is set by draft_trees); None with
    # grow None: the sweep only prefills (a long chain)
    method: Method  # how its children are drawn and verified (greedy at temperature 0)
    tokens: list[int]  # the token of every tree node, node 0 (the root) first; filled by draft_trees
    draft_probs: NodeRows | None = None  # Q at every internal node [n, V] when drafting samples; else None
    grow: DynamicTree | None = None  # grow this step's tree from the draft's probabilities
    # Grown rows: each tree node's index in the draft's chunk, and whether the draft ran it (its K/V is cached).
    # None: a fixed tree, drafted in place (node u at chunk index u; the draft ran exactly its internal nodes).
    drawn_index: list[int] | None = None
    draft_ran: list[bool] | None = None

    @property
    def speculates(self) -> bool:
        return self.grow is not None or (self.tree is not None and len(self.tree) > 1)


@dataclass
class Growth:
    """A row's tree while the draft grows it, one level per draft forward."""

    step: RowStep
    catch: int  # tokens the draft cache lacks before the root: they run with level 0
    chunk: Tree  # the tree grafted on that catch-up chain (a grown row's: every node drawn so far)
    tokens: list[int]  # catch-up tokens, then the tree's (filled level by level; -1: not drawn)
    grower: TreeGrowth | None = None  # a grown row's growth; None: a fixed tree
    # A grown row's Q (sampling only): for each live node that has children, by chunk index, its row of the level
    # tensor it was computed in (nothing is copied; a dropped node lets go of its row).
    q_rows: dict[int, torch.Tensor] | None = None


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
        self.draft_trees([r for r in plan if r.speculates])
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
        grow = isinstance(s.tree, DynamicTree)
        # A grown tree shrinks to the room left (spec/growth.py); a fixed one must fit whole.
        fits = room > 1 if grow else len(s.tree) <= room
        speculate = self.draft is not None and fits and s.params.max_new_tokens - len(s.generated) > 1
        if grow and speculate:
            return RowStep(s, pending, None, method, [s.tokens[-1]], grow=s.tree)
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
        """Draft each row's tree level by level: fills `tokens` (and `draft_probs` when sampling); a grown row's
        `tree` is decided here too."""
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
            if r.grow is not None:
                room = self.draft_cache.max_len - (len(s.tokens) - 1)
                grower = TreeGrowth(r.grow, s.tokens[-1], room)
                g = Growth(r, len(catch), grower.tree().graft(len(catch)), catch + grower.tokens, grower)
                if not r.method.greedy:
                    g.q_rows = {}
                growing.append(g)
                continue
            growing.append(Growth(r, len(catch), r.tree.graft(len(catch)), catch + r.tokens))
            if not r.method.greedy:
                r.draft_probs = NodeRows(len(r.tree), self.vocab)
        level = 0
        while True:
            chunks: list[RowChunk | None] = [None] * B
            expanding: dict[int, tuple[Growth, list[int]]] = {}
            for g in growing:
                nodes = self._level_nodes(g, level)
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
                g.step.seq.stats.draft_nodes += len(nodes)
                level_logits = self._draft_logits(logits[b, : len(nodes)])
                if g.grower is None:
                    self._draw_level(g, nodes, level_logits, level)
                else:
                    self._grow_level(g, nodes, level_logits, level)
            level += 1
        for g in growing:
            if g.grower is not None:
                self._finish_growth(g)

    @staticmethod
    def _level_nodes(g: Growth, level: int) -> list[int]:
        """The nodes of this level the draft runs forward: those with children (a fixed tree), or the growth's
        frontier."""
        if g.grower is not None:
            return list(g.grower.frontier)
        tree = g.step.tree
        if level >= len(tree.levels):
            return []
        return [u for u in tree.levels[level] if tree.children[u]]

    def _draw_level(self, g: Growth, nodes: list[int], logits: torch.Tensor, level: int) -> None:
        """A fixed tree: draw the children its shape asks for at these nodes."""
        r, tree, params = g.step, g.step.tree, g.step.seq.params
        k = [len(tree.children[u]) for u in nodes]
        drawn = r.method.draw(logits, params.temperature, params.top_p, k, r.seq.draft_rng)
        if level == 0:
            probs = drawn.probs if drawn.probs is not None else r.method.draft_probs(logits[:1], 0.0, 1.0)
            r.seq.stats.root_confidence.append(float(probs[0].max()))
        if drawn.probs is not None:
            r.draft_probs.put(nodes, drawn.probs)
        for u, row in zip(nodes, drawn.tokens.tolist()):
            for j, child in enumerate(tree.children[u]):
                token = row[j] if j < len(row) else -1
                g.tokens[g.catch + child] = r.tokens[child] = token

    def _grow_level(self, g: Growth, nodes: list[int], logits: torch.Tensor, level: int) -> None:
        """A grown tree: rank the next level's slots from the draft's probabilities, draw the chosen children,
        and extend the chunk for the next forward."""
        r, grower, params = g.step, g.grower, g.step.seq.params
        probs = r.method.draft_probs(logits, params.temperature, params.top_p)
        width = min(grower.max_children, probs.shape[-1])
        top = torch.topk(probs, width, dim=-1).values.to(device="cpu", dtype=torch.float64).numpy()
        if level == 0:
            r.seq.stats.root_confidence.append(float(top[0, 0]))
        k = grower.expand(r.grow.model.estimate(top))
        rows = [i for i, ki in enumerate(k) if ki]
        drawn: list[list[int]] = [[] for _ in nodes]
        if rows:
            chosen = r.method.draw(logits[rows], params.temperature, params.top_p, [k[i] for i in rows],
                                   r.seq.draft_rng, probs=None if r.method.greedy else probs[rows])
            for i, row in zip(rows, chosen.tokens.tolist()):
                drawn[i] = row
            if g.q_rows is not None:  # Q at each node that gets children: the verifier tests them against it
                for i in rows:
                    g.q_rows[nodes[i]] = probs[i: i + 1]
        for u in grower.add_children(drawn):
            if g.q_rows is not None:
                g.q_rows.pop(u, None)  # dropped out of the tree
        g.chunk = grower.tree().graft(g.catch)
        g.tokens = g.tokens[: g.catch] + grower.tokens

    def _finish_growth(self, g: Growth) -> None:
        """The kept tree becomes the row's tree for the sweep and the verifier."""
        r = g.step
        grown = g.grower.finish()
        r.tree, r.tokens = grown.tree, grown.tokens
        r.drawn_index, r.draft_ran = grown.drawn_index, grown.ran
        if g.q_rows is not None:
            r.draft_probs = NodeRows(len(grown.tree), self.vocab)
            for u in grown.tree.internal:
                r.draft_probs.put([u], g.q_rows[grown.drawn_index[u]])

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
        # A stop string ends the reply at the token that completes it, wherever that falls in the accepted path:
        # the tokens kept then do not depend on the tree (the text layer sees every emitted token, as it streams).
        keep = s.stop_check(s, emitted) if s.stop_check is not None else None
        if keep is not None:
            assert 0 < keep <= len(emitted), (keep, len(emitted))
            if keep < len(emitted) or finish is None:
                emitted, finish = emitted[:keep], "stop"
        # The root and the accepted nodes whose tokens are kept; the last emitted token is the next root.
        accepted_nodes = [0] + result.path[: len(emitted) - 1]
        s.target_cached = self.target_cache.keep(
            s.row, s.target_cached, list(range(r.pending)) + [r.pending + u for u in accepted_nodes])
        if self.draft_cache is not None and len(tree) > 1:
            # The draft ran forward only over some nodes (a fixed tree's internal ones; a grown tree's frontier
            # nodes, some of which end up leaves), each at its own chunk slot; a leaf's token was drawn from its
            # parent's logits without the leaf going through the draft. So the draft cache holds K/V for the
            # accepted path only as far as the path stays on nodes that ran. The rest stays pending and is
            # caught up with the next step's first level.
            catch = len(s.tokens) - 1 - s.draft_cached
            if r.drawn_index is None:
                ran, index = set(tree.internal), list(range(len(tree)))
            else:
                ran, index = {u for u, done in enumerate(r.draft_ran) if done}, r.drawn_index
            kept = 0
            while kept < len(accepted_nodes) and accepted_nodes[kept] in ran:
                kept += 1
            s.draft_cached = self.draft_cache.keep(
                s.row, s.draft_cached, list(range(catch)) + [catch + index[u] for u in accepted_nodes[:kept]])
        s.stats.prefill_tokens += r.pending
        s.stats.steps += 1
        s.stats.accepted_per_step.append(len(emitted) - 1)
        s.stats.accepted_ranks.append(tuple(tree.ranks[u] for u in result.path))
        s.stats.tree_sizes.append(len(tree))
        s.tokens.extend(emitted)
        s.stats.new_tokens = len(s.generated)
        if finish is None and len(s.tokens) > self.target_cache.max_len:
            finish = "context"
        s.finish_reason = finish
