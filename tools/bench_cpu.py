#!/usr/bin/env python3
"""CPU benchmarks against the baselines, in one process: python tools/bench_cpu.py [--small] [--no-write]

Sections (--sections, default all):
  baselines  transformers' greedy `generate` (target alone) and assisted generation (`assistant_model=draft`)
             against our plain decoding and our Sequoia decoding with the planned tree, on the demo pair and on
             the ~100M-parameter random Llama config (bench-100m) with a truncated-copy draft
  trees      the planned tree against a chain and a k x l tree of the same size, and plain decoding
  streaming  the same model resident vs streamed through the slots (0 resident layers): the cost of the copies
  plan       the plan's predicted tokens/step and s/token against a chat-like run that follows the plan, for
             45 s with plain decoding interleaved as the machine-speed reference the calibration also recorded
  batch      total tokens/s and sweeps per generated token for batch sizes 1, 2, 4, 8, 16, streamed

Every section prints an aligned table; unless --no-write, the tables are appended to BENCHMARKS.md under a
dated heading with the machine and the command. Ratios are the figures to quote: absolute CPU times are noise.

Fairness: both sides get the same prompt token ids, the same number of new tokens (end-of-sequence ignored;
transformers with `eos_token_id = None`), float32 weights read from the same checkpoint, the same torch threads;
transformers runs with `attn_implementation="sdpa"` and samples with `top_k=0, top_p=1` like ours. Every method
is warmed up, then the repeats run interleaved (A B C, B C A, ...) and the median tokens/s is reported.

--small builds tiny random models in a temporary directory and runs a few tokens (the test suite runs it).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
SECTIONS = ("baselines", "trees", "streaming", "plan", "batch")
PLAN_CHECK_S = 45.0  # the plan check measures for this long at least (not in --small)
BENCHMARKS_HEADER = """# Benchmarks

Sections are appended by the benchmark scripts in `tools/` (newest last); every figure below comes from a
script's own output, with the machine and the command that produced it. On the CPU, ratios against a baseline
run in the same process are the figures to quote: absolute CPU times are noise.
"""
CHECK, CROSS = "\u2713", "\u2717"


# --- tables: aligned text for the terminal, Markdown for BENCHMARKS.md


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def format_text(table: Table) -> str:
    cells = [table.headers] + table.rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(table.headers))]
    # First column (a label) left-aligned, figures right-aligned.
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = [f"== {table.title}", *lines]
    out += [f"   {n}" for n in table.notes]
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def format_markdown(table: Table) -> str:
    lines = [f"### {table.title}", "",
             "| " + " | ".join(_md_cell(h) for h in table.headers) + " |",
             "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(table.headers))) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in table.rows]
    if table.notes:
        lines.append("")
        lines += [f"- {n}" for n in table.notes]
    return "\n".join(lines)


def append_report(path: Path, tables: Sequence[Table], *, machine: str, command: str, intro: Sequence[str] = (),
                  date: str | None = None) -> None:
    """Append a `## CPU benchmarks, <date>` section; the file is created with a short header if missing."""
    date = date or time.strftime("%Y-%m-%d %H:%M")
    parts = [f"## CPU benchmarks, {date}", "", f"Machine: {machine}", "", f"Command: `{command}`"]
    if intro:
        parts += [""] + [f"- {line}" for line in intro]
    for t in tables:
        parts += ["", format_markdown(t)]
    text = path.read_text() if path.is_file() else BENCHMARKS_HEADER
    if not text.endswith("\n"):
        text += "\n"
    path.write_text(text + "\n" + "\n".join(parts) + "\n")


def machine_description(threads: int) -> str:
    import transformers

    from planner.hardware import machine_fingerprint

    fp = machine_fingerprint("cpu")
    return (f"{fp['cpu_model']}, {threads} torch thread(s) used of {fp['cpu_count']} logical CPUs, "
            f"{fp['ram_total_gib']} GiB RAM; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {platform.python_version()}")


def _f(x: float | None, digits: int = 3) -> str:
    """`digits` significant digits, never in e-notation for large figures."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"


def _ratio(x: float, base: float | None) -> str:
    return "-" if not base or math.isnan(x) else f"{x / base:.2f}x"


def _ms(seconds: float, steps: int) -> str:
    return "-" if math.isnan(seconds) or not steps else f"{seconds / steps * 1e3:.3g}"


# --- models


@dataclass(frozen=True)
class Pair:
    label: str
    target: Path
    draft: Path
    about: str  # one line: what the models are


def hf_llama_config(args: Any, n_layers: int | None = None):
    """A transformers LlamaConfig with the shapes of a ModelArgs."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.intermediate_size,
                       num_hidden_layers=n_layers or args.n_layers, num_attention_heads=args.n_heads,
                       num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                       max_position_embeddings=args.max_position_embeddings, rms_norm_eps=args.rms_norm_eps,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def save_random_llama(path: Path, args: Any, seed: int) -> Path:
    """A random float32 LlamaForCausalLM of these shapes, saved with save_pretrained (both sides load these)."""
    from transformers import LlamaForCausalLM

    # transformers initialises from the global RNG: fork it so the seed stays local to this call.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_llama_config(args)).to(torch.float32)
    model.save_pretrained(path)
    del model
    return path


def cut_draft(target: Path, path: Path, n_layers: int, noise: float, generator: torch.Generator) -> Path:
    """The target's embeddings, first `n_layers` layers, norm and head, each tensor noised by `noise` x its std."""
    from safetensors.torch import load_file, save_file

    from offload_runtime.config import ModelArgs

    args = ModelArgs.from_file(target)
    assert 1 <= n_layers <= args.n_layers, (n_layers, args.n_layers)
    weights = load_file(target / "model.safetensors")
    keep = {f"model.layers.{i}." for i in range(n_layers)}
    kept = {}
    for name, w in weights.items():
        if name.startswith("model.layers.") and not any(name.startswith(k) for k in keep):
            continue
        kept[name] = w + noise * w.std() * torch.randn(w.shape, generator=generator) if w.numel() > 1 else w
    path.mkdir(parents=True, exist_ok=True)
    hf_llama_config(args, n_layers).save_pretrained(path)
    save_file(kept, path / "model.safetensors", metadata={"format": "pt"})
    return path


def build_random_pair(root: Path, args: Any, label: str, about: str, draft_layers: int = 2,
                      noise: float = 0.05, seed: int = 0) -> Pair:
    """A random target of `args` and a draft cut from it (its first layers, noised slightly)."""
    target = root / f"{label}-target"
    draft = root / f"{label}-draft"
    if not (target / "model.safetensors").is_file():
        save_random_llama(target, args, seed)
    if not (draft / "model.safetensors").is_file():
        cut_draft(target, draft, draft_layers, noise, torch.Generator().manual_seed(seed + 1))
    return Pair(label, target, draft, about)


def demo_pair() -> Pair | None:
    from offload_runtime.registry import demo_paths

    target, draft = demo_paths()
    if not (target / "model.safetensors").is_file() or not (draft / "model.safetensors").is_file():
        return None
    return Pair("demo", target, draft, "the bundled demo pair (offload_runtime/demo)")


def describe_model(path: Path) -> str:
    from offload_runtime.config import ModelArgs

    a = ModelArgs.from_file(path)
    return f"{a.n_params() / 1e6:.3g}M params, {a.n_layers} layers, dim {a.dim}, vocab {a.vocab_size}"


SMALL_ARGS = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=512,
                  max_position_embeddings=512)


def choose_pairs(small: bool, workdir: Path) -> list[Pair]:
    """The demo pair when it exists, and the ~100M random pair (which stands in for the demo until then)."""
    from offload_runtime.config import ModelArgs

    if small:
        return [build_random_pair(workdir, ModelArgs(**SMALL_ARGS), "small",
                                  "tiny random Llama (--small), draft = its first 2 layers, noised")]
    pairs = []
    demo = demo_pair()
    if demo is not None:
        pairs.append(demo)
    about = "the random Llama config of ModelArgs preset bench-100m, float32; draft = its first 2 layers, noised"
    if demo is None:
        about += " (stands in for the demo pair, which is not built yet)"
    pairs.append(build_random_pair(workdir, ModelArgs.from_name("bench-100m"), "bench-100m", about))
    return pairs


# --- prompts


def make_prompts(tokenizer, vocab_size: int, count: int, length: int, generator: torch.Generator) -> list[list[int]]:
    """Token ids: the planner's built-in prompts through the tokenizer, or random ids when there is none."""
    from planner.acceptance import BUILTIN_PROMPTS

    if tokenizer is not None:
        return [list(tokenizer(BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]).input_ids) for i in range(count)]
    low = min(3, vocab_size - 1)  # keep clear of pad/bos/eos
    return [torch.randint(low, vocab_size, (length,), generator=generator).tolist() for _ in range(count)]


# --- one timed run and the interleaving protocol


@dataclass
class Run:
    tokens: list[list[int]]  # the new tokens, per prompt
    seconds: float
    steps: int  # target forwards (sweeps)
    draft_s: float = math.nan
    verify_s: float = math.nan
    other_s: float = math.nan
    sweeps: list[Any] = field(default_factory=list)  # streamed engines: SweepStats of this run

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else math.nan


Method = Callable[[int], Run]  # argument: the repeat index; -1 is the warm-up (one prompt, few tokens)


def interleaved(methods: dict[str, Method], repeats: int) -> dict[str, list[Run]]:
    """Warm every method up, then run the repeats interleaved, rotating the order each time (A B C, B C A, ...)."""
    for m in methods.values():
        m(-1)
    names = list(methods)
    runs: dict[str, list[Run]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            runs[name].append(methods[name](r))
    return runs


@dataclass
class Summary:
    tokens_per_s: float  # median over repeats
    tokens_per_step: float
    draft_ms: str
    verify_ms: str
    other_ms: str
    seconds_per_token: float


def summarise(runs: Sequence[Run]) -> Summary:
    steps = sum(r.steps for r in runs)
    tokens = sum(r.n_tokens for r in runs)
    tps = statistics.median(r.tokens_per_s for r in runs)
    return Summary(tps, tokens / steps if steps else math.nan, _ms(sum(r.draft_s for r in runs), steps),
                   _ms(sum(r.verify_s for r in runs), steps), _ms(sum(r.other_s for r in runs), steps),
                   1.0 / tps if tps > 0 else math.nan)


def greedy_check(runs: Sequence[Run], reference: Sequence[Run]) -> str:
    """A check mark when every prompt of every run gave the reference's tokens, else how many differed."""
    ref = reference[0].tokens
    bad = sum(t != u for r in runs for t, u in zip(r.tokens, ref))
    total = sum(len(r.tokens) for r in runs)
    return CHECK if bad == 0 else f"{CROSS} {bad}/{total} differ"


# --- transformers' side


class ForwardClock:
    """Counts a module's forward calls and the seconds spent inside them (pre/post forward hooks)."""

    def __init__(self, module: torch.nn.Module):
        self.calls, self.seconds, self._t0 = 0, 0.0, 0.0
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_: Any) -> None:
        self._t0 = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def take(self) -> tuple[int, float]:
        out = (self.calls, self.seconds)
        self.calls, self.seconds = 0, 0.0
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


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
    gc_ = draft.generation_config
    defaults = gc_._get_default_generation_params() if hasattr(gc_, "_get_default_generation_params") else {}
    names = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
    values = {n: getattr(gc_, n, None) if getattr(gc_, n, None) is not None else defaults.get(n) for n in names}
    return ", ".join(f"{k}={v}" for k, v in values.items())


def hf_method(target, clocks: dict[Any, ForwardClock], assistant, prompts: list[list[int]], tokens: int,
              temperature: float) -> Method:
    """transformers' generate, alone or with `assistant_model`; `clocks` holds a ForwardClock per model."""
    models = [target] + ([assistant] if assistant is not None else [])

    def run(repeat: int) -> Run:
        todo = prompts[:1] if repeat < 0 else prompts
        n = min(tokens, 8) if repeat < 0 else tokens
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
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1000 * max(repeat, 0) + i)
                with torch.inference_mode():
                    y = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, **sampling, **extra)
            out.append(y[0, len(ids):].tolist())
        seconds = time.perf_counter() - t0
        calls, verify_s = clocks[target].take()
        draft_s = clocks[assistant].take()[1] if assistant is not None else math.nan
        assert all(len(t) == n for t in out), "transformers stopped early; eos_token_id should be None"
        other = seconds - verify_s - (0.0 if assistant is None else draft_s)
        return Run(out, seconds, calls, draft_s, verify_s, other)

    return run


# --- our side


def load_engine(pair: Pair, *, draft: bool, max_seq_len: int, **kwargs: Any):
    from offload_runtime.engine import Engine

    return Engine.from_pretrained(str(pair.target), draft=str(pair.draft) if draft else False, device="cpu",
                                  dtype="float32", max_seq_len=max_seq_len, progress=False, quiet=True,
                                  **{"plan": None, **kwargs})


def ours_method(engine, tree, prompts: list[list[int]], tokens: int, temperature: float, top_p: float = 1.0) -> Method:
    """Decode with `tree` (None: keep the engine's); times and sweeps are the differences over the run."""

    def run(repeat: int) -> Run:
        if tree is not None:
            engine.decoder.set_tree(tree)
        todo = prompts[:1] if repeat < 0 else prompts
        n = min(tokens, 8) if repeat < 0 else tokens
        before = dataclasses.replace(engine.decoder.times)
        sweeps_before = len(engine.sweep_stats())
        t0 = time.perf_counter()
        results = engine.generate(todo, max_new_tokens=n, temperature=temperature, top_p=top_p,
                                  seed=1000 * max(repeat, 0), ignore_eos=True)
        seconds = time.perf_counter() - t0
        after = engine.decoder.times
        return Run([r.token_ids for r in results], seconds, after.steps - before.steps,
                   after.draft_s - before.draft_s, after.verify_s - before.verify_s, after.other_s - before.other_s,
                   engine.sweep_stats()[sweeps_before:])

    return run


# --- trees: the planned one, a chain and a k x l tree of the same size


@dataclass
class TreeChoice:
    parents: list[int]
    source: str  # where the tree came from, in words
    p: list[float]  # the acceptance vector it was chosen for
    plan: Any = None


def stored_acceptance(pair: Pair) -> tuple[list[float], str] | None:
    """The newest acceptance measurement of this pair in the planner's store, if any."""
    from offload_runtime.errors import UsageError
    from planner import hardware
    from planner.acceptance import read_acceptance
    from planner.plan import model_identity

    folder = hardware.store_dir("acceptance")
    if not folder.is_dir():
        return None
    ids = (model_identity(pair.target), model_identity(pair.draft))
    found = []
    for f in folder.glob("*.json"):
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


def planned_tree(pair: Pair, size: int, depth: int) -> TreeChoice:
    """The plan's tree when a plan exists for the pair on this machine, else best_trees of `size` nodes."""
    from planner.plan import find_plan
    from planner.tree_search import DEFAULT_ACCEPTANCE, best_trees

    plan, _ = find_plan(pair.target, pair.draft, "cpu", torch.float32, batch_size=1)
    if plan is not None:
        return TreeChoice(list(plan.tree), f"the plan {plan.path.name} (made for T={plan.temperature:g}, "
                          f"top-p {plan.top_p:g}; acceptance: {plan.acceptance.get('source')})",
                          list(plan.acceptance["p"]), plan)
    stored = stored_acceptance(pair)
    p, where = stored if stored else (list(DEFAULT_ACCEPTANCE), "the default acceptance vector (an assumption)")
    parents = best_trees(p, size, depth).tree(size, depth)
    return TreeChoice(parents, f"no plan for this pair on this machine: best_trees({where}, n={size}, d={depth})", p)


def kxl_shape(n: int, p: Sequence[float]) -> tuple[int, int]:
    """k sequences of length l with k*l + 1 closest to n; k, l >= 2 where n allows; ties: more expected tokens."""
    from planner.tree_search import expected_tokens, k_sequences_tree

    low = 2 if n >= 5 else 1
    cands = [(k, l) for k in range(low, max(n, low + 1)) for l in range(low, max(n, low + 1))]
    return min(cands, key=lambda kl: (abs(kl[0] * kl[1] + 1 - n), -expected_tokens(k_sequences_tree(*kl), p)))


def comparison_trees(choice: TreeChoice) -> dict[str, list[int]]:
    from planner.tree_search import chain_tree, k_sequences_tree

    n = len(choice.parents)
    trees = {"sequoia": choice.parents, f"chain {n}": chain_tree(n)}
    if n >= 3:
        k, l = kxl_shape(n, choice.p)
        trees[f"{k} x {l} sequences"] = k_sequences_tree(k, l)
    return trees


# --- sections


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


def _tree_shape(parents: Sequence[int]) -> tuple[int, int]:
    from offload_runtime.tree import Tree

    t = Tree(parents)
    return len(t), t.max_depth


def bench_pair(pair: Pair, cfg: Settings, want: set[str], log: Callable[[str], None]) -> list[Table]:
    """Baselines and trees on one pair: every method of both tables measured in one interleaved loop per T."""
    from offload_runtime.checkpoint import load_tokenizer
    from offload_runtime.config import ModelArgs
    from offload_runtime.tree import Tree
    from planner.tree_search import expected_tokens

    args = ModelArgs.from_file(pair.target)
    prompts = make_prompts(load_tokenizer(pair.target), args.vocab_size, cfg.prompts, cfg.prompt_len,
                           torch.Generator().manual_seed(0))
    choice = planned_tree(pair, cfg.tree_size, cfg.tree_depth)
    trees = comparison_trees(choice)
    longest = max(len(p) for p in prompts) + cfg.tokens + max(len(t) for t in trees.values()) + 8
    engine = load_engine(pair, draft=True, max_seq_len=min(longest, args.max_position_embeddings))
    hf_target, hf_draft = load_hf(pair.target), load_hf(pair.draft)
    assisted = assisted_settings(hf_draft)
    clocks = {hf_target: ForwardClock(hf_target), hf_draft: ForwardClock(hf_draft)}
    base_rows, tree_rows = [], []
    plain = Tree([-1])
    for T in cfg.temperatures:
        log(f"[{pair.label}] temperature {T:g}: measuring")
        methods: dict[str, Method] = {}
        if "baselines" in want:
            methods["HF generate"] = hf_method(hf_target, clocks, None, prompts, cfg.tokens, T)
            methods["HF assisted"] = hf_method(hf_target, clocks, hf_draft, prompts, cfg.tokens, T)
        methods["ours plain"] = ours_method(engine, plain, prompts, cfg.tokens, T)
        for name, parents in trees.items():
            if "trees" in want or name == "sequoia":
                methods[f"ours {name}"] = ours_method(engine, Tree(parents), prompts, cfg.tokens, T)
        runs = interleaved(methods, cfg.repeats)
        s = {name: summarise(r) for name, r in runs.items()}
        if "baselines" in want:
            hf, hfa = s["HF generate"].tokens_per_s, s["HF assisted"].tokens_per_s
            for name in ("HF generate", "HF assisted", "ours plain", "ours sequoia"):
                x = s[name]
                check = greedy_check(runs[name], runs["HF generate"]) if T == 0 else "-"
                base_rows.append([name, f"{T:g}", _f(x.tokens_per_s), _ratio(x.tokens_per_s, hf),
                                  _ratio(x.tokens_per_s, hfa), f"{x.tokens_per_step:.2f}", x.draft_ms, x.verify_ms,
                                  x.other_ms, check])
        if "trees" in want:
            ref = s["ours plain"].tokens_per_s
            for name, parents in [("plain", [-1])] + list(trees.items()):
                x = s[f"ours {name}"]
                n, d = _tree_shape(parents)
                check = greedy_check(runs[f"ours {name}"], runs["ours plain"]) if T == 0 else "-"
                tree_rows.append([name, f"{T:g}", str(n), str(d), f"{expected_tokens(parents, choice.p):.2f}",
                                  f"{x.tokens_per_step:.2f}", _f(x.tokens_per_s), _ratio(x.tokens_per_s, ref),
                                  x.draft_ms, x.verify_ms, x.other_ms, check])
    for c in clocks.values():
        c.remove()
    del engine, hf_target, hf_draft, clocks
    gc.collect()
    common = [f"{pair.label}: {pair.about}; target {describe_model(pair.target)}; draft {describe_model(pair.draft)}",
              f"{cfg.prompts} prompts x {cfg.tokens} new tokens, batch 1, median of {cfg.repeats} interleaved "
              f"repeats after a warm-up; ms/step = per target forward (HF: time inside the models' forward)"]
    tables = []
    if "baselines" in want:
        tables.append(Table(
            f"Baselines on {pair.label}: transformers vs ours",
            ["method", "T", "tokens/s", "vs HF generate", "vs HF assisted", "tokens/step", "draft ms/step",
             "verify ms/step", "other ms/step", "= HF greedy"], base_rows,
            common + [f"HF assisted: assistant_model=draft with its default settings ({assisted})",
                      f"sequoia tree: {choice.source}",
                      "greedy (T=0) check: ours and assisted must give exactly HF generate's tokens"]))
    if "trees" in want:
        tables.append(Table(
            f"Trees on {pair.label}: Sequoia vs chain vs k x l (same size) vs plain",
            ["tree", "T", "nodes", "depth", "expected tokens/step", "tokens/step", "tokens/s", "vs plain",
             "draft ms/step", "verify ms/step", "other ms/step", "= plain"], tree_rows,
            common + [f"planned tree: {choice.source}",
                      "expected tokens/step: under the acceptance vector the planned tree was chosen for"]))
    return tables


def bench_streaming(pair: Pair, cfg: Settings, log: Callable[[str], None]) -> list[Table]:
    """The same model resident and streamed (0 resident layers), plain greedy decoding: the cost of the copies."""
    from offload_runtime.config import ModelArgs

    args = ModelArgs.from_file(pair.target)
    prompts = make_prompts(None, args.vocab_size, cfg.prompts, cfg.prompt_len, torch.Generator().manual_seed(1))
    seq = min(cfg.prompt_len + cfg.tokens + 8, args.max_position_embeddings)
    resident = load_engine(pair, draft=False, max_seq_len=seq, offload=False)
    streamed = load_engine(pair, draft=False, max_seq_len=seq, offload=True, resident_layers=0)
    log(f"[{pair.label}] streaming: measuring")
    runs = interleaved({"resident": ours_method(resident, None, prompts, cfg.tokens, 0.0),
                        "streamed": ours_method(streamed, None, prompts, cfg.tokens, 0.0)}, cfg.repeats)
    layer_mib = streamed.target.layers.store.layer_bytes / 2 ** 20
    base = summarise(runs["resident"]).tokens_per_s
    rows = []
    for name, rs in runs.items():
        x = summarise(rs)
        sweeps = [sw for r in rs for sw in r.sweeps]
        gbps = statistics.median(sw.gbps for sw in sweeps) if sweeps else math.nan
        wait = statistics.median(sw.wait_s / sw.wall_s for sw in sweeps if sw.wall_s > 0) if sweeps else math.nan
        same = greedy_check(rs, runs["resident"])
        rows.append([name, _f(x.tokens_per_s), _ratio(x.tokens_per_s, base), f"{x.seconds_per_token * 1e3:.3g}",
                     x.verify_ms, _f(gbps), "-" if math.isnan(wait) else f"{wait:.0%}", same])
    del resident, streamed
    gc.collect()
    return [Table(f"Streaming on {pair.label}: resident vs streamed target (0 resident layers)",
                  ["target", "tokens/s", "vs resident", "ms/token", "sweep ms", "sweep GB/s", "copy share",
                   "= resident"], rows,
                  [f"{pair.label}: target {describe_model(pair.target)}; plain greedy decoding, {cfg.prompts} prompts x "
                   f"{cfg.tokens} tokens, median of {cfg.repeats} interleaved repeats",
                   f"each sweep copies {args.n_layers} layers of {layer_mib:.3g} MiB through 2 slots (on the CPU a "
                   f"memcpy); sweep GB/s and copy share (copy time / sweep time): medians over the sweeps"])]


def bench_plan(pair: Pair, cfg: Settings, log: Callable[[str], None]) -> list[Table]:
    """Predicted tokens/step and s/token of the pair's plan against a chat-like run that follows the plan."""
    from offload_runtime.checkpoint import load_tokenizer
    from offload_runtime.config import ModelArgs
    from offload_runtime.tree import Tree
    from planner.acceptance import BUILTIN_PROMPTS
    from planner.plan import find_plan

    plan, message = find_plan(pair.target, pair.draft, "cpu", torch.float32, batch_size=1)
    title = f"Plan check on {pair.label}: predicted vs measured"
    if plan is None:
        how = ["for the demo pair: `python -m planner plan --model demo --draft demo-draft --device cpu`, then rerun"] \
            if pair.label == "demo" else []
        return [Table(title, ["quantity", "predicted", "measured", "error"], [], [f"skipped: {message}", *how])]
    args = ModelArgs.from_file(pair.target)
    tok = load_tokenizer(pair.target)
    engine = load_engine(pair, draft=True, max_seq_len=min(args.max_position_embeddings, 1024),
                         plan=str(plan.path), batch_size=1)
    kind = "chat-formatted" if tok is not None else "random-id"
    if tok is not None:  # what the chat sends: the user's message under the chat template
        prompts = [engine.apply_chat_template([{"role": "user", "content": BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]}])
                   for i in range(cfg.prompts)]
    else:
        prompts = make_prompts(None, args.vocab_size, cfg.prompts, cfg.prompt_len, torch.Generator().manual_seed(2))
    log(f"[{pair.label}] plan check: measuring")
    # Repeats for PLAN_CHECK_S seconds at least: this machine's speed comes and goes in bursts of seconds to
    # minutes, and the median of a few back-to-back repeats would report whichever burst they fell in. Plain
    # decoding on the same engine, interleaved repeat by repeat, is the speed reference: the calibration ran it
    # too, so their ratio says how much faster or slower the machine is now than when the plan was made.
    methods = {"plan": ours_method(engine, Tree(plan.tree), prompts, cfg.tokens, plan.temperature, plan.top_p),
               "plain": ours_method(engine, Tree([-1]), prompts, cfg.tokens, plan.temperature, plan.top_p)}
    runs = interleaved(methods, cfg.repeats)
    t0 = time.perf_counter()
    while not cfg.small and time.perf_counter() - t0 < PLAN_CHECK_S:
        for name in methods:
            runs[name].append(methods[name](len(runs[name])))
    plan_runs = runs["plan"]
    repeats = len(plan_runs)
    x = summarise(plan_runs)
    steps = sum(r.steps for r in plan_runs)
    measured = {"tokens_per_step": x.tokens_per_step, "s_per_token": x.seconds_per_token,
                "tokens_per_s": x.tokens_per_s,
                "draft_s": sum(r.draft_s for r in plan_runs) / steps,
                "verify_s": sum(r.verify_s for r in plan_runs) / steps,
                "host_s": sum(r.seconds - r.draft_s - r.verify_s for r in plan_runs) / steps}
    pr = dict(plan.predicted)
    calibration = plan.figures.get("calibration")
    reference = ((calibration or {}).get("measured") or {}).get("reference_s_per_token")
    speed_note = ("no speed reference: the plan's calibration ran without one (streamed plans skip it)" if calibration
                  else "no speed reference: the plan had no calibration run (plain decoding, or --no-calibrate)")
    rows_spec = [("tokens_per_step", "tokens/step", 1, True), ("s_per_token", "s/token", 1, True)]
    if reference:
        measured["reference"] = summarise(runs["plain"]).seconds_per_token
        pr["reference"] = reference
        drift = measured["reference"] / reference
        measured["s_per_token_adjusted"] = measured["s_per_token"] / drift
        pr["s_per_token_adjusted"] = pr["s_per_token"]
        rows_spec += [("reference", "plain s/token (speed reference)", 1, False),
                      ("s_per_token_adjusted", "s/token at the plan's speed", 1, True)]
        speed_note = (f"speed reference: plain decoding on the same engine, interleaved; it took {drift:.2f}x its "
                      f"time at calibration, and 's/token at the plan's speed' divides the measured s/token by that")
    rows = []
    for key, label, scale, quoted in (*rows_spec, ("tokens_per_s", "tokens/s", 1, False),
                                      ("draft_s", "draft ms/step", 1e3, False),
                                      ("verify_s", "verify ms/step", 1e3, False),
                                      ("host_s", "host ms/step", 1e3, False)):
        p, m = float(pr[key]), measured[key]
        if not p:
            rows.append([label, _f(p * scale, 4), _f(m * scale, 4), "-"])
            continue
        err = (m - p) / p
        mark = "" if not quoted else (f" {CHECK}" if abs(err) <= 0.15 else f" {CROSS}")
        rows.append([label, _f(p * scale, 4), _f(m * scale, 4), f"{err:+.1%}{mark}"])
    n, d = _tree_shape(plan.tree)
    del engine
    gc.collect()
    return [Table(title, ["quantity", "predicted", "measured", "error"], rows,
                  [f"plan {plan.path} ({plan.created}): {n} nodes, depth {d}, T={plan.temperature:g}, top-p "
                   f"{plan.top_p:g}, acceptance {plan.acceptance.get('source')}",
                   f"measured: {cfg.prompts} {kind} prompts x {cfg.tokens} tokens at the plan's sampling "
                   f"settings, median s/token of {repeats} repeats; {CHECK} = within 15% (the planner's target)",
                   speed_note,
                   "error = (measured - predicted) / predicted; host = the rest of the wall time: verification walk, "
                   "cache compaction, bookkeeping, between steps; ms/step rows: means over all repeats"])]


def bench_batch(pair: Pair, cfg: Settings, sizes: Sequence[int], log: Callable[[str], None]) -> list[Table]:
    """Total tokens/s and sweeps per generated token for several batch sizes, streamed, plain greedy decoding."""
    from offload_runtime.config import ModelArgs

    args = ModelArgs.from_file(pair.target)
    seq = min(cfg.prompt_len + cfg.tokens + 8, args.max_position_embeddings)
    methods, engines = {}, []
    for B in sizes:
        prompts = make_prompts(None, args.vocab_size, 2 * B, cfg.prompt_len, torch.Generator().manual_seed(3))
        engine = load_engine(pair, draft=False, max_seq_len=seq, offload=True, resident_layers=0, batch_size=B)
        engines.append(engine)
        methods[str(B)] = ours_method(engine, None, prompts, cfg.tokens, 0.0)
    log(f"[{pair.label}] batch sizes {', '.join(map(str, sizes))}: measuring")
    runs = interleaved(methods, cfg.repeats)
    base = summarise(runs[str(sizes[0])]).tokens_per_s
    rows = []
    for B in sizes:
        rs = runs[str(B)]
        x = summarise(rs)
        sweeps = sum(len(r.sweeps) for r in rs)
        tokens = sum(r.n_tokens for r in rs)
        rows.append([str(B), str(2 * B), _f(x.tokens_per_s), _ratio(x.tokens_per_s, base),
                     f"{sweeps / tokens:.3f}", x.verify_ms])
    del engines, methods
    gc.collect()
    return [Table(f"Batching on {pair.label}: streamed target, B sequences per sweep",
                  ["B", "prompts", "total tokens/s", "vs B=1", "sweeps/token", "sweep ms"], rows,
                  [f"{pair.label}: target {describe_model(pair.target)}, 0 resident layers; plain greedy decoding; "
                   f"2B prompts of {cfg.prompt_len} tokens x {cfg.tokens} new tokens each; median of {cfg.repeats} "
                   f"interleaved repeats",
                   "sweeps/token = len(engine.sweep_stats()) over the run / tokens generated (prefill included)"])]


# --- small mode: a quick plan for the temporary pair, so the plan section runs end to end


def make_quick_plan(pair: Pair, threads: int) -> None:
    from planner.__main__ import main as planner_main

    # A high given acceptance makes the plan a tree, so its calibration (with the speed reference) runs too.
    argv = ["plan", "--model", str(pair.target), "--draft", str(pair.draft), "--device", "cpu", "--dtype",
            "float32", "--temperature", "0", "--quick", "--grid", "1,2,4,8,16,32", "--prefix", "16",
            "--max-tree", "32", "--max-depth", "6", "--acceptance", "0.97",
            "--threads", str(threads)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        planner_main(argv)


# --- the command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/bench_cpu.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})")
    p.add_argument("--small", action="store_true", help="tiny random models and few tokens (< 60 s; the tests)")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--output", type=Path, default=BENCHMARKS_MD, help="the Markdown file to append to")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per prompt (default 64; --small: 8)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per run (default 3; --small: 2)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per method (default 3; --small: 1)")
    p.add_argument("--temperatures", default="0,0.6", help="comma-separated temperatures (default 0,0.6)")
    p.add_argument("--tree-size", type=int, default=16, help="tree size when no plan exists (default 16)")
    p.add_argument("--tree-depth", type=int, default=6, help="tree depth limit when no plan exists (default 6)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes (default 1,2,4,8,16; --small: 1,2,4)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the built random checkpoints here (reused next time); default: a temporary directory")
    a = p.parse_args(argv)
    a.sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad or not a.sections:
        p.error(f"unknown section(s) {', '.join(bad) or '(none)'}; choose from {', '.join(SECTIONS)}")
    for name in ("threads", "tokens", "prompts", "repeats", "tree_size"):
        v = getattr(a, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    try:
        a.temperatures = [float(t) for t in a.temperatures.split(",")]
        a.batch_sizes = None if a.batch_sizes is None else [int(b) for b in a.batch_sizes.split(",")]
    except ValueError:
        p.error("--temperatures and --batch-sizes take comma-separated numbers")
    if any(t < 0 for t in a.temperatures) or (a.batch_sizes and any(b < 1 for b in a.batch_sizes)):
        p.error("temperatures must be >= 0 and batch sizes >= 1")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    cfg = Settings(small=a.small, tokens=a.tokens or (8 if a.small else 64), prompts=a.prompts or (2 if a.small else 3),
                   repeats=a.repeats or (1 if a.small else 3), temperatures=a.temperatures, tree_size=a.tree_size,
                   tree_depth=a.tree_depth, prompt_len=8 if a.small else 32)
    sizes = a.batch_sizes or ([1, 2, 4] if a.small else [1, 2, 4, 8, 16])
    with contextlib.ExitStack() as stack:
        if a.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-cpu-")))
        else:
            workdir = a.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        if a.small:
            # The temporary models' plan lives in a temporary planner home, never in the user's.
            os.environ["OFFLOAD_RUNTIME_HOME"] = str(workdir / "planner-home")
        log("building models")
        pairs = choose_pairs(a.small, workdir)
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
    for t in tables:
        print(format_text(t))
        print()
    machine = machine_description(a.threads)
    command = shlex.join(["python", "tools/bench_cpu.py", *argv])
    print(f"machine: {machine}")
    print(f"command: {command}")
    log("done")
    if not a.no_write:
        intro = ["ratios (vs ...) are the figures to quote; absolute CPU times are noise"]
        append_report(a.output, tables, machine=machine, command=command, intro=intro)
        print(f"appended to {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
