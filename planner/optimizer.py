"""Choose the tree (size n, depth d), the batch size and the resident layers that maximise predicted tokens/s.

The time model of one speculative step for B sequences sharing each target sweep, with a tree of n nodes
and depth d per sequence:

    T_step   = T_draft + T_verify(B n) + B T_host(n) + overhead
    T_draft  = sum over the tree's levels l of T_level(B w_l), w_l = the nodes of level l that have children
               (the engine runs one draft forward per level, over exactly those nodes; a one-node tree drafts
               nothing)
    T_verify(t) = combine(S / bandwidth, L T_layer(t)) + T_head(t)
               S = (L - R) x layer bytes: what one sweep streams, R = resident decoder layers;
               combine = max on CUDA (copies run on their own stream, overlapped with compute) and + on
               the CPU (there the streamer copies synchronously). The compute term counts all L layers:
               resident layers' compute is never hidden, only streamed layers' copies are. The prefetch of
               the next sweep's first layers while the draft runs is left out (at most `slots` layers of L,
               so the model errs slightly on the slow side).
               With a disk tier (D of the streamed layers read from the disk store every sweep, by reader
               threads that run ahead on both devices):
               T_verify(t) = max(combine(...), D x file bytes / disk bandwidth - hidden) + T_head(t),
               hidden = min(T_draft + T_host + overhead, min(prefetch, D) x file bytes / disk bandwidth): the
               reads of the next sweep's first disk layers that fit in the staging ring run while the draft
               grows the tree and the host verifies. (The bound the search prunes with takes the largest
               hidden, so it stays a lower bound of T_step.) A longer sweep flattens T_verify over more tokens,
               so the same search picks larger trees.
    tokens per step per sequence = G(n, d), Sequoia's expected accepted path plus the bonus token
    throughput = B G(n, d) / T_step tokens/s;  latency = T_step / G(n, d) s/token for each sequence.

T_verify(B n) uses the per-layer curve at B n tokens: the B rows' linear layers do run over B n tokens; their
attention is B rows of n queries (slightly cheaper than one row of B n), a small overestimate.

The search: Sequoia's DP gives G(n, d) for every n <= N and d <= D in one run. Only (n, d) pairs whose optimal
tree really has n nodes and depth d are candidates (otherwise a smaller n or d reaches the same G, never
slower). T_draft needs the tree itself, so candidates are scored first with a lower bound on T_draft
(d levels of the cheapest level time), then evaluated exactly in order of that bound until no unevaluated
candidate can beat the ones kept (branch and bound: exact, and only a few trees are built).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch

from offload_runtime.errors import ResourceError, UsageError
from offload_runtime.model.config import ModelArgs
from offload_runtime.model.quantization import QuantSpec
from offload_runtime.model.tree import Tree
from offload_runtime.residency import Residency, choose_residency, fixed_device_bytes
from offload_runtime.spec.tree_search import TreeTable, best_trees
from offload_runtime.weights.disk import DEFAULT_PREFETCH, padded_bytes
from offload_runtime.weights.quantized import quant_spec_for

_REL_TOL = 1e-12


# --- curves


@dataclass(frozen=True)
class Curve:
    """A time measured at a grid of token counts, read in between by linear interpolation.

    Below the grid: the first value. Above it: the last segment's slope carried on (never negative).
    """

    grid: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        assert len(self.grid) == len(self.seconds) >= 1, "a curve needs one time per grid point"
        assert all(b > a for a, b in zip(self.grid, self.grid[1:])), "grid must be increasing"
        assert all(s >= 0 and math.isfinite(s) for s in self.seconds), "times must be finite and >= 0"

    @classmethod
    def constant(cls, seconds: float) -> "Curve":
        return cls((1,), (float(seconds),))

    def __call__(self, n: float | np.ndarray) -> float | np.ndarray:
        g = np.asarray(self.grid, dtype=np.float64)
        s = np.asarray(self.seconds, dtype=np.float64)
        x = np.asarray(n, dtype=np.float64)
        y = np.interp(x, g, s)
        if len(g) >= 2:
            slope = max(0.0, (s[-1] - s[-2]) / (g[-1] - g[-2]))
            y = np.where(x > g[-1], s[-1] + slope * (x - g[-1]), y)
        return float(y) if np.ndim(y) == 0 else y

    @property
    def floor(self) -> float:
        """A lower bound of the curve anywhere (interpolation never goes below the smallest measured value)."""
        return min(self.seconds)


@dataclass(frozen=True)
class TimeModel:
    """Everything T_step needs (see the module docstring for the formula)."""

    layer: Curve  # T_layer(tokens): one target decoder layer
    head: Curve  # T_head(tokens): embedding, final norm, lm_head, probability warp
    host: Curve  # T_host(n): host work of one sequence's step for an n-node tree
    draft_level: Curve  # T_level(w): one draft forward over w nodes, drawing their children
    n_layers: int
    resident: int  # decoder layers kept on the device
    layer_bytes: int
    bandwidth: float  # bytes per second of one layer's host-to-device copy
    overlap: bool = True  # copies overlap compute (CUDA) or add to it (CPU)
    disk_layers: int = 0  # streamed layers read from the disk store every sweep
    disk_bandwidth: float = math.inf  # bytes per second of the store's direct-I/O reads
    disk_file_bytes: int = 0  # one layer file (the layer padded to the store's alignment)
    prefetch: int = 0  # staging buffers the disk reads run ahead into
    overhead_s: float = 0.0  # anything else paid once per step
    warp: Curve | None = None  # T_warp(rows): top-p warping, paid per drafted row and per walked row; None: top-p off
    # Calibration: measured / predicted for each phase of a real engine step (planner/calibrate.py); 1 = none.
    draft_scale: float = 1.0
    verify_scale: float = 1.0
    host_scale: float = 1.0

    def __post_init__(self) -> None:
        assert 0 <= self.resident <= self.n_layers, (self.resident, self.n_layers)
        assert self.bandwidth > 0 and self.layer_bytes >= 0
        assert 0 <= self.disk_layers <= self.n_layers - self.resident and self.disk_bandwidth > 0

    def with_resident(self, resident: int) -> "TimeModel":
        return replace(self, resident=resident, disk_layers=0, prefetch=0)

    def with_residency(self, residency: Residency) -> "TimeModel":
        """This model for a residency's device / host / disk split."""
        return replace(self, resident=len(residency.resident), disk_layers=len(residency.disk),
                       prefetch=residency.prefetch)

    def calibrated(self, measured: dict[str, float], parents: Sequence[int], batch: int = 1) -> "TimeModel":
        """Scale each phase by measured / predicted seconds of one real step with this tree (draft_s, verify_s
        per step as the engine's StepTimes split them; host_s: the rest of the step's wall time)."""
        raw = replace(self, draft_scale=1.0, verify_scale=1.0, host_scale=1.0).step_parts(parents, batch)

        def ratio(key: str) -> float:
            return measured[key] / raw[key] if raw[key] > 0 and measured.get(key, 0) > 0 else 1.0
        return replace(self, draft_scale=ratio("draft_s"), verify_scale=ratio("verify_s"), host_scale=ratio("host_s"))

    @property
    def stream_s(self) -> float:
        """Seconds one sweep spends copying the streamed layers."""
        return (self.n_layers - self.resident) * self.layer_bytes / self.bandwidth

    @property
    def disk_s(self) -> float:
        """Seconds one sweep's disk layers take to read."""
        return self.disk_layers * self.disk_file_bytes / self.disk_bandwidth if self.disk_layers else 0.0

    def t_verify(self, tokens: float | np.ndarray, gap_s: float = math.inf) -> float | np.ndarray:
        """One sweep over `tokens` tokens; `gap_s`: the time since the last sweep, during which the disk readers
        prefetched (the default, unlimited, gives the lower bound)."""
        compute = self.n_layers * self.layer(tokens)
        core = np.maximum(self.stream_s, compute) if self.overlap else self.stream_s + compute
        if self.disk_layers:
            ahead = min(self.prefetch, self.disk_layers) * self.disk_file_bytes / self.disk_bandwidth
            core = np.maximum(core, self.disk_s - min(gap_s, ahead))
        out = self.verify_scale * (core + self.head(tokens))
        return float(out) if np.ndim(out) == 0 else out

    def t_host(self, n: float | np.ndarray) -> float | np.ndarray:
        return self.host_scale * self.host(n)

    def _warp(self, rows: float) -> float:
        return 0.0 if self.warp is None else float(self.warp(rows))

    def t_draft(self, parents: Sequence[int], batch: int = 1) -> float:
        if len(parents) <= 1:
            return 0.0
        return self.draft_scale * sum(float(self.draft_level(batch * w)) + batch * self._warp(w)
                                      for w in Tree.of(parents).internal_per_level)

    def step_parts(self, parents: Sequence[int], batch: int = 1) -> dict[str, float]:
        n = len(parents)
        walked = Tree.of(parents).max_depth + 1  # the verifier warps at most one row per depth
        parts = {"draft_s": self.t_draft(parents, batch),
                 "host_s": batch * self.host_scale * (float(self.host(n)) + self._warp(walked)),
                 "overhead_s": self.overhead_s}
        parts["verify_s"] = float(self.t_verify(batch * n, parts["draft_s"] + parts["host_s"] + self.overhead_s))
        parts["step_s"] = sum(parts.values())
        return parts


# --- candidates


@dataclass(frozen=True)
class Candidate:
    n: int  # nodes, the root included
    depth: int
    batch: int
    tokens_per_step: float  # G(n, d)
    draft_s: float
    verify_s: float
    host_s: float
    overhead_s: float
    parents: tuple[int, ...] = field(repr=False)

    @property
    def step_s(self) -> float:
        return self.draft_s + self.verify_s + self.host_s + self.overhead_s

    @property
    def tokens_per_s(self) -> float:
        """All B sequences together."""
        return self.batch * self.tokens_per_step / self.step_s

    @property
    def s_per_token(self) -> float:
        """Each sequence's latency per token."""
        return self.step_s / self.tokens_per_step

    def row(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "parents"}
        d.update(step_s=self.step_s, tokens_per_s=self.tokens_per_s, s_per_token=self.s_per_token)
        return d


def evaluate(tree: Sequence[int], G: float, tm: TimeModel, batch: int = 1) -> Candidate:
    parts = tm.step_parts(tree, batch)
    return Candidate(n=len(tree), depth=Tree.of(tree).max_depth, batch=batch, tokens_per_step=G,
                     draft_s=parts["draft_s"], verify_s=parts["verify_s"], host_s=parts["host_s"],
                     overhead_s=parts["overhead_s"], parents=tuple(tree))


def evaluate_measured(n: int, depth: int, measured: dict[str, Any], tm: TimeModel, batch: int = 1,
                      parents: Sequence[int] = ()) -> Candidate:
    """A tree policy measured on the real engine (planner/calibrate.py measure_trees): its tokens per step and draft
    seconds as measured (a grown tree's draft cost is its own: several draft tokens per level, the growth's
    bookkeeping), its sweep and host time from the time model at the measured mean tree size, like every other
    candidate's."""
    nodes, draft_s = float(measured["nodes"]), float(measured["draft_s"])
    host_s = batch * tm.host_scale * (float(tm.host(nodes)) + tm._warp(depth + 1))  # one warped row per depth walked
    verify_s = float(tm.t_verify(batch * nodes, draft_s + host_s + tm.overhead_s))  # as step_parts: disk reads ahead
    return Candidate(n=n, depth=depth, batch=batch, tokens_per_step=float(measured["tokens_per_step"]),
                     draft_s=draft_s, verify_s=verify_s, host_s=host_s, overhead_s=tm.overhead_s,
                     parents=tuple(parents))


@dataclass(frozen=True)
class PolicyChoice:
    """Static (Sequoia's tree) or dynamic (grown per step): the faster by predicted tokens/s, ties to static."""

    policy: str
    static: Candidate  # the static tree, with its measured tokens per step
    dynamic: list[Candidate]  # each dynamic budget measured
    reason: str

    @property
    def best_dynamic(self) -> Candidate | None:
        return max(self.dynamic, key=lambda c: (c.tokens_per_s, -c.n)) if self.dynamic else None

    @property
    def chosen(self) -> Candidate:
        return self.best_dynamic if self.policy == "dynamic" else self.static


def choose_policy(static: Candidate, dynamic: Sequence[Candidate], forced: str | None = None) -> PolicyChoice:
    """Pick the faster policy (or the `forced` one) and say why in one sentence."""
    best = max(dynamic, key=lambda c: (c.tokens_per_s, -c.n)) if dynamic else None
    if best is None:
        return PolicyChoice("static", static, [], "dynamic trees were not measured")
    gain = best.tokens_per_s / static.tokens_per_s - 1
    policy = forced or ("dynamic" if gain > 0 else "static")
    facts = (f"dynamic trees of up to {best.n} nodes (depth <= {best.depth}) give {best.tokens_per_step:.2f} tokens "
             f"per step measured, {best.tokens_per_s:.4g} tokens/s predicted; Sequoia's {static.n}-node tree "
             f"{static.tokens_per_step:.2f} and {static.tokens_per_s:.4g} ({gain * 100:+.1f}% for dynamic)")
    same = next((c for c in dynamic if c.n == static.n and c is not best), None)
    if same is not None:
        facts += (f"; at {static.n} nodes dynamic gives {same.tokens_per_step:.2f} tokens per step, "
                  f"{same.tokens_per_s:.4g} tokens/s")
    why = "asked for" if forced else ("faster" if policy == "dynamic" else "not faster")
    return PolicyChoice(policy, static, list(dynamic), f"{policy} ({why}): {facts}")


@dataclass(frozen=True)
class Optimum:
    best: Candidate
    ranked: list[Candidate]  # best first
    evaluated: int  # trees built and timed exactly
    candidates: int  # (n, d) pairs considered


def _sort_key(c: Candidate) -> tuple[float, int, int]:
    # Throughput first; on ties the smaller tree, then the shallower one.
    return (-c.tokens_per_s, c.n, c.depth)


def candidate_pairs(table: TreeTable, max_tree: int, max_depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, d, G) of every pair whose optimal tree needs exactly n nodes and depth d (d >= 1, n >= 2)."""
    ns, ds, gs = [], [], []
    prev = table.curve(0)[: max_tree + 1]
    for d in range(1, max_depth + 1):
        cur = table.curve(d)[: max_tree + 1]
        tol = _REL_TOL * max(1.0, float(cur[-1]))
        n = np.arange(2, max_tree + 1)
        grows_n = cur[2:] > cur[1:-1] + tol  # fewer nodes would not reach G
        grows_d = cur[2:] > prev[2:] + tol  # a shallower limit would not reach G
        keep = grows_n & grows_d
        ns.append(n[keep])
        ds.append(np.full(int(keep.sum()), d))
        gs.append(cur[2:][keep])
        prev = cur
    if not ns:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    return np.concatenate(ns), np.concatenate(ds), np.concatenate(gs)


def optimize(p: Sequence[float], tm: TimeModel, *, max_tree: int, max_depth: int, batch: int = 1, top: int = 10,
             table: TreeTable | None = None) -> Optimum:
    """The (n, d) maximising B G(n, d) / T_step for this time model, with the `top` best candidates ranked.

    n = 1 (plain decoding: no draft, no tree) is always a candidate.
    """
    if max_tree < 1 or max_depth < 0 or batch < 1 or top < 1:
        raise UsageError(f"need max_tree >= 1, max_depth >= 0, batch >= 1, top >= 1; got {max_tree}, "
                         f"{max_depth}, {batch}, {top}")
    if table is None:
        table = best_trees(p, max_tree, max_depth)
    assert table.N >= max_tree and table.depth >= max_depth, "table too small for the search"
    ns, ds, gs = candidate_pairs(table, max_tree, max_depth)
    # Lower bound of T_step for each pair: every one of its d levels costs at least the cheapest level time.
    bound_s = (tm.t_verify(batch * ns) + batch * tm.t_host(ns) + tm.overhead_s + ds * tm.draft_scale * tm.draft_level.floor
               if ns.size else np.zeros(0))
    upper = batch * gs / bound_s if ns.size else np.zeros(0)
    order = np.argsort(-upper, kind="stable")

    kept = [evaluate([-1], 1.0, tm, batch)]  # plain decoding
    heap: list[tuple[float, int, int, Candidate]] = []  # min-heap of the `top` best by throughput
    seq = 0

    def push(c: Candidate) -> None:
        nonlocal seq
        heapq.heappush(heap, (c.tokens_per_s, -c.n, seq, c))
        seq += 1
        if len(heap) > top:
            heapq.heappop(heap)

    push(kept[0])
    evaluated = 0
    for i in order:
        if len(heap) >= top and upper[i] < heap[0][0] * (1 - 1e-9):
            break  # no pair left can enter the top list
        n, d, G = int(ns[i]), int(ds[i]), float(gs[i])
        tree = table.tree(n, d)
        assert len(tree) == n, f"DP tree for (n={n}, d={d}) has {len(tree)} nodes"
        push(evaluate(tree, G, tm, batch))
        evaluated += 1
    ranked = sorted((c for _, _, _, c in heap), key=_sort_key)
    return Optimum(best=ranked[0], ranked=ranked, evaluated=evaluated, candidates=int(ns.size) + 1)


def throughput_curve(table: TreeTable, tm: TimeModel, depth: int, max_tree: int, batch: int = 1
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Predicted tokens/s of the optimal tree of at most n nodes and depth <= `depth`, for n = 1..max_tree."""
    G = table.curve(depth)
    ns = np.arange(1, max_tree + 1)
    out = np.empty(max_tree)
    for n in ns:
        tree = table.tree(int(n), depth)
        out[n - 1] = evaluate(tree, float(G[n]), tm, batch).tokens_per_s
    return ns, out


# --- resident layers and batch size


def residency(target: ModelArgs, dtype: torch.dtype, device: torch.device, *, draft: ModelArgs | None,
              budget_bytes: int | None, batch: int, max_seq_len: int, max_tree: int, slots: int = 2,
              max_chunk: int = 2048, offload: bool | None = None, host_budget: int | None = None,
              prefetch: int = DEFAULT_PREFETCH, quant: QuantSpec | None = None,
              draft_quant: QuantSpec | None = None, draft_shares_globals: bool = False) -> Residency:
    """Which target layers stay on the device, by the runtime's own rule (offload_runtime/residency.py).

    The device must hold the largest tree the search may pick (`max_tree`), B KV caches of `max_seq_len`, the
    draft, the staging slots and the activations; every layer that fits beside them stays resident. With no
    budget on CUDA the device's free memory is the budget; on the CPU nothing streams unless a budget is given.
    Quantized layers (`quant`, `draft_quant`; by default a checkpoint's own format) are sized as packed.
    """
    quant = quant or quant_spec_for(target, None, None, "target")
    if draft is not None:
        draft_quant = draft_quant or quant_spec_for(draft, None, None, "draft")
    fixed = fixed_device_bytes(target, dtype, draft_args=draft, batch=batch, max_seq_len=max_seq_len,
                               tree_size=max_tree, max_chunk=max_chunk, slots=slots, on_cuda=device.type == "cuda",
                               quant=quant, draft_quant=draft_quant, draft_shares_globals=draft_shares_globals)
    return choose_residency(target, dtype, device, offload=offload, budget_bytes=budget_bytes, fixed=fixed,
                            slots=slots, host_budget=host_budget, prefetch=prefetch, quant=quant)


@dataclass(frozen=True)
class BatchChoice:
    batch: int
    residency: Residency
    optimum: Optimum


def optimize_batch(p: Sequence[float], tm: TimeModel, batches: Sequence[int], residency_of, *, max_tree: int,
                   max_depth: int, top: int = 10) -> tuple[BatchChoice, list[BatchChoice]]:
    """Best batch size among `batches` by total tokens/s; `residency_of(B)` gives the Residency for B KV caches
    (raising ResourceError when B does not fit). Batch sizes that do not fit are skipped; if none fits the
    first one's error is raised."""
    table = best_trees(p, max_tree, max_depth)
    choices: list[BatchChoice] = []
    first_error: ResourceError | None = None
    for B in batches:
        try:
            res = residency_of(B)
        except ResourceError as e:
            first_error = first_error or e
            continue
        opt = optimize(p, tm.with_residency(res), max_tree=max_tree, max_depth=max_depth, batch=B,
                       top=top, table=table)
        choices.append(BatchChoice(B, res, opt))
    if not choices:
        assert first_error is not None
        raise first_error
    best = max(choices, key=lambda c: (c.optimum.best.tokens_per_s, -c.batch))
    return best, choices


def suffix_min(seconds: Sequence[float]) -> tuple[float, ...]:
    """T(n) <- min over m >= n of T(m): work never gets cheaper with more tokens, and interference from other
    processes only ever adds time, so a point above a later one is noise. (It also flattens a real dip, such as
    a GPU kernel's better tiling at a round size; the error that leaves is small and on the fast side.)"""
    arr = np.asarray(seconds, dtype=np.float64)
    return tuple(float(x) for x in np.minimum.accumulate(arr[::-1])[::-1])


def time_model_from_profile(profile: dict[str, Any], *, resident: int, n_layers: int, temperature: float = 0.0,
                            top_p: float = 1.0, disk_bandwidth: float = math.inf) -> TimeModel:
    """The time model a profile (planner/profile.py) describes, for R resident layers of L, sampling as given
    (top-p warping sorts the vocabulary for every drafted and walked row; greedy and top-p 1 do not), reading disk
    layers (if a residency puts any there) at `disk_bandwidth` (a disk profile's figure)."""
    grid = tuple(int(n) for n in profile["grid"])
    if profile.get("draft_level_s") is None:
        raise UsageError("this profile has no draft timings; profile again with --draft")
    layer_b = int(profile["layer_bytes"])

    def curve(key: str) -> Curve:
        return Curve(grid, suffix_min(profile[key]))

    return TimeModel(layer=curve("layer_s"), head=curve("head_s"), host=curve("host_s"),
                     draft_level=curve("draft_level_s"),
                     warp=curve("warp_s") if temperature > 0 and top_p < 1 else None,
                     n_layers=n_layers, resident=resident, layer_bytes=layer_b,
                     bandwidth=layer_b / max(float(profile["layer_copy_s"]), 1e-12),
                     overlap=profile["device"] == "cuda", disk_bandwidth=disk_bandwidth,
                     disk_file_bytes=padded_bytes(layer_b))
