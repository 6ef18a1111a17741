#!/usr/bin/env python3
"""Sequoia's ablations on the demo pair: python tools/ablations.py [--small] [--no-write] [--plots-dir DIR]

Each experiment checks one of the paper's claims (or one of ours) on our own implementation:
  (a) sizes: measured tokens per step at tree sizes 1, 2, 4, ..., 512 of the DP tree (best_trees), the best k
      independent sequences that fit and a chain, greedy and at T = 0.6, next to the value the DP's objective
      predicts from the acceptance vector measured at that setting
  (b) methods: Sequoia's (without replacement), SpecInfer's (with replacement) and top-k drafting on one fixed
      tree at temperatures 0, 0.2, ..., 1.2 (top-p 1) and at top-p 0.8 and 0.9 (at --top-p-temperature)
  (c) dynamic (not run by default): trees grown per step from the draft's probabilities (spec/growth.py, keyed by
      the acceptance vector by draft confidence) against the DP tree and the best k sequences of the same size,
      greedy and at T = 0.6, tokens/s as a ratio to plain decoding in the same run; and grown trees keyed three
      ways (that table, the draft's own probabilities, the positional p: Sequoia's tree) at a few sizes
  (d) drafts (not run by default): the pair's trained draft against the target's own low-bit copies (self-int4,
      self-int8: offload_runtime/api/self_draft.py), greedy and at T = 0.6: each one's acceptance vector, tokens
      per step of its DP tree and of dynamic trees of the same budget, tokens/s as a ratio to plain decoding

Measurement. Tokens per step = (accepted path length + 1) pooled over all steps of all sequences: a ratio of
sums. Requests generate past --tokens by the tree's depth + 1 and stop at the first step that reaches --tokens,
so no counted step is cut short by the length budget and every step verifies the full tree. The error bar is
one standard error of the ratio from a per-sequence (cluster) estimate: steps within a sequence are correlated,
sequences are independent. Gains between two rows pair the same prompts and seeds, so their error bars include
the pairing. Batching only makes it faster: the engine gives each row exactly the tokens it gives alone.

Prediction. The acceptance vector p[1..W] is measured at each setting with planner.acceptance (a star tree of W
children drawn without replacement; greedy: the draft's top W, accepted on equality) on the same prompts and
token budget (on the demo pair p[1] climbs along a generation as the text turns repetitive), with seeds disjoint
from the runs it predicts; predicted = expected_tokens(tree, p), Sequoia's objective.

--small: a tiny random pair in a temporary directory, a few sizes and prompts (the test suite runs it, < 60 s).
Unless --no-write, a section with the tables, the plots and a paragraph per claim is appended to BENCHMARKS.md;
the plots need matplotlib (pip install 'offload-runtime[plot]') and are skipped with a notice without it.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import harness as h
import report
import torch
from harness import Pair
from report import PLUS_MINUS, Column, Table

from offload_runtime.api.text import load_tokenizer
from offload_runtime.cli import ArgumentParser
from offload_runtime.errors import UsageError
from offload_runtime.model.config import ModelArgs
from offload_runtime.model.tree import Tree
from offload_runtime.spec.growth import ConfidenceAcceptance, DraftProbabilities, DynamicTree, PositionalAcceptance
from offload_runtime.spec.methods import SAMPLING_METHODS
from offload_runtime.spec.tree_search import TreeTable, best_trees, chain_tree, expected_tokens, k_sequences_tree

METHODS = SAMPLING_METHODS  # sequoia, specinfer, topk
EXPERIMENTS = ("sizes", "methods", "dynamic", "drafts")
SELF_DRAFTS = ("self-int4", "self-int8")  # (d)'s self-drafts, against the pair's own draft
TREE_PNG, TEMPERATURE_PNG, DYNAMIC_PNG = "ablation_tree_size.png", "ablation_temperature.png", "ablation_dynamic.png"
KEYS = ("confidence", "draft", "positional")  # what dynamic trees are keyed by, in (c)'s second table
ACCEPTANCE_SEED = 100_000  # acceptance runs draw from seeds disjoint from the runs they predict
HELDOUT_EVERY = 20  # the demo recipe holds out every 20th chapter (tools/train_demo_pair.py, Recipe.heldout_every)
SIZE_TITLE, METHOD_TITLE = "Tokens per step vs tree size", "Tokens per step vs temperature"
DYNAMIC_TITLE, KEYS_TITLE = "Dynamic vs static trees", "Which key for dynamic trees"
DRAFTS_TITLE = "Trained draft vs self-drafts"


# --- estimates: a ratio of sums over independent sequences


SeqCount = tuple[int, int]  # one sequence: (tokens over its counted steps, counted steps)


def ratio_estimate(seqs: Sequence[SeqCount]) -> tuple[float, float]:
    """(pooled tokens per step, its standard error) from per-sequence (tokens, steps).

    R = sum X / sum N; linearised, R - R_true ~ mean_j (X_j - R N_j) / mean(N), so the standard error is the
    sample standard deviation of (X_j - R N_j) / mean(N) over sequences, over sqrt(#sequences). nan with one
    sequence.
    """
    assert seqs and all(n > 0 for _, n in seqs), "every sequence needs at least one counted step"
    R, infl = _influence(seqs)
    return R, _se(infl)


def relative_gain(a: Sequence[SeqCount], b: Sequence[SeqCount]) -> tuple[float, float]:
    """(R_a / R_b - 1, its standard error), a and b measured on the same prompts (sequence j pairs with j)."""
    assert len(a) == len(b), "a gain pairs the same prompts on both sides"
    Ra, ua = _influence(a)
    Rb, ub = _influence(b)
    # delta method on R_a / R_b with the per-sequence influences of both ratios
    return Ra / Rb - 1.0, _se([x / Rb - Ra * y / Rb ** 2 for x, y in zip(ua, ub)])


def _influence(seqs: Sequence[SeqCount]) -> tuple[float, list[float]]:
    X, N = sum(x for x, _ in seqs), sum(n for _, n in seqs)
    R, mean_n = X / N, N / len(seqs)
    return R, [(x - R * n) / mean_n for x, n in seqs]


def _se(values: Sequence[float]) -> float:
    m = len(values)
    if m < 2:
        return math.nan
    mu = sum(values) / m
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (m - 1) / m)


# --- tree families


def best_k_sequences(n: int, p: Sequence[float]) -> tuple[int, int]:
    """The k x l sequences (k >= 2 where n >= 3) with 1 + k*l <= n nodes that the objective rates highest.

    With ranks k at the root and rank 1 below, expected tokens = 1 + (p[1] + ... + p[k]) (1 + p1 + ... +
    p1^(l-1)); for each k the longest l that fits is best, so one pass over k finds the optimum. This is the
    strongest k-sequence baseline by the DP's own yardstick (the measured rows then test it).
    """
    assert n >= 2, n
    p1 = p[0]

    def value(k: int, l: int) -> float:
        return 1.0 + sum(p[:k]) * (l if p1 == 1.0 else (1.0 - p1 ** l) / (1.0 - p1))

    ks = range(2, n) if n >= 3 else range(1, 2)
    return max(((k, (n - 1) // k) for k in ks), key=lambda kl: (value(*kl), -kl[0]))


def node_count(n: int) -> str:
    return f"{n} node{'s' if n > 1 else ''}"


def family_trees(n: int, p: Sequence[float], table: TreeTable, depth: int) -> dict[str, tuple[Tree, str]]:
    """{family: (tree, label)} for tree size n: the DP tree, the best k x l sequences, a chain."""
    dp = table.tree(n, depth)
    out = {"dp": (dp, f"{node_count(len(dp))}, depth {dp.max_depth}"), "kseq": (Tree([-1]), "-"),
           "chain": (chain_tree(n), node_count(n))}
    if n >= 2:
        k, l = best_k_sequences(n, p)
        out["kseq"] = (k_sequences_tree(k, l), f"{k} x {l}")
    return out


# --- prompts


def load_prompts(spec: str, pair: Pair, count: int, length: int, log: Callable[[str], None]
                 ) -> tuple[list[list[int]], str]:
    """(token-id prompts, where they came from): built-in, the demo's held-out chapters, or a JSONL file.

    Prompts are distinct: at temperature 0 a repeated prompt repeats its sequence exactly, which would shrink
    the error bars without adding information.
    """
    from planner.acceptance import BUILTIN_PROMPTS, read_prompts

    tok = load_tokenizer(pair.target)
    vocab = ModelArgs.from_file(pair.target).vocab_size
    if spec == "builtin":
        if tok is None:
            return h.make_prompts(None, vocab, count, length, torch.Generator().manual_seed(0)), \
                f"{count} random token-id prompts of {length} tokens (the model has no tokenizer)"
        if count > len(BUILTIN_PROMPTS):
            log(f"only {len(BUILTIN_PROMPTS)} distinct built-in prompts; using {len(BUILTIN_PROMPTS)}, not {count} "
                f"(--prompts-from heldout gives more)")
            count = len(BUILTIN_PROMPTS)
        return h.make_prompts(tok, vocab, count, length, torch.Generator()), \
            f"the first {count} of the planner's {len(BUILTIN_PROMPTS)} built-in prompts (planner/acceptance.py)"
    if spec == "heldout":
        texts: list[str | list[int]] = heldout_texts(h.REPO / "tools" / "_work" / "corpus" / "kjv.txt")
        source = "the first verse of held-out chapters of the demo's corpus (tools/_work/corpus/kjv.txt)"
    else:
        texts = read_prompts(spec)
        source = f"prompts from {spec}"
    if tok is None and any(isinstance(t, str) for t in texts):
        raise UsageError(f"--prompts-from {spec} holds text, and {pair.target} has no tokenizer to encode it; give "
                         f"token-id prompts ({{\"prompt\": [1, 2, 3]}}) or use builtin")
    if any(not 0 <= i < vocab for t in texts if not isinstance(t, str) for i in t):
        raise UsageError(f"--prompts-from {spec}: a token id is outside the target's vocabulary (0..{vocab - 1})")
    chosen = texts[::max(1, len(texts) // count)][:count]
    if len(chosen) < count:
        log(f"{spec}: only {len(chosen)} prompts available, not {count}")
    return [list(tok(t).input_ids) if isinstance(t, str) else t for t in chosen], f"{len(chosen)} {source}"


def heldout_texts(dump: Path) -> list[str]:
    """First verses of the chapters the demo recipe held out of training (read from the local dump, never fetched)."""
    if not dump.is_file():
        raise UsageError(f"{dump} does not exist: it is made by tools/train_demo_pair.py (which fetches the corpus); "
                         f"use --prompts-from builtin")
    from demo_recipe.corpus import parse_chapters, split_chapters

    _, held = split_chapters(parse_chapters(dump.read_text(encoding="ascii")), HELDOUT_EVERY)
    return [c.verses[0] for c in held]


# --- one measurement


@dataclass
class Measured:
    seqs: list[SeqCount]
    seconds: float
    outputs: list[list[int]] = field(default_factory=list, repr=False)  # each sequence's first `tokens` tokens
    nodes: float = math.nan  # mean size of the verified trees (grown trees vary)
    draft_nodes: float = math.nan  # tree nodes run through the draft per step

    @property
    def tokens_per_s(self) -> float:
        return sum(x for x, _ in self.seqs) / self.seconds

    @property
    def mean(self) -> float:
        return ratio_estimate(self.seqs)[0]

    @property
    def se(self) -> float:
        return ratio_estimate(self.seqs)[1]


def fmt(m: Measured) -> str:
    se = m.se
    return f"{m.mean:.3f}" + ("" if math.isnan(se) else f" {PLUS_MINUS} {se:.3f}")


def fmt_gain(g: tuple[float, float] | str) -> str:
    if isinstance(g, str):
        return g
    gain, se = g
    return f"{gain * 100:+.1f}%" + ("" if math.isnan(se) else f" {PLUS_MINUS} {se * 100:.1f}")


def regime(temperature: float) -> str:
    return "greedy (T = 0)" if temperature == 0 else f"T = {temperature:g}, top-p 1"


# --- settings


@dataclass
class Settings:
    """What one run measures. The defaults are a full run's; --small changes those in SMALL."""

    sizes: list[int] = field(default_factory=lambda: [2 ** i for i in range(10)])  # (a)'s tree sizes
    size_temperatures: list[float] = field(default_factory=lambda: [0.6, 0.0])
    temperatures: list[float] = field(default_factory=lambda: [round(0.2 * i, 1) for i in range(7)])  # (b)'s
    top_ps: list[float] = field(default_factory=lambda: [0.8, 0.9])
    top_p_temperature: float = 1.0
    prompts: int = 32
    min_prompts: int = 12
    full_prompts_until: int = 64  # sizes above this get proportionally fewer prompts (never under min_prompts)
    tokens: int = 64
    batch: int = 16
    width: int = 32  # children of the star tree that measures acceptance
    max_depth: int = 64  # of the DP trees in (a) and (b)
    method_tree_size: int = 32
    acceptance_tokens: int | None = None  # None: tokens (acceptance drifts along a generation)
    prompt_len: int = 8  # of random token-id prompts (a model without a tokenizer)
    seed: int = 0
    device: str = "cpu"
    dynamic_sizes: list[int] = field(default_factory=lambda: [2 ** i for i in range(2, 10)])
    dynamic_temperatures: list[float] = field(default_factory=lambda: [0.0, 0.6])  # of (c) and (d)
    dynamic_depth: int = 16  # the depth limit of dynamic and DP trees in (c) and (d)
    key_sizes: list[int] = field(default_factory=lambda: [16, 64])
    draft_sizes: list[int] = field(default_factory=lambda: [32])  # (d)'s tree budgets
    draft_group_size: int | None = None  # the self-drafts' quantization groups (None: the runtime's default)

    def __post_init__(self) -> None:
        if self.acceptance_tokens is None:
            self.acceptance_tokens = self.tokens

    def prompts_for(self, n: int) -> int:
        if n <= self.full_prompts_until:
            return self.prompts
        return max(self.min_prompts, min(self.prompts, self.prompts * self.full_prompts_until // n))


# --small: a few sizes and prompts, shallow trees; its method tree has at most 16 nodes and the largest size
SMALL = {"sizes": [1, 4, 16], "temperatures": [0.0, 0.6, 1.2], "prompts": 4, "min_prompts": 2, "tokens": 12,
         "batch": 4, "width": 8, "max_depth": 16, "dynamic_sizes": [4, 16], "dynamic_depth": 4, "key_sizes": [4],
         "draft_sizes": [8], "draft_group_size": 32}
FLAG_FIELDS = {"batch_size": "batch", "group_size": "draft_group_size"}  # flags named otherwise than their field
# Flags that only one experiment (or two) reads: given without them, they would be ignored in silence.
EXPERIMENT_FLAGS = {"sizes": ("sizes",), "size_temperatures": ("sizes",), "full_prompts_until": ("sizes", "dynamic"),
                    "min_prompts": ("sizes", "dynamic"),
                    "temperatures": ("methods",), "top_ps": ("methods",), "top_p_temperature": ("methods",),
                    "method_tree_size": ("methods",), "dynamic_sizes": ("dynamic",), "key_sizes": ("dynamic",),
                    "dynamic_temperatures": ("dynamic", "drafts"), "dynamic_depth": ("dynamic", "drafts"),
                    "draft_sizes": ("drafts",), "group_size": ("drafts",)}


def settings_from(a: argparse.Namespace) -> Settings:
    names, given = {f.name for f in fields(Settings)}, {}
    for dest, value in vars(a).items():
        if FLAG_FIELDS.get(dest, dest) in names and value is not None:  # an unset flag keeps the default
            given[FLAG_FIELDS.get(dest, dest)] = value
    small = {**SMALL, "method_tree_size": min(16, max(given.get("sizes", SMALL["sizes"])))} if a.small else {}
    return Settings(**{**small, **given})


# --- the experiments' results


@dataclass
class Acceptance:
    p: list[float]
    steps: int
    seconds: float
    confidence: dict | None = None  # p by the draft's confidence (planner/acceptance.py): dynamic trees' keys


@dataclass
class Row:
    """One point of an experiment: a setting and tree size, and what each of its families (tree families,
    methods, keys, draft kinds; "plain" = plain decoding, the speed baseline) measured there."""

    temperature: float
    n: int  # tree size (budget, for grown trees)
    measured: dict[str, Measured]
    top_p: float = 1.0
    prompts: int = 0
    labels: dict[str, str] = field(default_factory=dict)  # how each static tree looks
    predicted: dict[str, float] = field(default_factory=dict)  # Sequoia's objective for each family's tree
    draft: str = "trained"  # the pair's draft, or a self-draft spelling ((d))
    acceptance: Acceptance | None = None  # the acceptance vector of that draft ((d))

    def gain(self, a: str = "dynamic", b: str = "dp") -> tuple[float, float]:
        """a / b - 1 in tokens per step, paired over the prompts."""
        return relative_gain(self.measured[a].seqs, self.measured[b].seqs)

    def speed(self, family: str) -> float:
        """A family's tokens/s as a ratio to plain decoding in the same run."""
        return self.measured[family].tokens_per_s / self.measured["plain"].tokens_per_s


@dataclass
class Results:
    pair: Pair
    prompts_source: str
    acceptance: dict[tuple[float, float], Acceptance] = field(default_factory=dict)
    sizes: dict[float, list[Row]] = field(default_factory=dict)  # (a), by temperature
    settings: list[Row] = field(default_factory=list)  # (b)
    method_tree: Tree = field(default_factory=lambda: Tree([-1]))
    method_tree_source: str = ""
    dynamic: dict[float, list[Row]] = field(default_factory=dict)  # (c), by temperature
    keys: list[Row] = field(default_factory=list)  # (c)'s keys of dynamic trees
    drafts: list[Row] = field(default_factory=list)  # (d)


class Runner:
    def __init__(self, pair: Pair, cfg: Settings, prompts: list[list[int]], log: h.Log):
        from planner.models import resolve_model

        self.pair, self.cfg, self.log = pair, cfg, log
        args = ModelArgs.from_file(pair.target)
        # Room in the context window for the prompt, the generated tokens and the largest tree.
        largest = max(max(cfg.sizes), cfg.method_tree_size, max(cfg.dynamic_sizes) + cfg.dynamic_depth)
        room = args.max_position_embeddings - cfg.tokens - largest - 2
        if room < 4:
            raise UsageError(f"the context window ({args.max_position_embeddings}) cannot hold --tokens "
                             f"{cfg.tokens} plus a tree of {largest} nodes and a prompt; lower --tokens or the sizes")
        self.prompts = [ids[-room:] for ids in prompts]
        # Grown trees draw each level within the room left in the window (spec/growth.py): give them the model's
        # whole window, up to what an unnarrowed growth of the largest dynamic size could draw.
        grown = max(cfg.dynamic_sizes) * cfg.dynamic_depth
        self.max_seq_len = min(args.max_position_embeddings,
                               max(len(x) for x in self.prompts) + cfg.tokens + max(largest, grown) + 2)
        self.refs = (resolve_model(str(pair.target))[0], resolve_model(str(pair.draft))[0])
        self.engines: dict[tuple[str, str | None], Any] = {}

    def self_options(self, draft: str | None) -> dict:
        """Engine options of a self-draft (its group size); none for the pair's draft."""
        g = self.cfg.draft_group_size
        return {"group_size": g} if draft is not None and g is not None else {}

    def engine(self, method: str, draft: str | None = None):
        """The pair's engine for `method`, drafting with the pair's draft or the self-draft `draft`."""
        key = (method, draft)
        if key not in self.engines:
            self.engines[key] = h.load_engine(self.pair, draft=True if draft is None else draft,
                                              max_seq_len=self.max_seq_len, device=self.cfg.device, tree=[-1],
                                              method=method, batch_size=self.cfg.batch, **self.self_options(draft))
        return self.engines[key]

    def acceptance(self, res: Results, temperature: float, top_p: float, draft: str | None = None) -> Acceptance:
        """The acceptance vector at this setting of the pair's draft (kept in res.acceptance, whose table shows it)
        or of a self-draft (measured once per setting, kept in its Row)."""
        from offload_runtime.api.plans import ModelRef
        from offload_runtime.api.self_draft import self_draft_quant
        from planner.acceptance import measure_acceptance

        key = (temperature, top_p)
        if draft is None and key in res.acceptance:
            return res.acceptance[key]
        cfg = self.cfg
        tref, dref = self.refs
        if draft is not None:
            quant = self_draft_quant(draft, ModelArgs.from_file(self.pair.target), None, cfg.draft_group_size, None,
                                     str(self.pair.target))
            dref = ModelRef.of_self_draft(draft, tref, quant.label)
        r = measure_acceptance(tref, dref, device=cfg.device, dtype="float32", temperature=temperature, top_p=top_p,
                               width=cfg.width, prompts=self.prompts[: cfg.prompts], prompts_source="ablations",
                               max_new_tokens=cfg.acceptance_tokens, seed=ACCEPTANCE_SEED, batch_size=cfg.batch,
                               engine_options=self.self_options(draft))
        self.log(f"acceptance of {draft or 'the draft'} at T={temperature:g}, top-p {top_p:g}: p[1..4] = "
                 f"{', '.join(f'{x:.3f}' for x in r.p[:4])} ({r.steps} steps, {r.elapsed_s:.1f} s)")
        acc = Acceptance(list(r.p), r.steps, r.elapsed_s, r.confidence)
        if draft is None:
            res.acceptance[key] = acc
        return acc

    def measure(self, trees: dict[str, Tree | DynamicTree], count: int, temperature: float, top_p: float = 1.0,
                method: str = "sequoia", draft: str | None = None) -> dict[str, Measured]:
        """Tokens per step of each family's tree (or trees grown per step) over the first `count` prompts, prompt i
        with seed + i. Identical static trees (small sizes) are measured once and share one Measured, which the
        tables show as "same tree"."""
        seen: dict[Tree, Measured] = {}
        out = {}
        for family, tree in trees.items():
            if isinstance(tree, Tree) and tree in seen:
                out[family] = seen[tree]
                continue
            # Generate past `tokens` by more than one step can emit, and stop at the first step that reaches it:
            # then no counted step is cut by the length budget (which would bias the last step down) and every
            # step drafts the whole tree (the decoder shrinks the tree to one node when one token is left).
            tokens = self.cfg.tokens
            depth = tree.depth if isinstance(tree, DynamicTree) else tree.max_depth
            run = h.run_engine(self.engine(method, draft), self.prompts[:count], tree=tree, tokens=tokens + depth + 1,
                               temperature=temperature, top_p=top_p, seed=self.cfg.seed, stop_at=tokens)
            for r in run.results:
                assert r.finish_reason == "stop", (r.finish_reason, "a step was cut short")
                assert r.stats.new_tokens == sum(a + 1 for a in r.stats.accepted_per_step), \
                    "a step's tokens went missing"
            steps = sum(r.stats.steps for r in run.results)
            sizes = [n for r in run.results for n in r.stats.tree_sizes]
            out[family] = Measured([(r.stats.new_tokens, r.stats.steps) for r in run.results], run.seconds,
                                   [t[:tokens] for t in run.tokens], sum(sizes) / len(sizes) if sizes else math.nan,
                                   sum(r.stats.draft_nodes for r in run.results) / steps if steps else math.nan)
            if isinstance(tree, Tree):
                seen[tree] = out[family]
        return out

    def add(self, rows: list[Row], row: Row, what: str) -> None:
        rows.append(row)
        self.log(f"T={row.temperature:g} top-p {row.top_p:g} {what}: "
                 + ", ".join(f"{k} {fmt(m)}" for k, m in row.measured.items()) + f" ({row.prompts} prompts)")

    def tree_sizes(self, res: Results, temperature: float) -> None:
        """(a): the DP tree, the best k sequences and a chain at each size, with the objective's prediction."""
        cfg = self.cfg
        p = self.acceptance(res, temperature, 1.0).p
        table = best_trees(p, max(cfg.sizes), cfg.max_depth)
        rows = res.sizes[temperature] = []
        for n in cfg.sizes:
            trees = family_trees(n, p, table, cfg.max_depth)
            count = cfg.prompts_for(n)
            measured = self.measure({f: tree for f, (tree, _) in trees.items()}, count, temperature)
            self.add(rows, Row(temperature, n, measured, prompts=count,
                               labels={f: label for f, (_, label) in trees.items()},
                               predicted={f: expected_tokens(tree, p) for f, (tree, _) in trees.items()}), f"size {n}")

    def methods(self, res: Results) -> None:
        """(b): every method on one DP tree, at each temperature (top-p 1) and each top-p."""
        cfg = self.cfg
        t_ref = 0.6 if 0.6 in cfg.temperatures else cfg.temperatures[len(cfg.temperatures) // 2]
        n, d = cfg.method_tree_size, cfg.max_depth
        tree = res.method_tree = best_trees(self.acceptance(res, t_ref, 1.0).p, n, d).tree(n, d)
        res.method_tree_source = (f"the DP tree of at most {n} nodes, depth <= {d} ({len(tree)} nodes, "
                                  f"depth {tree.max_depth}) for the acceptance vector at T={t_ref:g}, "
                                  f"top-p 1; the same tree for every method and setting")
        for temperature, top_p in [(t, 1.0) for t in cfg.temperatures] + [(cfg.top_p_temperature, q)
                                                                           for q in cfg.top_ps]:
            p = self.acceptance(res, temperature, top_p).p
            measured: dict[str, Measured] = {}
            for method in METHODS:
                if temperature == 0 and measured:  # greedy: the decoder verifies greedily whatever the method
                    measured[method] = measured["sequoia"]
                else:
                    measured |= self.measure({method: tree}, cfg.prompts, temperature, top_p, method)
            self.add(res.settings, Row(temperature, len(tree), measured, top_p, cfg.prompts,
                                       predicted={"sequoia": expected_tokens(tree, p)}), "methods")

    def dynamic(self, res: Results, temperature: float) -> None:
        """(c): trees grown per step against the DP tree and k sequences of the same size; then the keys."""
        cfg, d = self.cfg, self.cfg.dynamic_depth
        acc = self.acceptance(res, temperature, 1.0)
        conf = ConfidenceAcceptance.from_dict(acc.confidence)
        table = best_trees(acc.p, max(cfg.dynamic_sizes), d)
        rows = res.dynamic[temperature] = []
        for n in cfg.dynamic_sizes:
            static = family_trees(n, acc.p, table, d)
            trees = {"dynamic": DynamicTree(n, d, acceptance=conf), "dp": static["dp"][0], "kseq": static["kseq"][0],
                     "plain": Tree([-1])}
            count = cfg.prompts_for(n)
            self.add(rows, Row(temperature, n, self.measure(trees, count, temperature), prompts=count,
                               labels={f: static[f][1] for f in ("dp", "kseq")}), f"dynamic, size {n}")
        for n in cfg.key_sizes:
            models = {"confidence": conf, "draft": DraftProbabilities(), "positional": PositionalAcceptance(tuple(acc.p))}
            trees = {key: DynamicTree(n, d, acceptance=m) for key, m in models.items()}
            self.add(res.keys, Row(temperature, n, self.measure(trees, cfg.prompts, temperature), prompts=cfg.prompts),
                     f"keys, size {n}")

    def drafts(self, res: Results, temperature: float) -> None:
        """(d): the pair's draft and each self-draft, each with its own DP tree and dynamic trees."""
        cfg, d = self.cfg, self.cfg.dynamic_depth
        plain = self.measure({"plain": Tree([-1])}, cfg.prompts, temperature)
        for draft in (None, *SELF_DRAFTS):
            acc = self.acceptance(res, temperature, 1.0, draft)
            table = best_trees(acc.p, max(cfg.draft_sizes), d)
            for n in cfg.draft_sizes:
                trees = {"static": table.tree(n, d),
                         "dynamic": DynamicTree(n, d, acceptance=ConfidenceAcceptance.from_dict(acc.confidence))}
                measured = self.measure(trees, cfg.prompts, temperature, draft=draft) | plain
                self.add(res.drafts, Row(temperature, n, measured, prompts=cfg.prompts, draft=draft or "trained",
                                         acceptance=acc), f"{draft or 'trained'} n={n}")
            for key in [k for k in self.engines if k[1] == draft]:
                del self.engines[key]  # a self-draft is the target's size: one at a time in memory


# --- tables: one dict of values per row, columns picked per table


def values(r: Row) -> dict[str, Any]:
    """A row's values by column key: its setting, each family's measurement, prediction (`f_pred`), label
    (`f_label`) and, where plain decoding ran, tokens/s ratio (`f_speed`)."""
    speeds = {f"{f}_speed": r.speed(f) for f in r.measured} if "plain" in r.measured else {}
    return {"T": r.temperature, "top_p": r.top_p, "setting": regime(r.temperature), "n": r.n, "prompts": r.prompts,
            **r.measured, **{f"{f}_pred": x for f, x in r.predicted.items()},
            **{f"{f}_label": x for f, x in r.labels.items()}, **speeds}


def p_values(p: Sequence[float], shown: int) -> dict[str, float]:
    return {**{f"p{k + 1}": x for k, x in enumerate(p[:shown])}, "sum": sum(p)}


def p_columns(shown: int, width: int) -> list[Column]:
    return [*(Column(f"p{k + 1}", f"p[{k + 1}]", ".3f") for k in range(shown)),
            Column("sum", f"sum p[1..{width}]", ".3f")]


def acceptance_table(res: Results, width: int) -> Table:
    shown = min(width, 6)
    rows = [{"T": t, "top_p": q, "steps": a.steps, **p_values(a.p, shown)}
            for (t, q), a in sorted(res.acceptance.items())]
    return Table(f"Acceptance vectors of {res.pair.label} (star tree of {width} children)",
                 [Column("T", "T", "g"), Column("top_p", "top-p", "g"), Column("steps", "steps"),
                  *p_columns(shown, width)], rows,
                 ["p[k] = share of steps whose accepted child had draft rank k; T = 0: the draft's top children, "
                  "accepted on equality; the predicted columns below come from these vectors"])


def greedy_mismatches(rows: Sequence[Row]) -> list[str]:
    """Greedy decoding is lossless: every tree must give plain decoding's tokens; the (size, family) that do not."""
    plain = next((r.measured["dp"] for r in rows if r.n == 1), None)
    if plain is None:
        return []
    differ = [(r.n, f, sum(a != b for a, b in zip(m.outputs, plain.outputs)), len(m.outputs))
              for r in rows for f, m in r.measured.items()]
    return [f"n={n} {f}: {d}/{total}" for n, f, d, total in differ if d]


def size_table(res: Results, temperature: float, cfg: Settings) -> Table:
    rows = res.sizes[temperature]
    cols = [Column("n", "n")]
    for fam, title, label in (("dp", "DP", "DP tree"), ("kseq", "k seq", "k x l"), ("chain", "chain", None)):
        cols += [Column(fam, title, fmt), Column(f"{fam}_pred", f"{title} pred.", ".3f")]
        cols += [Column(f"{fam}_label", label)] if label else []
    notes = [f"measured: mean tokens per step {PLUS_MINUS} one standard error (per-sequence estimate), "
             f"{cfg.tokens} tokens per prompt; pred. = expected_tokens(tree, p) for the acceptance vector above",
             f"DP = best_trees(p, {max(cfg.sizes)}, {cfg.max_depth}).tree(n, {cfg.max_depth}) (depth limit "
             f"{cfg.max_depth}; where it does not bind, the best tree of at most n nodes); k seq = the k x l "
             "sequences (k >= 2, 1 + k*l <= n) with the highest predicted value, drafted by Sequoia's sampling "
             "(the k first tokens distinct); chain = n nodes in a line",
             f"DP vs k seq = measured DP / measured k seq - 1, paired over the same prompts and seeds; sizes "
             f"above {cfg.full_prompts_until} use fewer prompts (column prompts) to bound the CPU time",
             "identical trees (n <= 2, and any family that equals another) are measured once"]
    if temperature == 0 and any(r.n == 1 for r in rows):
        bad = greedy_mismatches(rows)
        notes.append(f"lossless check FAILED: sequences whose first {cfg.tokens} tokens differ from plain greedy "
                     f"decoding: {'; '.join(bad)}" if bad else f"lossless check: every tree's first {cfg.tokens} "
                     "tokens equal plain greedy decoding's on every prompt")
    return Table(f"{SIZE_TITLE} on {res.pair.label}, {regime(temperature)}",
                 cols + [Column("gain", "DP vs k seq", fmt_gain), Column("prompts", "prompts")],
                 [{**values(r), "gain": "same tree" if r.measured["dp"] is r.measured["kseq"] else r.gain("dp", "kseq")}
                  for r in rows], notes)


def method_table(res: Results, cfg: Settings) -> Table:
    rows = [{**values(r), **{f"vs_{m}": None if r.temperature == 0 else r.gain("sequoia", m)
                             for m in ("specinfer", "topk")}} for r in res.settings]
    return Table(f"{METHOD_TITLE} on {res.pair.label}: Sequoia, SpecInfer and top-k drafting",
                 [Column("T", "T", "g"), Column("top_p", "top-p", "g"), Column("sequoia", "Sequoia", fmt),
                  Column("sequoia_pred", "Sequoia pred.", ".3f"), Column("specinfer", "SpecInfer", fmt),
                  Column("topk", "top-k", fmt), Column("vs_specinfer", "vs SpecInfer", fmt_gain),
                  Column("vs_topk", "vs top-k", fmt_gain)], rows,
                 [f"tree: {res.method_tree_source}",
                  f"{cfg.prompts} prompts x {cfg.tokens} tokens per setting and method; {PLUS_MINUS} one standard "
                  "error (per-sequence estimate); gains paired over the same prompts and seeds",
                  "Sequoia: children drawn without replacement, residual verification; SpecInfer: children drawn "
                  "with replacement, Q not updated; top-k: the draft's top children, sampled verification",
                  "T = 0: all three are greedy (top children, accepted on equality): measured once",
                  "Sequoia pred. = expected_tokens(tree, p) with p measured at that row's setting"])


def speed_note(cfg: Settings, baseline: str) -> str:
    return (f"tokens/s: the {cfg.device.upper()}'s for the whole batch ({cfg.batch} rows), as a ratio to plain "
            f"decoding {baseline}")


def dynamic_table(res: Results, temperature: float, cfg: Settings) -> Table:
    rows = [{**values(r), "gain": r.gain(), "nodes": r.measured["dynamic"].nodes,
             "draft_dyn": r.measured["dynamic"].draft_nodes, "draft_dp": r.measured["dp"].draft_nodes}
            for r in res.dynamic[temperature]]
    d = cfg.dynamic_depth
    table = res.acceptance[(temperature, 1.0)].confidence["table"]
    return Table(f"{DYNAMIC_TITLE} on {res.pair.label}, {regime(temperature)}",
                 [Column("n", "n"), Column("dynamic", "dynamic", fmt), Column("dp", "DP", fmt),
                  Column("kseq", "k seq", fmt), Column("gain", "dynamic vs DP", fmt_gain), Column("dp_label", "DP tree"),
                  Column("kseq_label", "k x l"), Column("nodes", "dyn. nodes", ".0f"),
                  Column("draft_dyn", "draft nodes dyn.", ".0f"), Column("draft_dp", "draft nodes DP", ".0f"),
                  Column("dynamic_speed", "tokens/s dyn.", report.times), Column("dp_speed", "tokens/s DP", report.times),
                  Column("kseq_speed", "tokens/s k seq", report.times), Column("prompts", "prompts")], rows,
                 [f"tokens per step {PLUS_MINUS} one standard error (per-sequence estimate), {cfg.tokens} tokens per "
                  f"prompt; dynamic vs DP paired over the same prompts and seeds",
                  f"dynamic: DynamicTree(n, {d}) keyed by the acceptance vector by the draft's confidence (8 bins of its "
                  f"top probability at the node) measured with the acceptance vector above; DP: best_trees(p, "
                  f"{max(cfg.dynamic_sizes)}, {d}).tree(n, {d}); k seq as in the size tables; p[1] by confidence bin "
                  f"goes from {table[0][0]:.2f} (least confident) to {table[-1][0]:.2f} (most)",
                  "dyn. nodes: mean size of the verified grown trees; draft nodes: tree nodes run through the draft "
                  "per step", speed_note(cfg, "(no draft) on the same prompts in the same run")])


def keys_table(res: Results, cfg: Settings) -> Table:
    rows = [{**values(r), **{f"{key}_gain": r.gain(key, "positional") for key in KEYS[:2]}} for r in res.keys]
    return Table(f"{KEYS_TITLE} on {res.pair.label}",
                 [Column("setting", "setting"), Column("n", "n"), Column("confidence", "confidence table", fmt),
                  Column("draft", "draft probabilities", fmt), Column("positional", "positional (= Sequoia)", fmt),
                  Column("confidence_gain", "confidence vs positional", fmt_gain),
                  Column("draft_gain", "draft vs positional", fmt_gain)], rows,
                 [f"tokens per step of DynamicTree(n, {cfg.dynamic_depth}) keyed three ways, on the same {cfg.prompts} "
                  f"prompts and seeds: a_u(r) = p[r | the draft's top probability at u] (8 bins), the draft's own r-th "
                  "largest probability (EAGLE-2's and SpecExec's score), or p[r] whatever u (growth is then Sequoia's "
                  "best-first search)"])


def drafts_table(res: Results, cfg: Settings) -> Table:
    rows = [{**values(r), "draft": r.draft, **p_values(r.acceptance.p, 4)} for r in res.drafts]
    group = cfg.draft_group_size or "128 (the default)"
    return Table(f"{DRAFTS_TITLE} on {res.pair.label}",
                 [Column("setting", "setting"), Column("draft", "draft"), Column("n", "n"), *p_columns(4, cfg.width),
                  Column("static", "tokens/step DP", fmt), Column("dynamic", "tokens/step dynamic", fmt),
                  Column("static_speed", "tokens/s DP", report.times),
                  Column("dynamic_speed", "tokens/s dynamic", report.times)], rows,
                 [f"trained: the pair's own draft; self-int4 / self-int8: the target quantized on load (group size "
                  f"{group}), resident, sharing the target's embedding and head",
                  f"p: the acceptance vector (star tree of {cfg.width} children) of that draft at that setting; DP: "
                  f"best_trees(p, n, {cfg.dynamic_depth}); dynamic: DynamicTree(n, {cfg.dynamic_depth}) keyed by that "
                  f"draft's confidence table; tokens per step {PLUS_MINUS} one standard error, {cfg.tokens} tokens per "
                  f"prompt, {cfg.prompts} prompts",
                  speed_note(cfg, "in the same run; nothing streams here, so a self-draft costs about what the "
                             "target does per level: the ratio says nothing about offloaded runs "
                             "(tools/project_70b.py does)")])


# --- the claims, in words, from the numbers


def tree_claims(res: Results) -> list[str]:
    out = []
    for t, rows in res.sizes.items():
        big = [r for r in rows if r.n >= 3]
        if not big:
            continue
        gains = [(r.gain("dp", "kseq"), r.n) for r in big]
        (gmax, gse), nmax = max(gains, key=lambda x: x[0][0])
        behind = [n for (g, se), n in gains if g + 2 * se < 0]
        last, m = big[-1], big[-1].measured
        s = (f"{'greedy' if t == 0 else f'T={t:g}'}: at size {last.n} the DP tree gives {fmt(m['dp'])} tokens/step, "
             f"the best k independent sequences ({last.labels['kseq']}) {fmt(m['kseq'])} and the chain "
             f"{fmt(m['chain'])}: DP {fmt_gain(gains[-1][0])} over k sequences (paper: up to +33% at sizes up to "
             f"512); the largest measured gain is {gmax * 100:+.1f}% {PLUS_MINUS} {gse * 100:.1f} at size {nmax}.")
        if behind:
            s += f" DP is behind k sequences by more than two standard errors at size(s) {behind}."
        tail = [r for r in rows if r.n >= max(4, rows[-1].n // 8)]
        if len(tail) >= 2:
            doublings = math.log2(tail[-1].n / tail[0].n)
            per = {f: (tail[-1].measured[f].mean - tail[0].measured[f].mean) / doublings
                   for f in ("dp", "kseq", "chain")}
            s += (f" From size {tail[0].n} to {tail[-1].n} tokens/step grow by {per['dp']:+.3f} per doubling for DP, "
                  f"{per['kseq']:+.3f} for k sequences and {per['chain']:+.3f} for the chain (paper: DP keeps growing "
                  f"roughly logarithmically, the others flatten).")
        pred = max(abs(r.measured["dp"].mean / r.predicted["dp"] - 1) for r in rows)
        out.append(s + f" Measured DP values are within {pred * 100:.0f}% of the DP's prediction at every size.")
    return out


def method_claims(res: Results) -> list[str]:
    sampled = [r for r in res.settings if r.temperature > 0 and r.top_p == 1.0]
    if not sampled:
        return []
    out, worse = [], []
    # each baseline, the paper's largest gain over it, and the row where the paper says it fails
    for other, name, paper, r, where, verdict in (
            ("specinfer", "SpecInfer", "+65%", sampled[0], "the lowest sampled temperature",
             "SpecInfer collapses at low temperature"),
            ("topk", "top-k", "+27%", sampled[-1], "the highest temperature",
             "top-k falls behind at high temperature")):
        gains = [(s.gain("sequoia", other), s.temperature) for s in sampled]
        (best, best_se), t_best = max(gains, key=lambda x: x[0][0])
        worse += [f"{name} at T={t:g}" for (g, se), t in gains if g + 2 * se < 0]
        out.append(f"Sequoia vs {name}: largest gain {best * 100:+.1f}% {PLUS_MINUS} {best_se * 100:.1f} at "
                   f"T={t_best:g} (paper: up to {paper}); at {where} (T={r.temperature:g}) {name} gives "
                   f"{fmt(r.measured[other])} tokens/step against Sequoia's {fmt(r.measured['sequoia'])} "
                   f"(paper: {verdict}).")
    return out + ["Sequoia is never behind either baseline by more than two standard errors." if not worse else
                  f"Sequoia is behind by more than two standard errors against: {', '.join(worse)}."]


def dynamic_claims(res: Results) -> list[str]:
    """Where dynamic trees win and where they do not, by two standard errors of the paired gain."""
    out = []
    for t, rows in res.dynamic.items():
        gains = [(r.n, *r.gain()) for r in rows]
        wins = [f"{n} ({g * 100:+.0f}%)" for n, g, se in gains if g > 2 * se]
        losses = [f"{n} ({g * 100:+.0f}%)" for n, g, se in gains if g < -2 * se]
        even = [str(n) for n, g, se in gains if abs(g) <= 2 * se]
        big = [g for n, g, _ in gains if n >= 64]
        goal = (f" At n >= 64 dynamic gives {min(big) * 100:+.0f}% to {max(big) * 100:+.0f}% tokens per step over "
                "DP (goal: +20%).") if big else ""
        speed = ", ".join(f"{r.n}: {r.speed('dynamic') / r.speed('dp'):.2f}x" for r in rows)
        out.append(f"{regime(t)}: dynamic ahead (by > 2 s.e.) at n = {', '.join(wins) or 'none'}; behind at "
                   f"{', '.join(losses) or 'none'}; within noise at {', '.join(even) or 'none'}.{goal} Tokens/s "
                   f"dynamic / DP: {speed}.")
    for key, name in (("confidence", "the confidence table"), ("draft", "the draft's own probabilities")):
        gains = [f"{regime(r.temperature)} n={r.n}: {fmt_gain(r.gain(key, 'positional'))}" for r in res.keys]
        if gains:
            out.append(f"Keyed by {name} against positional keys (Sequoia's tree): {'; '.join(gains)}.")
    return out


def drafts_claims(res: Results) -> list[str]:
    """Each self-draft's tokens per step against the trained draft's, per setting and budget."""
    out = []
    for r in res.drafts:
        trained = next(t for t in res.drafts if (t.draft, t.temperature, t.n) == ("trained", r.temperature, r.n))
        if r is not trained:
            out.append(f"{regime(r.temperature)}, n = {r.n}: {r.draft} gives {r.measured['static'].mean:.2f} (DP) and "
                       f"{r.measured['dynamic'].mean:.2f} (dynamic) tokens per step, the trained draft "
                       f"{trained.measured['static'].mean:.2f} and {trained.measured['dynamic'].mean:.2f}; p[1] "
                       f"{r.acceptance.p[0]:.3f} vs {trained.acceptance.p[0]:.3f}.")
    return out


# --- plots


FAMILY_STYLE = {"dp": ("DP tree (Sequoia)", "C0"), "kseq": ("best k independent sequences", "C1"),
                "chain": ("chain", "C2")}
DYNAMIC_STYLE = {"dynamic": ("dynamic (grown per step)", "C3"), "dp": FAMILY_STYLE["dp"], "kseq": FAMILY_STYLE["kseq"]}
METHOD_STYLE = {"sequoia": ("Sequoia (without replacement)", "C0"), "specinfer": ("SpecInfer (with replacement)", "C3"),
                "topk": ("top-k drafting", "C2")}


def _panel(ax, rows: Sequence[Row], x: Callable[[Row], float], styles: dict[str, tuple[str, str]], predicted: bool,
           xlabel: str, title: str) -> None:
    """Each family's tokens per step against x(row), error bars of 1 s.e.; dashed, when `predicted`, the DP's
    objective for the families that have it."""
    xs = [x(r) for r in rows]
    for fam, (label, color) in styles.items():
        dashed = predicted and fam in rows[0].predicted
        ms = [r.measured[fam] for r in rows]
        ax.errorbar(xs, [m.mean for m in ms], yerr=[0.0 if math.isnan(m.se) else m.se for m in ms], marker="o", ms=4,
                    lw=1.6, capsize=3, color=color, label=f"{label}, measured" if dashed else label)
        if dashed:
            ax.plot(xs, [r.predicted[fam] for r in rows], ls="--", lw=1, color=color, alpha=0.7,
                    label=f"{label}, predicted")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def plot_by_size(plt, res: Results, by_temperature: dict[float, list[Row]], styles: dict[str, tuple[str, str]],
                 title: str, path: Path) -> None:
    """(a) or (c): one panel per temperature, tree size on a log axis."""
    fig, axes = plt.subplots(1, len(by_temperature), figsize=(5.2 * len(by_temperature), 4.2), squeeze=False,
                             sharey=True)
    for ax, (t, rows) in zip(axes[0], by_temperature.items()):
        _panel(ax, rows, lambda r: r.n, styles, True, "tree size n (nodes)", regime(t))
        ax.set_xscale("log", base=2)
    _save(plt, fig, axes[0][0], f"{title}: {res.pair.label} pair (error bars: 1 s.e.)", path, "upper left")


def plot_methods(plt, res: Results, path: Path) -> None:
    """(b): against temperature at top-p 1, and, in a narrower panel, against top-p."""
    main = [r for r in res.settings if r.top_p == 1.0]
    nucleus = [r for r in res.settings if r.top_p != 1.0]
    panels = 2 if nucleus else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels + 0.6, 4.2), squeeze=False, sharey=True,
                             gridspec_kw={"width_ratios": [2, 1][:panels]})
    _panel(axes[0][0], main, lambda r: r.temperature, METHOD_STYLE, True, "temperature (top-p 1)",
           f"tree of {len(res.method_tree)} nodes, same for all")
    if nucleus:
        t = nucleus[0].temperature
        rows = sorted(nucleus + [r for r in main if r.temperature == t], key=lambda r: r.top_p)
        _panel(axes[0][1], rows, lambda r: r.top_p, METHOD_STYLE, False, f"top-p (T = {t:g})", "nucleus sampling")
    _save(plt, fig, axes[0][0], f"Drafting and verification methods: {res.pair.label} pair (error bars: 1 s.e.)",
          path, "best")


def write_plots(res: Results, plots_dir: Path) -> tuple[dict[str, Path], str | None]:
    """({png name: path} written, notice): the notice says why nothing was drawn (no matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return {}, "plots skipped: matplotlib is not installed (pip install 'offload-runtime[plot]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = {name: plots_dir / name for name, drawn in ((TREE_PNG, res.sizes), (TEMPERATURE_PNG, res.settings),
                                                         (DYNAMIC_PNG, res.dynamic)) if drawn}
    if res.sizes:
        plot_by_size(plt, res, res.sizes, FAMILY_STYLE, SIZE_TITLE, images[TREE_PNG])
    if res.settings:
        plot_methods(plt, res, images[TEMPERATURE_PNG])
    if res.dynamic:
        plot_by_size(plt, res, res.dynamic, DYNAMIC_STYLE, DYNAMIC_TITLE, images[DYNAMIC_PNG])
    return images, None


def _save(plt, fig, first, title: str, path: Path, legend: str) -> None:
    """Label the first panel, title the figure, write it."""
    first.set_ylabel("tokens per step")
    first.legend(fontsize=7, loc=legend)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the Markdown section


PLOTS = ((SIZE_TITLE, TREE_PNG, "tokens per step vs tree size"), (METHOD_TITLE, TEMPERATURE_PNG,
         "tokens per step vs temperature"), (DYNAMIC_TITLE, DYNAMIC_PNG, "dynamic vs static trees"))


def markdown_section(res: Results, tables: Sequence[Table], *, machine: str, command: str, minutes: float,
                     intro: Sequence[str], images: dict[str, Path], md_path: Path, date: str | None = None) -> str:
    """The section for BENCHMARKS.md: heading, machine, command, tables with their plots, the claims in words."""
    blocks: list[Table | str] = list(tables)
    for title, name, alt in PLOTS:  # each plot goes after the last table it draws
        drawn = [i for i, t in enumerate(blocks) if isinstance(t, Table) and t.title.startswith(title)]
        if drawn and name in images:
            blocks.insert(drawn[-1] + 1, report.link(images[name], md_path, alt))

    def claims(heading: str, lines: list[str], missing: str = "") -> list[str]:
        return [heading, "\n".join(f"- {s}" for s in lines) or missing]

    if res.sizes or res.settings:
        blocks += ["### The paper's claims against these numbers",
                   *claims("**Claim 1: DP trees keep gaining as they grow; k independent sequences and chains "
                           "flatten.**", tree_claims(res), "- (tree sizes not run)"),
                   *claims("**Claim 2: sampling without replacement holds up at every temperature.**",
                           method_claims(res), "- (methods not run)"),
                   "**Where we differ from the paper, and why.** _(to be written after reading the numbers above: a "
                   "small model pair is not Llama-2-7B/70B.)_"]
    if res.dynamic:
        blocks += claims("**Dynamic trees against Sequoia's static tree: where they win and where they do not.**",
                         dynamic_claims(res))
    if res.drafts:
        blocks += claims("**The target's own low-bit copy against the trained draft.**", drafts_claims(res))
    return report.section(f"Sequoia ablations on the {res.pair.label} pair", machine=machine,
                          command=f"`{command}` ({minutes:.1f} min)", intro=intro, blocks=blocks, date=date)
# --- the command line


def _shown(value: Any) -> str:
    return ",".join(f"{x:g}" for x in value) if isinstance(value, list) else str(value)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python tools/ablations.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    full = Settings()

    def setting(flag: str, kind: Callable[[str], Any], what: str) -> None:
        """A flag that sets a Settings field; unset, the field keeps its full-run or --small default."""
        dest = flag[2:].replace("-", "_")
        name = FLAG_FIELDS.get(dest, dest)
        shown = f"default {_shown(getattr(full, name))}" + (f"; --small {_shown(SMALL[name])}" if name in SMALL else "")
        add(flag, type=kind, default=None, help=f"{what} ({shown})")

    add("--small", action="store_true", help="tiny random pair, sizes 1,4,16, few prompts (< 60 s)")
    add("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    add("--output", type=h.output_file, default=h.BENCHMARKS_MD, help="the Markdown file to append to")
    add("--plots-dir", type=Path, default=None,
        help="where the PNGs go (default: next to --output; with --no-write: no plots)")
    add("--experiments", type=h.csv(str), default=["sizes", "methods"],
        help="any of sizes, methods, dynamic, drafts (default sizes,methods)")
    add("--model", default=None, help="target (default: the demo pair; --small: a tiny random pair)")
    add("--draft", default=None, help="draft (with --model)")
    add("--threads", type=int, default=None, help="torch threads (default 2; --small: 1)")
    setting("--device", str, "cpu or cuda: tokens per step do not depend on the device, only the time does")
    setting("--sizes", h.csv(int), "tree sizes of (a)")
    setting("--size-temperatures", h.csv(float), "temperatures of (a)")
    setting("--temperatures", h.csv(float), "temperatures of (b)")
    setting("--top-ps", h.csv(float), "top-p values of (b)")
    setting("--top-p-temperature", float, "temperature of the top-p rows")
    setting("--prompts", int, "prompts per measurement")
    setting("--min-prompts", int, "fewest prompts for the largest sizes")
    setting("--full-prompts-until", int, "sizes above this get prompts * this / n prompts, at least --min-prompts")
    add("--prompts-from", default="builtin",
        help="builtin (planner's prompts), heldout (the demo's held-out chapters, from the local corpus dump of "
             "tools/train_demo_pair.py) or a JSONL file (default builtin)")
    setting("--tokens", int, "tokens generated per prompt")
    setting("--batch-size", int, "rows per target sweep")
    setting("--width", int, "children of the acceptance star tree")
    add("--acceptance-tokens", type=int, default=None,
        help="tokens per prompt measuring acceptance (default: --tokens; acceptance drifts along a generation, so "
             "the prediction should see the same positions as the runs it predicts)")
    setting("--max-depth", int, "depth limit of the DP trees (64 does not bind at 512 nodes unless p[1] is near 1: "
            "the tables show each tree's depth)")
    setting("--method-tree-size", int, "tree size of (b) (--small: at most 16)")
    setting("--dynamic-sizes", h.csv(int), "tree sizes of (c)")
    setting("--dynamic-temperatures", h.csv(float), "temperatures of (c) and (d)")
    setting("--dynamic-depth", int, "depth limit of dynamic and DP trees in (c) and (d)")
    setting("--key-sizes", h.csv(int), "sizes at which (c) compares the keys of dynamic trees (empty: none)")
    setting("--draft-sizes", h.csv(int), "tree budgets of (d)")
    setting("--group-size", int, "quantization group of (d)'s self-drafts (None: the runtime's, 128)")
    setting("--seed", int, "base seed: prompt i uses seed + i")
    add("--debug", action="store_true", help="show Python tracebacks")
    a = p.parse_args(argv)
    if not a.experiments or any(x not in EXPERIMENTS for x in a.experiments):
        p.error(f"--experiments takes any of {', '.join(EXPERIMENTS)}, comma-separated")
    if (a.model is None) != (a.draft is None):
        p.error("--model and --draft go together")
    for dest, wanted in EXPERIMENT_FLAGS.items():
        if getattr(a, dest) is not None and not set(wanted) & set(a.experiments):
            p.error(f"--{dest.replace('_', '-')} sets --experiments {' or '.join(wanted)}, which this run does "
                    f"not include; add it to --experiments or drop the flag")
    if a.prompts_from not in ("builtin", "heldout") and not Path(a.prompts_from).is_file():
        p.error(f"--prompts-from {a.prompts_from}: no such file; give builtin, heldout or a JSONL file of prompts")
    h.check_positive(p, a, ("threads", "prompts", "min_prompts", "full_prompts_until", "tokens", "batch_size",
                            "width", "acceptance_tokens", "method_tree_size"))
    if a.sizes is not None and (not a.sizes or min(a.sizes) < 1):
        p.error("--sizes must be whole numbers >= 1")
    if a.dynamic_sizes is not None and (not a.dynamic_sizes or min(a.dynamic_sizes) < 2):
        p.error("--dynamic-sizes must be whole numbers >= 2")
    if a.dynamic_depth is not None and a.dynamic_depth < 1:
        p.error("--dynamic-depth must be >= 1")
    if a.max_depth is not None and a.max_depth < 0:
        p.error("--max-depth must be >= 0")
    temps = [*(a.size_temperatures or []), *(a.temperatures or []), *(a.dynamic_temperatures or []),
             *([] if a.top_p_temperature is None else [a.top_p_temperature])]
    if any(t < 0 for t in temps) or any(not 0 < q <= 1 for q in a.top_ps or []):
        p.error("temperatures must be >= 0 and top-p values in (0, 1]")
    if (a.prompts or 2) < 2:
        p.error("--prompts must be >= 2 (the error bars need two sequences)")
    return a


def choose_pair(a: argparse.Namespace, workdir: Path) -> Pair:
    if a.model is not None:
        return h.named_pair(a.model, a.draft)
    if a.small:
        return h.small_pair(workdir)
    pair = h.demo_pair()
    if pair is None:
        raise UsageError("the demo pair is not built yet (offload_runtime/demo/*/model.safetensors missing): run "
                         "python tools/train_demo_pair.py, or pass --small, or --model/--draft")
    return pair


@dataclass
class Outcome:
    """What one run measured, and how it was written up."""

    results: Results
    tables: list[Table]
    claims: list[str]
    machine: str
    command: str
    minutes: float
    intro: list[str]
    images: dict[str, Path]
    notice: str | None  # why no plots were drawn


def run(argv: Sequence[str]) -> Outcome:
    a = parse_args(argv)
    cfg = settings_from(a)
    threads = a.threads or (1 if a.small else 2)
    torch.set_num_threads(threads)
    log = h.Log()
    with tempfile.TemporaryDirectory(prefix="ablations-") as workdir:
        log("preparing the pair")
        pair = choose_pair(a, Path(workdir))
        prompts, source = load_prompts(a.prompts_from, pair, cfg.prompts, cfg.prompt_len, log)
        if len(prompts) < 2:
            raise UsageError(f"{source}: the error bars need at least two prompts")
        models = f"target {h.describe_model(pair.target)}, draft {h.describe_model(pair.draft)}"
        cfg.prompts = min(cfg.prompts, len(prompts))
        cfg.min_prompts = min(cfg.min_prompts, cfg.prompts)
        runner = Runner(pair, cfg, prompts, log)
        res = Results(pair, source)
        if "sizes" in a.experiments:
            for t in cfg.size_temperatures:
                runner.tree_sizes(res, t)
        if "methods" in a.experiments:
            runner.methods(res)
        if "dynamic" in a.experiments:
            for t in cfg.dynamic_temperatures:
                runner.dynamic(res, t)
        if "drafts" in a.experiments:
            for t in cfg.dynamic_temperatures:
                runner.drafts(res, t)
        runner.engines.clear()
    tables = [acceptance_table(res, cfg.width), *(size_table(res, t, cfg) for t in res.sizes),
              *([method_table(res, cfg)] if res.settings else []), *(dynamic_table(res, t, cfg) for t in res.dynamic),
              *([keys_table(res, cfg)] if res.keys else []), *([drafts_table(res, cfg)] if res.drafts else [])]
    machine = h.machine_description(threads)
    if cfg.device != "cpu":
        machine = f"{torch.cuda.get_device_name(cfg.device)} ({cfg.device}, float32); host: {machine}"
    plots_dir = a.plots_dir if a.plots_dir is not None else (None if a.no_write else a.output.parent)
    images, notice = write_plots(res, plots_dir) if plots_dir is not None else ({}, None)
    intro = [f"pair: {pair.about}; {models}", f"prompts: {res.prompts_source}",
             "tokens per step = mean over target sweeps of (accepted path length + 1), pooled over sequences; "
             f"{PLUS_MINUS} one standard error from a per-sequence (cluster) estimate; no step is cut by the "
             "length budget (requests run past it and stop at the first step that reaches it)",
             "predicted = Sequoia's objective expected_tokens(tree, p) with the acceptance vector measured at "
             f"the same setting on the same prompts (other seeds), {cfg.acceptance_tokens} tokens per prompt"]
    return Outcome(res, tables, tree_claims(res) + method_claims(res) + dynamic_claims(res) + drafts_claims(res), machine,
                   shlex.join(["python", "tools/ablations.py", *argv]), (time.perf_counter() - log.start) / 60,
                   intro, images, notice)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = run(argv)
    for t in out.tables:
        print(report.to_text(t), end="\n\n")
    print("\n".join(f"- {s}" for s in out.claims))
    print(f"\nmachine: {out.machine}\ncommand: {out.command}\ntook: {out.minutes:.1f} min")
    for line in ([out.notice] if out.notice else []) + [f"plot written to {p}" for p in out.images.values()]:
        print(line)
    a = parse_args(argv)
    if not a.no_write:
        report.append(a.output, markdown_section(out.results, out.tables, machine=out.machine, command=out.command,
                                                 minutes=out.minutes, intro=out.intro, images=out.images,
                                                 md_path=a.output))
        print(f"appended to {a.output}")
    return 0


if __name__ == "__main__":
    from offload_runtime.cli import run_main

    run_main(main)
