#!/usr/bin/env python3
"""CPU benchmarks against the baselines, in one process: python tools/bench_cpu.py [--small] [--no-write]

Sections (--sections, default all):
  baselines  transformers' greedy `generate` (target alone) and assisted generation (`assistant_model=draft`)
             against our plain decoding and our Sequoia decoding with the planned tree, on the demo pair and on
             the ~100M-parameter random Llama config (bench-100m) with a truncated-copy draft
  trees      the planned tree against a chain, a k x l tree and grown (dynamic) trees of the same size, and plain
             decoding
  streaming  the same model resident vs streamed through the slots (0 resident layers): the cost of the copies
  plan       the plan's predicted tokens/step and s/token against a chat-like run that follows the plan, for
             45 s with plain decoding interleaved as the machine-speed reference the calibration also recorded
  batch      total tokens/s and sweeps per generated token for batch sizes 1, 2, 4, 8, 16, streamed

Every section prints an aligned table; unless --no-write, the tables are appended to BENCHMARKS.md under a
dated heading with the machine and the command. Ratios are the figures to quote: absolute CPU times are noise.

Fairness: both sides get the same prompt token ids, the same number of new tokens (end-of-sequence ignored;
transformers with `eos_token_id = None`), float32 weights read from the same checkpoint, the same torch threads;
transformers runs with `attn_implementation="sdpa"` and samples with `top_k=0, top_p=1` like ours. Every method
is warmed up, then the repeats run interleaved (A B C, B C A, ...) and the median tokens/s is reported
(tools/harness.py states the protocol).

--small builds tiny random models in a temporary directory and runs a few tokens (the test suite runs it).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence
from unittest import mock

import harness as h
import report
import torch
from report import CHECK, CROSS, Column, Table, sig, sig4, times

from offload_runtime.api.text import load_tokenizer
from offload_runtime.cli import ArgumentParser
from offload_runtime.decode.request import SamplingParams
from offload_runtime.model.config import ModelArgs
from offload_runtime.model.tree import Tree
from offload_runtime.spec.growth import DynamicTree
from offload_runtime.spec.tree_search import DEFAULT_ACCEPTANCE, best_trees, chain_tree, expected_tokens, \
    k_sequences_tree

SECTIONS = ("baselines", "trees", "streaming", "plan", "batch")
PLAN_CHECK_S = 45.0  # the plan check measures for this long at least (not in --small)
MS = [Column("draft_ms", "draft ms/step", ".3g"), Column("sweep_ms", "verify ms/step", ".3g"),
      Column("host_ms", "other ms/step", ".3g")]


@dataclass
class Settings:
    small: bool
    tokens: int
    prompts: int
    repeats: int
    temperatures: list[float]
    tree_size: int
    tree_depth: int
    prompt_len: int


@dataclass
class Report:
    tables: list[Table]
    machine: str
    command: str

    def table(self, title_start: str) -> Table:
        found = [t for t in self.tables if t.title.startswith(title_start)]
        assert len(found) == 1, (title_start, [t.title for t in self.tables])
        return found[0]


# --- transformers' side


class ForwardClock:
    """Counts a module's forward calls and the seconds spent inside them (pre/post forward hooks)."""

    def __init__(self, module: torch.nn.Module):
        self.calls, self.seconds, self._t0 = 0, 0.0, 0.0
        self._handles = [module.register_forward_pre_hook(lambda *_: setattr(self, "_t0", time.perf_counter())),
                         module.register_forward_hook(self._post)]

    def _post(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def take(self) -> tuple[int, float]:
        out = (self.calls, self.seconds)
        self.calls, self.seconds = 0, 0.0
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    # A clean generation config: no end-of-sequence (ours runs with ignore_eos), no sampling defaults of the
    # checkpoint's own (the demo's samples at 0.7 / top-p 0.9); every call names its settings.
    model.generation_config = GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=None,
                                               pad_token_id=0)
    return model


def assisted_settings(draft) -> str:
    """The assisted-generation settings transformers takes from the assistant's generation config (its defaults)."""
    cfg = draft.generation_config
    defaults = cfg._get_default_generation_params() if hasattr(cfg, "_get_default_generation_params") else {}
    names = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
    return ", ".join(f"{n}={getattr(cfg, n, None) if getattr(cfg, n, None) is not None else defaults.get(n)}"
                     for n in names)


def hf_method(target, clocks: dict[Any, ForwardClock], assistant, prompts: list[list[int]], tokens: int,
              temperature: float) -> h.Method:
    """transformers' generate, alone or with `assistant_model`; `clocks` holds a ForwardClock per model.
    The phases: draft = inside the assistant's forward, verify = inside the target's, other = the rest."""
    models = [target] + ([assistant] if assistant is not None else [])

    def run(repeat: int) -> h.Run:
        todo, n = (prompts[:1], min(tokens, 8)) if repeat < 0 else (prompts, tokens)
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
            dict(do_sample=False)
        extra = {"assistant_model": assistant} if assistant is not None else {}
        for m in models:
            clocks[m].take()
        out: list[list[int]] = []
        t0 = time.perf_counter()
        for i, ids in enumerate(todo):
            x = torch.tensor([ids])
            # transformers samples from the global RNG: fork it, so each call's seed stays local.
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                torch.manual_seed(1000 * max(repeat, 0) + i)
                y = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, **sampling, **extra)
            out.append(y[0, len(ids):].tolist())
        seconds = time.perf_counter() - t0
        calls, verify_s = clocks[target].take()
        draft_s = clocks[assistant].take()[1] if assistant is not None else float("nan")
        assert all(len(t) == n for t in out), "transformers stopped early; eos_token_id should be None"
        host_s = seconds - verify_s - (0.0 if assistant is None else draft_s)
        return h.Run(out, seconds, h.CallStats(steps=calls, draft_s=draft_s, sweep_s=verify_s, host_s=host_s))

    return run


# --- trees: the planned one, a chain and a k x l tree of the same size


@dataclass
class TreeChoice:
    parents: Tree
    source: str  # where the tree came from, in words
    p: list[float]  # the acceptance vector it was chosen for
    plan: Any = None


def stored_acceptance(pair: h.Pair) -> tuple[list[float], str] | None:
    """The newest acceptance measurement of this pair in the planner's store, if any."""
    from offload_runtime.api.home import store_dir
    from offload_runtime.api.plans import model_identity
    from offload_runtime.errors import UsageError
    from planner.acceptance import read_acceptance

    ids = (model_identity(pair.target), model_identity(pair.draft))
    found = []
    for f in sorted(store_dir("acceptance").glob("*.json")):
        try:
            res = read_acceptance(f)
        except UsageError:  # not an acceptance file: the store may hold others' leftovers
            continue
        if (res.target.identity, res.draft.identity) == ids:
            found.append((res.created, res, f))
    if not found:
        return None
    _, res, f = max(found, key=lambda x: x[0])
    return list(res.p), f"measured acceptance {f.name} (T={res.temperature:g}, {res.steps} steps)"


def planned_tree(pair: h.Pair, temperature: float, size: int, depth: int) -> TreeChoice:
    """The tree of the plan the engine would use at this temperature (top-p 1) when the pair has plans on this
    machine, else best_trees of `size` nodes for the stored (or the default) acceptance vector."""
    from offload_runtime.api.plans import find_plans
    from offload_runtime.spec.policy import PlannedTree, TreePolicy

    plans = find_plans(pair.target, pair.draft, "cpu", torch.float32, batch_size=1).plans
    policy = TreePolicy(Tree([-1]), [PlannedTree(p.temperature, p.top_p, Tree(p.tree), str(p.path)) for p in plans])
    chosen = policy.choose(temperature, 1.0)
    if chosen is not None:
        plan = next(p for p in plans if str(p.path) == chosen.source)
        return TreeChoice(chosen.tree, f"the plan {plan.path.name} (made for {plan.regime()}; acceptance: "
                          f"{plan.acceptance.get('source')})", list(plan.acceptance["p"]), plan)
    stored = stored_acceptance(pair)
    p, where = stored if stored else (list(DEFAULT_ACCEPTANCE), "the default acceptance vector (an assumption)")
    return TreeChoice(best_trees(p, size, depth).tree(size, depth),
                      f"no plan for this pair on this machine: best_trees({where}, n={size}, d={depth})", p)


def kxl_shape(n: int, p: Sequence[float]) -> tuple[int, int]:
    """k sequences of length l with k*l + 1 closest to n; k, l >= 2 where n allows; ties: more expected tokens."""
    low = 2 if n >= 5 else 1
    cands = [(k, l) for k in range(low, max(n, low + 1)) for l in range(low, max(n, low + 1))]
    gap = min(abs(k * l + 1 - n) for k, l in cands)
    return max((kl for kl in cands if abs(kl[0] * kl[1] + 1 - n) == gap),
               key=lambda kl: expected_tokens(k_sequences_tree(*kl), p))


def comparison_trees(choice: TreeChoice) -> dict[str, Tree]:
    n = len(choice.parents)
    trees = {"sequoia": choice.parents, f"chain {n}": chain_tree(n)}
    if n >= 3:
        k, l = kxl_shape(n, choice.p)
        trees[f"{k} x {l} sequences"] = k_sequences_tree(k, l)
    return trees


# --- sections


def bench_pair(pair: h.Pair, cfg: Settings, want: set[str], log: h.Log) -> list[Table]:
    """Baselines and trees on one pair: every method of both tables measured in one interleaved loop per T."""
    args = ModelArgs.from_file(pair.target)
    prompts = h.make_prompts(load_tokenizer(pair.target), args.vocab_size, cfg.prompts, cfg.prompt_len,
                             torch.Generator().manual_seed(0))
    choices = {T: planned_tree(pair, T, cfg.tree_size, cfg.tree_depth) for T in cfg.temperatures}
    trees = {T: comparison_trees(c) for T, c in choices.items()}
    largest = max(len(t) for ts in trees.values() for t in ts.values())
    longest = max(len(p) for p in prompts) + cfg.tokens + largest + 8
    engine = h.load_engine(pair, draft=True, max_seq_len=min(longest, args.max_position_embeddings))
    hf_target, hf_draft = load_hf(pair.target), load_hf(pair.draft)
    assisted = assisted_settings(hf_draft)
    clocks = {hf_target: ForwardClock(hf_target), hf_draft: ForwardClock(hf_draft)}
    base_rows, tree_rows = [], []
    grown: dict[float, DynamicTree] = {}
    for T in cfg.temperatures:
        log(f"[{pair.label}] temperature {T:g}: measuring")
        methods: dict[str, h.Method] = {}
        if "baselines" in want:
            methods["HF generate"] = hf_method(hf_target, clocks, None, prompts, cfg.tokens, T)
            methods["HF assisted"] = hf_method(hf_target, clocks, hf_draft, prompts, cfg.tokens, T)
        methods["ours plain"] = h.engine_method(engine, [-1], prompts, cfg.tokens, T)
        for name, tree in trees[T].items():
            if "trees" in want or name == "sequoia":
                methods[f"ours {name}"] = h.engine_method(engine, tree, prompts, cfg.tokens, T)
        if "trees" in want:
            # Grown trees with the budget of the planned static tree, keyed as the plan (or the default) keys them.
            grown[T] = replace(engine.tree_for(SamplingParams(T, 1.0), "dynamic"), size=len(choices[T].parents))
            methods["ours dynamic"] = h.engine_method(engine, grown[T], prompts, cfg.tokens, T)
        runs = h.interleaved(methods, cfg.repeats)
        s = {name: h.summarise(r) for name, r in runs.items()}
        if "baselines" in want:
            for name in ("HF generate", "HF assisted", "ours plain", "ours sequoia"):
                x = s[name]
                base_rows.append({"method": name, "T": T, "tokens_per_s": x.tokens_per_s,
                                  "vs_hf": x.tokens_per_s / s["HF generate"].tokens_per_s,
                                  "vs_assisted": x.tokens_per_s / s["HF assisted"].tokens_per_s,
                                  "tokens_per_step": x.tokens_per_step, "draft_ms": x.draft_ms,
                                  "sweep_ms": x.sweep_ms, "host_ms": x.host_ms,
                                  "same": h.same_tokens(runs[name], runs["HF generate"]) if T == 0 else None})
        if "trees" in want:
            for name, tree in [("plain", Tree([-1]))] + list(trees[T].items()) + [("dynamic", grown[T])]:
                x = s[f"ours {name}"]
                static = isinstance(tree, Tree)
                tree_rows.append({"tree": name, "T": T, "nodes": len(tree) if static else tree.size,
                                  "depth": tree.max_depth if static else tree.depth,
                                  "expected": expected_tokens(tree, choices[T].p) if static else None,
                                  "tokens_per_step": x.tokens_per_step,
                                  "tokens_per_s": x.tokens_per_s, "vs_plain": x.tokens_per_s / s["ours plain"].tokens_per_s,
                                  "draft_ms": x.draft_ms, "sweep_ms": x.sweep_ms, "host_ms": x.host_ms,
                                  "same": h.same_tokens(runs[f"ours {name}"], runs["ours plain"]) if T == 0 else None})
    for c in clocks.values():
        c.remove()
    del engine, hf_target, hf_draft, clocks
    gc.collect()
    common = [f"{pair.label}: {pair.about}; target {h.describe_model(pair.target)}; draft "
              f"{h.describe_model(pair.draft)}",
              f"{cfg.prompts} prompts x {cfg.tokens} new tokens, batch 1, median of {cfg.repeats} interleaved "
              f"repeats after a warm-up; ms/step = per target forward (HF: time inside the models' forward)"]
    sources = sorted({c.source for c in choices.values()})
    tree_note = sources[0] if len(sources) == 1 else "; ".join(f"T={T:g}: {c.source}" for T, c in choices.items())
    head = [Column("T", "T", "g")]
    tables = []
    if "baselines" in want:
        tables.append(Table(
            f"Baselines on {pair.label}: transformers vs ours",
            [Column("method", "method"), *head, Column("tokens_per_s", "tokens/s", sig),
             Column("vs_hf", "vs HF generate", times), Column("vs_assisted", "vs HF assisted", times),
             Column("tokens_per_step", "tokens/step", ".2f"), *MS, Column("same", "= HF greedy", str)], base_rows,
            common + [f"HF assisted: assistant_model=draft with its default settings ({assisted})",
                      f"sequoia tree: {tree_note}",
                      "greedy (T=0) check: ours and assisted must give exactly HF generate's tokens"]))
    if "trees" in want:
        tables.append(Table(
            f"Trees on {pair.label}: Sequoia vs chain vs k x l (same size) vs plain",
            [Column("tree", "tree"), *head, Column("nodes", "nodes"), Column("depth", "depth"),
             Column("expected", "expected tokens/step", ".2f"), Column("tokens_per_step", "tokens/step", ".2f"),
             Column("tokens_per_s", "tokens/s", sig), Column("vs_plain", "vs plain", times), *MS,
             Column("same", "= plain", str)], tree_rows,
            common + [f"planned tree: {tree_note}",
                      "dynamic: trees grown per step with the planned tree's node budget ("
                      + "; ".join(f"T={T:g}: {g.describe()}" for T, g in grown.items()) + "); nodes and depth "
                      "are its budget and depth limit",
                      "expected tokens/step: under the acceptance vector the planned tree was chosen for"]))
    return tables


def bench_streaming(pair: h.Pair, cfg: Settings, log: h.Log) -> list[Table]:
    """The same model resident and streamed (0 resident layers), plain greedy decoding: the cost of the copies."""
    from offload_runtime.weights.layout import layer_bytes

    args = ModelArgs.from_file(pair.target)
    prompts = h.make_prompts(None, args.vocab_size, cfg.prompts, cfg.prompt_len, torch.Generator().manual_seed(1))
    seq = min(cfg.prompt_len + cfg.tokens + 8, args.max_position_embeddings)
    resident = h.load_engine(pair, draft=False, max_seq_len=seq, offload=False)
    streamed = h.load_engine(pair, draft=False, max_seq_len=seq, offload=True, resident_layers=0)
    log(f"[{pair.label}] streaming: measuring")
    runs = h.interleaved({"resident": h.engine_method(resident, None, prompts, cfg.tokens, 0.0),
                          "streamed": h.engine_method(streamed, None, prompts, cfg.tokens, 0.0)}, cfg.repeats)
    base = h.summarise(runs["resident"]).tokens_per_s
    rows = []
    for name, rs in runs.items():
        x = h.summarise(rs)
        sweeps = [sw for r in rs for sw in r.stats.sweeps]
        rows.append({"target": name, "tokens_per_s": x.tokens_per_s, "vs_resident": x.tokens_per_s / base,
                     "ms_per_token": x.s_per_token * 1e3, "sweep_ms": x.sweep_ms,
                     "gbps": statistics.median(sw.gbps for sw in sweeps) if sweeps else None,
                     "copy_share": statistics.median(sw.wait_s / sw.wall_s for sw in sweeps if sw.wall_s > 0)
                     if sweeps else None, "same": h.same_tokens(rs, runs["resident"])})
    del resident, streamed
    gc.collect()
    layer_mib = layer_bytes(args, torch.float32) / 2 ** 20
    return [Table(f"Streaming on {pair.label}: resident vs streamed target (0 resident layers)",
                  [Column("target", "target"), Column("tokens_per_s", "tokens/s", sig),
                   Column("vs_resident", "vs resident", times), Column("ms_per_token", "ms/token", ".3g"),
                   Column("sweep_ms", "sweep ms", ".3g"), Column("gbps", "sweep GB/s", sig),
                   Column("copy_share", "copy share", ".0%"), Column("same", "= resident", str)], rows,
                  [f"{pair.label}: target {h.describe_model(pair.target)}; plain greedy decoding, {cfg.prompts} "
                   f"prompts x {cfg.tokens} tokens, median of {cfg.repeats} interleaved repeats",
                   f"each sweep copies {args.n_layers} layers of {layer_mib:.3g} MiB through 2 slots (on the CPU a "
                   f"memcpy); sweep GB/s and copy share (copy time / sweep time): medians over the sweeps"])]


def bench_plan(pair: h.Pair, cfg: Settings, log: h.Log) -> list[Table]:
    """Predicted tokens/step and s/token of the pair's plan against a chat-like run that follows the plan."""
    from offload_runtime.api.plans import find_plan
    from planner.acceptance import BUILTIN_PROMPTS

    plan, message = find_plan(pair.target, pair.draft, "cpu", torch.float32, batch_size=1)
    title = f"Plan check on {pair.label}: predicted vs measured"
    columns = [Column("quantity", "quantity"), Column("predicted", "predicted", sig4),
               Column("measured", "measured", sig4), Column("error", "error")]
    if plan is None:
        how = ["for the demo pair: `python -m planner plan --model demo --draft demo-draft --device cpu`, then rerun"] \
            if pair.label == "demo" else []
        return [Table(title, columns, [], [f"skipped: {message}", *how])]
    args = ModelArgs.from_file(pair.target)
    tok = load_tokenizer(pair.target)
    engine = h.load_engine(pair, draft=True, max_seq_len=min(args.max_position_embeddings, 1024),
                           plan=str(plan.path), batch_size=1)
    kind = "chat-formatted" if tok is not None else "random-id"
    if tok is not None:  # what the chat sends: the user's message under the chat template
        prompts = [engine.apply_chat_template([{"role": "user", "content": BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]}])
                   for i in range(cfg.prompts)]
    else:
        prompts = h.make_prompts(None, args.vocab_size, cfg.prompts, cfg.prompt_len, torch.Generator().manual_seed(2))
    log(f"[{pair.label}] plan check: measuring")
    # Repeats for PLAN_CHECK_S seconds at least: this machine's speed comes and goes in bursts of seconds to
    # minutes, and the median of a few back-to-back repeats would report whichever burst they fell in. Plain
    # decoding on the same engine, interleaved repeat by repeat, is the speed reference: the calibration ran it
    # too, so their ratio says how much faster or slower the machine is now than when the plan was made.
    methods = {"plan": h.engine_method(engine, plan.tree, prompts, cfg.tokens, plan.temperature, plan.top_p),
               "plain": h.engine_method(engine, [-1], prompts, cfg.tokens, plan.temperature, plan.top_p)}
    runs = h.interleaved(methods, cfg.repeats)
    t0 = time.perf_counter()
    while not cfg.small and time.perf_counter() - t0 < PLAN_CHECK_S:
        for name in methods:
            runs[name].append(methods[name](len(runs[name])))
    plan_runs = runs["plan"]
    x = h.summarise(plan_runs)
    steps = sum(r.stats.steps for r in plan_runs)
    measured = {"tokens_per_step": x.tokens_per_step, "s_per_token": x.s_per_token, "tokens_per_s": x.tokens_per_s,
                "draft_s": sum(r.stats.draft_s for r in plan_runs) / steps,
                "verify_s": sum(r.stats.sweep_s for r in plan_runs) / steps,
                "host_s": sum(r.seconds - r.stats.draft_s - r.stats.sweep_s for r in plan_runs) / steps}
    predicted = dict(plan.predicted)
    calibration = plan.figures.get("calibration")
    reference = ((calibration or {}).get("measured") or {}).get("reference_s_per_token")
    speed_note = ("no speed reference: the plan's calibration ran without one (streamed plans skip it)" if calibration
                  else "no speed reference: the plan had no calibration run (plain decoding, or --no-calibrate)")
    quantities = [("tokens_per_step", "tokens/step", 1, True), ("s_per_token", "s/token", 1, True)]
    if reference:
        measured["reference"] = h.summarise(runs["plain"]).s_per_token
        predicted["reference"] = reference
        drift = measured["reference"] / reference
        measured["s_per_token_adjusted"] = measured["s_per_token"] / drift
        predicted["s_per_token_adjusted"] = predicted["s_per_token"]
        quantities += [("reference", "plain s/token (speed reference)", 1, False),
                       ("s_per_token_adjusted", "s/token at the plan's speed", 1, True)]
        speed_note = (f"speed reference: plain decoding on the same engine, interleaved; it took {drift:.2f}x its "
                      f"time at calibration, and 's/token at the plan's speed' divides the measured s/token by that")
    rows = []
    for key, label, scale, quoted in (*quantities, ("tokens_per_s", "tokens/s", 1, False),
                                      ("draft_s", "draft ms/step", 1e3, False),
                                      ("verify_s", "verify ms/step", 1e3, False),
                                      ("host_s", "host ms/step", 1e3, False)):
        p, m = float(predicted[key]), measured[key]
        err = (m - p) / p if p else None
        mark = "" if not quoted or err is None else (f" {CHECK}" if abs(err) <= 0.15 else f" {CROSS}")
        rows.append({"key": key, "quantity": label, "predicted": p * scale, "measured": m * scale,
                     "relative_error": err, "error": None if err is None else f"{err:+.1%}{mark}"})
    del engine
    gc.collect()
    return [Table(title, columns, rows,
                  [f"plan {plan.path} ({plan.created}): {plan.n} nodes, depth {plan.depth}, T={plan.temperature:g}, "
                   f"top-p {plan.top_p:g}, acceptance {plan.acceptance.get('source')}",
                   f"measured: {cfg.prompts} {kind} prompts x {cfg.tokens} tokens at the plan's sampling "
                   f"settings, median s/token of {len(plan_runs)} repeats; {CHECK} = within 15% (the planner's target)",
                   speed_note,
                   "error = (measured - predicted) / predicted; host = the rest of the wall time: verification walk, "
                   "cache compaction, bookkeeping, between steps; ms/step rows: means over all repeats"])]


def bench_batch(pair: h.Pair, cfg: Settings, sizes: Sequence[int], log: h.Log) -> list[Table]:
    """Total tokens/s and sweeps per generated token for several batch sizes, streamed, plain greedy decoding."""
    args = ModelArgs.from_file(pair.target)
    seq = min(cfg.prompt_len + cfg.tokens + 8, args.max_position_embeddings)
    methods = {}
    for B in sizes:
        prompts = h.make_prompts(None, args.vocab_size, 2 * B, cfg.prompt_len, torch.Generator().manual_seed(3))
        engine = h.load_engine(pair, draft=False, max_seq_len=seq, offload=True, resident_layers=0, batch_size=B)
        methods[B] = h.engine_method(engine, None, prompts, cfg.tokens, 0.0)
    log(f"[{pair.label}] batch sizes {', '.join(map(str, sizes))}: measuring")
    runs = h.interleaved(methods, cfg.repeats)
    base = h.summarise(runs[sizes[0]]).tokens_per_s
    rows = []
    for B in sizes:
        x = h.summarise(runs[B])
        rows.append({"B": B, "prompts": 2 * B, "tokens_per_s": x.tokens_per_s, "vs_1": x.tokens_per_s / base,
                     "sweeps_per_token": sum(len(r.stats.sweeps) for r in runs[B]) / sum(r.n_tokens for r in runs[B]),
                     "sweep_ms": x.sweep_ms})
    del methods
    gc.collect()
    return [Table(f"Batching on {pair.label}: streamed target, B sequences per sweep",
                  [Column("B", "B"), Column("prompts", "prompts"), Column("tokens_per_s", "total tokens/s", sig),
                   Column("vs_1", "vs B=1", times), Column("sweeps_per_token", "sweeps/token", ".3f"),
                   Column("sweep_ms", "sweep ms", ".3g")], rows,
                  [f"{pair.label}: target {h.describe_model(pair.target)}, 0 resident layers; plain greedy decoding; "
                   f"2B prompts of {cfg.prompt_len} tokens x {cfg.tokens} new tokens each; median of {cfg.repeats} "
                   f"interleaved repeats",
                   "sweeps/token = streamed sweeps of the run (its CallStats) / tokens generated (prefill included)"])]


def make_quick_plan(pair: h.Pair, threads: int) -> None:
    """A quick plan for a small pair, so the plan section runs end to end. A high given acceptance makes the
    plan a tree, so its calibration (with the speed reference) runs too."""
    from planner.pipeline import PlanRequest, make_plan

    make_plan(PlanRequest(model=str(pair.target), draft=str(pair.draft), device="cpu", dtype="float32",
                          temperature=0.0, quick=True, grid="1,2,4,8,16,32", prefix=16, max_tree=32, max_depth=6,
                          acceptance="0.97", threads=threads))


# --- the command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python tools/bench_cpu.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", type=h.csv(str), default=list(SECTIONS),
                   help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})")
    p.add_argument("--small", action="store_true", help="tiny random models and few tokens (< 60 s; the tests)")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--output", type=h.output_file, default=h.BENCHMARKS_MD, help="the Markdown file to append to")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per prompt (default 64; --small: 8)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per run (default 3; --small: 2)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per method (default 3; --small: 1)")
    p.add_argument("--temperatures", type=h.csv(float), default=[0.0, 0.6], help="temperatures (default 0,0.6)")
    p.add_argument("--tree-size", type=int, default=16, help="tree size when no plan exists (default 16)")
    p.add_argument("--tree-depth", type=int, default=6, help="tree depth limit when no plan exists (default 6)")
    p.add_argument("--batch-sizes", type=h.csv(int), default=None,
                   help="comma-separated batch sizes (default 1,2,4,8,16; --small: 1,2,4)")
    p.add_argument("--workdir", type=h.work_dir, default=None,
                   help="keep the built random checkpoints here (reused next time); default: a temporary directory")
    a = p.parse_args(argv)
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad or not a.sections:
        p.error(f"unknown section(s) {', '.join(bad) or '(none)'}; choose from {', '.join(SECTIONS)}")
    h.check_positive(p, a, ("threads", "tokens", "prompts", "repeats", "tree_size"))
    if any(t < 0 for t in a.temperatures) or (a.batch_sizes and any(b < 1 for b in a.batch_sizes)):
        p.error("temperatures must be >= 0 and batch sizes >= 1")
    return a


def run(argv: Sequence[str]) -> Report:
    """Measure the chosen sections; the tables hold the numbers (main prints and appends them)."""
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    log = h.Log()
    cfg = Settings(small=a.small, tokens=a.tokens or (8 if a.small else 64), prompts=a.prompts or (2 if a.small else 3),
                   repeats=a.repeats or (1 if a.small else 3), temperatures=a.temperatures, tree_size=a.tree_size,
                   tree_depth=a.tree_depth, prompt_len=8 if a.small else 32)
    sizes = a.batch_sizes or ([1, 2, 4] if a.small else [1, 2, 4, 8, 16])
    with contextlib.ExitStack() as stack:
        workdir = a.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-cpu-")))
        workdir.mkdir(parents=True, exist_ok=True)
        if a.small:  # the temporary models' plans live in a temporary runtime home, never in the user's
            stack.enter_context(mock.patch.dict(os.environ, {"OFFLOAD_RUNTIME_HOME": str(workdir / "planner-home")}))
        log("building models")
        if a.small:
            pairs = [h.small_pair(workdir)]
        else:
            demo = h.demo_pair()
            about = "the random Llama config of ModelArgs preset bench-100m, float32; draft = its first 2 layers, noised"
            pairs = [demo] if demo is not None else []
            pairs.append(h.random_pair(workdir, ModelArgs.from_name("bench-100m"), "bench-100m", about + (
                "" if demo else " (stands in for the demo pair, which is not built yet)")))
        tables: list[Table] = []
        want = set(a.sections)
        if want & {"baselines", "trees"}:
            for pair in pairs:
                tables += bench_pair(pair, cfg, want, log)
        random_pair = pairs[-1]  # the ~100M random config (tiny in --small)
        if "streaming" in want:
            tables += bench_streaming(random_pair, cfg, log)
        if "plan" in want:
            if a.small:  # after the trees, which then use best_trees' 16 nodes rather than the tiny pair's plan
                log("making a quick plan for the small pair")
                make_quick_plan(pairs[0], a.threads)
            tables += bench_plan(pairs[0], cfg, log)
        if "batch" in want:
            tables += bench_batch(random_pair, cfg, sizes, log)
    log("done")
    return Report(tables, h.machine_description(a.threads), shlex.join(["python", "tools/bench_cpu.py", *argv]))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = run(argv)
    for t in out.tables:
        print(report.to_text(t), end="\n\n")
    print(f"machine: {out.machine}\ncommand: {out.command}")
    a = parse_args(argv)
    if not a.no_write:
        report.append(a.output, report.section(
            "CPU benchmarks", machine=out.machine, command=f"`{out.command}`", blocks=out.tables,
            intro=["ratios (vs ...) are the figures to quote; absolute CPU times are noise"]))
        print(f"appended to {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
