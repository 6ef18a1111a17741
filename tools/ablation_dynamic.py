#!/usr/bin/env python3
"""Dynamic trees against Sequoia's static DP tree and k independent sequences, on the demo pair:

    python tools/ablation_dynamic.py [--sizes 4,8,...,512] [--temperatures 0,0.6] [--prompts 24] [--no-write]

A standalone script until tools/ moves onto the shared harness (tools/harness.py); it reuses tools/ablations.py's
estimates and is meant to become a section of it.

For each temperature (top-p 1): the acceptance vector p and its table by the draft's confidence are measured
with planner.acceptance (a star tree of --width children, seeds disjoint from the runs below). Then for each size
n, on the same prompts and seeds (planner.calibrate.measure_trees, --tokens tokens per prompt, no step cut short):
  - dynamic: DynamicTree(n, --depth) keyed by that confidence table (spec/growth.py);
  - DP:      best_trees(p, max size, --depth).tree(n, --depth), Sequoia's static tree;
  - k seq:   the k x l independent sequences the DP's objective rates best (ablations.best_k_sequences);
  - plain:   no tree, the speed baseline of the same call.
Tokens per step are pooled over sequences, +- one per-sequence standard error; dynamic vs DP is paired over the
same prompts and seeds. tokens/s is the CPU's, for the whole batch, as a ratio to plain decoding in the same call.
Unless --no-write, a dated section goes to BENCHMARKS.md and a plot to ablation_dynamic.png; --json keeps the data.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS.parent))

from ablations import (  # noqa: E402  (sets the offline environment before torch loads)
    PLUS_MINUS, _save, append_markdown, best_k_sequences, load_pyplot, ratio_estimate, relative_gain,
)
from bench_cpu import BENCHMARKS_MD, Table, format_markdown  # noqa: E402

import torch  # noqa: E402

ACCEPTANCE_SEED = 100_000  # acceptance runs draw from seeds disjoint from the runs they calibrate
PNG = "ablation_dynamic.png"
FAMILIES = ("dynamic", "dp", "kseq")
STYLE = {"dynamic": ("dynamic (grown per step)", "C3"), "dp": ("DP tree (Sequoia)", "C0"),
         "kseq": ("best k independent sequences", "C1")}


@dataclass
class Row:
    n: int
    prompts: int
    labels: dict[str, str]
    measured: dict[str, dict]  # family (and "plain") -> planner.calibrate.measure_trees row

    def estimate(self, family: str) -> tuple[float, float]:
        return ratio_estimate([tuple(s) for s in self.measured[family]["seqs"]])

    def gain(self) -> tuple[float, float]:
        """dynamic / DP - 1, paired over the prompts."""
        seqs = lambda f: [tuple(s) for s in self.measured[f]["seqs"]]  # noqa: E731
        return relative_gain(seqs("dynamic"), seqs("dp"))

    def tokens_per_s(self, family: str) -> float:
        m = self.measured[family]
        return m["tokens"] / m["wall_s"]


@dataclass
class Results:
    pair: str
    depth: int
    tokens: int
    batch: int
    acceptance: dict[float, dict] = field(default_factory=dict)  # temperature -> p, steps, confidence table
    rows: dict[float, list[Row]] = field(default_factory=dict)


def prompts_for(n: int, full: int, minimum: int) -> int:
    """All prompts up to 64 nodes, then fewer (never under `minimum`): big trees cost CPU time."""
    return full if n <= 64 else max(minimum, full * 64 // n)


def run(target: Path, draft: Path, *, sizes: Sequence[int], temperatures: Sequence[float], prompts: int,
        min_prompts: int, tokens: int, depth: int, width: int, batch: int, seed: int = 0,
        log: Callable[[str], None] = print) -> Results:
    """Every measurement of the section; returned as data (the tests call it on a tiny pair)."""
    from offload_runtime.model.tree import Tree
    from offload_runtime.spec.growth import ConfidenceAcceptance, DynamicTree
    from offload_runtime.spec.tree_search import best_trees, k_sequences_tree
    from planner.acceptance import BUILTIN_PROMPTS, measure_acceptance
    from planner.calibrate import measure_trees
    from planner.models import resolve_model

    refs = resolve_model(str(target))[0], resolve_model(str(draft))[0]
    res = Results(str(target), depth, tokens, batch)
    for t in temperatures:
        a = measure_acceptance(*refs, device="cpu", dtype="float32", temperature=t, top_p=1.0, width=width,
                               prompts=list(BUILTIN_PROMPTS[:prompts]), max_new_tokens=tokens, seed=ACCEPTANCE_SEED,
                               batch_size=batch)
        conf = ConfidenceAcceptance.from_dict(a.confidence)
        res.acceptance[t] = {"p": a.p, "steps": a.steps, "confidence": a.confidence}
        log(f"T={t:g}: p[1..4] = {', '.join(f'{x:.3f}' for x in a.p[:4])} ({a.steps} steps); by confidence, p[1] "
            f"from {conf.table[0][0]:.2f} to {conf.table[-1][0]:.2f}")
        table = best_trees(a.p, max(sizes), depth)
        rows = []
        for n in sizes:
            k, l = best_k_sequences(n, a.p)
            trees = {"dynamic": DynamicTree(n, depth, acceptance=conf), "dp": table.tree(n, depth),
                     "kseq": k_sequences_tree(k, l), "plain": Tree([-1])}
            labels = {"dp": f"{len(trees['dp'])} nodes, depth {trees['dp'].max_depth}", "kseq": f"{k} x {l}"}
            order, specs, seen = {}, [], {}
            for f, tr in trees.items():  # identical static trees are measured once
                key = tuple(tr) if isinstance(tr, Tree) else f
                if key not in seen:
                    seen[key] = len(specs)
                    specs.append(tr)
                order[f] = seen[key]
            count = prompts_for(n, prompts, min_prompts)
            t0 = time.perf_counter()
            measured = measure_trees(str(target), str(draft), specs, device=torch.device("cpu"), dtype=torch.float32,
                                     temperature=t, top_p=1.0, batch=batch, prompts=count, tokens=tokens, seed=seed)
            row = Row(n, count, labels, {f: measured[i] for f, i in order.items()})
            rows.append(row)
            g, se = row.gain()
            log(f"T={t:g} n={n}: " + ", ".join(f"{f} {fmt(row.estimate(f))}" for f in FAMILIES) +
                f"; dynamic vs DP {g * 100:+.1f}% {PLUS_MINUS} {se * 100:.1f} ({count} prompts, "
                f"{time.perf_counter() - t0:.0f} s)")
        res.rows[t] = rows
    return res


KEYS = ("confidence", "draft", "positional")


@dataclass
class KeyRow:
    temperature: float
    n: int
    measured: dict[str, dict]  # key name -> measure_trees row

    def estimate(self, key: str) -> tuple[float, float]:
        return ratio_estimate([tuple(s) for s in self.measured[key]["seqs"]])

    def gain(self, key: str) -> tuple[float, float]:
        """key / positional - 1, paired (positional keys grow Sequoia's static best-first tree)."""
        seqs = lambda f: [tuple(s) for s in self.measured[f]["seqs"]]  # noqa: E731
        return relative_gain(seqs(key), seqs("positional"))


def compare_keys(target: Path, draft: Path, res: Results, *, sizes: Sequence[int], prompts: int,
                 seed: int = 0, log: Callable[[str], None] = print) -> list[KeyRow]:
    """Dynamic trees keyed three ways, on the acceptance already measured in `res`: by the confidence table, by the
    draft's own probabilities (EAGLE-2's score), and by the positional vector (which grows Sequoia's tree)."""
    from offload_runtime.spec.growth import (
        ConfidenceAcceptance, DraftProbabilities, DynamicTree, PositionalAcceptance,
    )
    from planner.calibrate import measure_trees

    out = []
    for t, a in res.acceptance.items():
        models = {"confidence": ConfidenceAcceptance.from_dict(a["confidence"]), "draft": DraftProbabilities(),
                  "positional": PositionalAcceptance(tuple(a["p"]))}
        for n in sizes:
            specs = [DynamicTree(n, res.depth, acceptance=m) for m in models.values()]
            measured = measure_trees(str(target), str(draft), specs, device=torch.device("cpu"), dtype=torch.float32,
                                     temperature=t, top_p=1.0, batch=res.batch, prompts=prompts, tokens=res.tokens,
                                     seed=seed)
            row = KeyRow(t, n, dict(zip(models, measured)))
            out.append(row)
            log(f"keys T={t:g} n={n}: " + ", ".join(f"{k} {fmt(row.estimate(k))}" for k in KEYS))
    return out


def keys_table(rows: Sequence[KeyRow], res: Results) -> Table:
    body = [[regime(r.temperature), str(r.n)] + [fmt(r.estimate(k)) for k in KEYS] +
            [f"{g * 100:+.1f}% {PLUS_MINUS} {se * 100:.1f}" for g, se in (r.gain(k) for k in KEYS[:2])]
            for r in rows]
    return Table("Which key: dynamic trees keyed three ways on the demo pair",
                 ["setting", "n", "confidence table", "draft probabilities", "positional (= Sequoia)",
                  "confidence vs positional", "draft vs positional"], body,
                 [f"tokens per step, depth <= {res.depth}, {res.tokens} tokens per prompt, the same prompts and seeds for "
                  f"the three keys; a_u(r) = p[r | the draft's top probability at u] (8 bins), the draft's r-th largest "
                  f"probability, or p[r] whatever u (growth is then Sequoia's best-first search)"])


def fmt(est: tuple[float, float]) -> str:
    mean, se = est
    return f"{mean:.3f}" + ("" if math.isnan(se) else f" {PLUS_MINUS} {se:.3f}")


def regime(t: float) -> str:
    return "greedy (T = 0)" if t == 0 else f"T = {t:g}, top-p 1"


def tables(res: Results) -> list[Table]:
    out = []
    for t, rows in res.rows.items():
        body = []
        for r in rows:
            g, se = r.gain()
            plain = r.tokens_per_s("plain")
            body.append([str(r.n)] + [fmt(r.estimate(f)) for f in FAMILIES] +
                        [f"{g * 100:+.1f}% {PLUS_MINUS} {se * 100:.1f}", r.labels["dp"], r.labels["kseq"],
                         f"{r.measured['dynamic']['nodes']:.0f}",
                         f"{r.measured['dynamic']['draft_nodes']:.0f} / {r.measured['dp']['draft_nodes']:.0f}"] +
                        [f"{r.tokens_per_s(f) / plain:.2f}x" for f in FAMILIES] + [str(r.prompts)])
        out.append(Table(
            f"Dynamic vs static trees on the demo pair, {regime(t)}",
            ["n", "dynamic", "DP", "k seq", "dynamic vs DP", "DP tree", "k x l", "dyn. nodes", "draft nodes dyn / DP",
             "tokens/s dyn.", "tokens/s DP", "tokens/s k seq", "prompts"], body,
            [f"tokens per step (pooled, {PLUS_MINUS} one per-sequence standard error), {res.tokens} tokens per prompt, "
             f"batch {res.batch}; dynamic vs DP paired over the same prompts and seeds",
             f"dynamic: up to n nodes, depth <= {res.depth}, keyed by the acceptance vector by draft confidence "
             f"(8 bins) measured at this temperature; DP: best_trees(p, {max(r.n for r in rows)}, {res.depth}); "
             f"dyn. nodes: mean size of the verified grown trees; draft nodes: nodes run through the draft per step",
             "tokens/s: the CPU's, whole batch, as a ratio to plain decoding (no draft) in the same call"]))
    return out


def claims(res: Results) -> list[str]:
    """Where dynamic wins and where it does not, by two standard errors of the paired gain."""
    out = []
    for t, rows in res.rows.items():
        gains = [(r.n, *r.gain()) for r in rows]
        wins = [f"{n} ({g * 100:+.0f}%)" for n, g, se in gains if g > 2 * se]
        losses = [f"{n} ({g * 100:+.0f}%)" for n, g, se in gains if g < -2 * se]
        even = [str(n) for n, g, se in gains if abs(g) <= 2 * se]
        big = [g for n, g, _ in gains if n >= 64]
        goal = (f" At n >= 64 dynamic gives {min(big) * 100:+.0f}% to {max(big) * 100:+.0f}% tokens per step over DP "
                f"(goal: +20%).") if big else ""
        speed = [f"{r.n}: {r.tokens_per_s('dynamic') / r.tokens_per_s('dp'):.2f}x" for r in rows]
        out.append(f"{regime(t)}: dynamic ahead (by > 2 s.e.) at n = {', '.join(wins) or 'none'}; behind at "
                   f"{', '.join(losses) or 'none'}; within noise at {', '.join(even) or 'none'}.{goal} CPU tokens/s "
                   f"dynamic / DP: {', '.join(speed)}.")
    return out


def plot(res: Results, path: Path) -> str | None:
    plt = load_pyplot()
    if plt is None:
        return "plot skipped: matplotlib is not installed (pip install 'offload-runtime[plot]')"
    temps = list(res.rows)
    fig, axes = plt.subplots(1, len(temps), figsize=(5.2 * len(temps), 4.2), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], temps):
        rows = res.rows[t]
        for f, (label, color) in STYLE.items():
            est = [r.estimate(f) for r in rows]
            ax.errorbar([r.n for r in rows], [m for m, _ in est], yerr=[0 if math.isnan(s) else s for _, s in est],
                        marker="o", ms=4, lw=1.6, capsize=3, color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tree size n (nodes)")
        ax.set_title(regime(t), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("tokens per step")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Dynamic vs static trees: demo pair (error bars: 1 s.e.)", fontsize=10)
    _save(plt, fig, path)
    return None


def machine_line(threads: int) -> str:
    import transformers

    from offload_runtime.api.machine import describe_machine, machine_fingerprint

    return (f"{describe_machine(machine_fingerprint('cpu'))}, {threads} torch thread(s); torch {torch.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}")


def section(res: Results, command: str, minutes: float, threads: int, image: str | None,
            keys: Sequence[KeyRow] = ()) -> str:
    acc_rows = [[regime(t), str(a["steps"])] + [f"{x:.3f}" for x in a["p"][:4]] +
                [f"{a['confidence']['table'][0][0]:.2f} - {a['confidence']['table'][-1][0]:.2f}"]
                for t, a in res.acceptance.items()]
    acc = Table("Acceptance on demo, and by the draft's confidence",
                ["setting", "steps", "p[1]", "p[2]", "p[3]", "p[4]", "p[1] lowest - highest confidence bin"], acc_rows,
                ["star tree of children drawn without replacement at the root; confidence = the draft's top "
                 "probability at the root, 8 quantile bins (planner/acceptance.py)"])
    parts = [f"## Dynamic trees against Sequoia's DP tree on the demo pair, {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"Machine: {machine_line(threads)}", "", f"Command: `{command}` ({minutes:.1f} min)", "",
             "", format_markdown(acc)]
    if keys:
        parts += ["", format_markdown(keys_table(keys, res))]
    for tb in tables(res):
        parts += ["", format_markdown(tb)]
    if image:
        parts += ["", f"![dynamic vs static trees]({image})"]
    parts += ["", "**Where dynamic wins and where it does not.**", ""] + [f"- {c}" for c in claims(res)]
    return "\n".join(parts) + "\n"


def load(path: Path) -> tuple[Results, list[KeyRow]]:
    """A run saved with --json."""
    data = json.loads(Path(path).read_text())
    res = Results(data["pair"], data["depth"], data["tokens"], data["batch"],
                  {float(t): a for t, a in data["acceptance"].items()},
                  {float(t): [Row(**r) for r in rows] for t, rows in data["rows"].items()})
    return res, [KeyRow(**k) for k in data.get("keys", [])]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=_ints, default=[4, 8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--temperatures", type=_floats, default=[0.0, 0.6])
    p.add_argument("--prompts", type=int, default=24, help="prompts per size up to 64 nodes")
    p.add_argument("--min-prompts", type=int, default=8, help="fewest prompts for the largest sizes")
    p.add_argument("--tokens", type=int, default=64, help="tokens per prompt")
    p.add_argument("--depth", type=int, default=16, help="depth limit of both dynamic and DP trees")
    p.add_argument("--width", type=int, default=32, help="children of the star tree measuring acceptance")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--key-sizes", type=lambda t: _ints(t) if t else [], default=[16, 64], help="sizes at which the three keys are compared "
                   "(empty: skip)")
    p.add_argument("--png", default=PNG, help=f"plot file next to BENCHMARKS.md (default {PNG})")
    p.add_argument("--json", default=None, help="also write every measurement here")
    p.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md or the plot")
    p.add_argument("--from-json", default=None, help="report a run saved with --json instead of measuring")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from offload_runtime.api.registry import demo_paths

    target, draft = demo_paths()
    t0 = time.perf_counter()
    if a.from_json:
        res, keys = load(Path(a.from_json))
    else:
        res = run(target, draft, sizes=a.sizes, temperatures=a.temperatures, prompts=a.prompts,
                  min_prompts=a.min_prompts, tokens=a.tokens, depth=a.depth, width=a.width, batch=a.batch,
                  log=lambda s: print(s, flush=True))
        keys = compare_keys(target, draft, res, sizes=a.key_sizes, prompts=a.prompts,
                            log=lambda s: print(s, flush=True))
    minutes = (time.perf_counter() - t0) / 60
    command = ("python tools/ablation_dynamic.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))).strip()
    if a.from_json:  # the section names the command that measured, and how long it took
        saved = json.loads(Path(a.from_json).read_text())
        command, minutes = saved.get("command", command), saved.get("minutes", minutes)
    elif a.json:
        Path(a.json).write_text(json.dumps({**asdict(res), "keys": [asdict(k) for k in keys], "command": command,
                                            "minutes": minutes}, indent=1))
    if keys:
        print(format_markdown(keys_table(keys, res)))
    for tb in tables(res):
        print(format_markdown(tb))
    for c in claims(res):
        print(c)
    if not a.no_write:
        note = plot(res, BENCHMARKS_MD.parent / a.png)
        if note:
            print(note)
        append_markdown(BENCHMARKS_MD, section(res, command, minutes, a.threads, None if note else a.png, keys))
        print(f"section appended to {BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
