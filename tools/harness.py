"""What the benchmark tools share: model pairs, the one random-model builder, prompts, one timed engine run
through the engine's public API, and the interleaving protocol.

Importing it first puts this checkout ahead of any installed copy on sys.path and keeps transformers offline
and quiet (nothing is ever downloaded).

Protocol. A method is a function of the repeat index that runs every prompt once and returns a Run; index -1
is its warm-up (one prompt, at most 8 tokens). `interleaved` warms every method up, then runs the repeats in
a rotating order (A B C, B C A, ...), so slow phases of a shared machine fall on every method alike; figures
are medians over repeats. Every run generates exactly the asked number of tokens (end-of-sequence ignored)
with seed 1000 x repeat (+ i for prompt i), so repeats differ and methods see the same draws.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
if sys.path[:1] != [str(REPO)]:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from offload_runtime.api.engine import CallStats, Engine, GenerationResult  # noqa: E402
from offload_runtime.model.config import ModelArgs  # noqa: E402
from offload_runtime.model.tree import Tree  # noqa: E402
from offload_runtime.weights.random import RandomWeights  # noqa: E402
from offload_runtime.weights.source import WeightSource  # noqa: E402
from report import CHECK, CROSS  # noqa: E402

BENCHMARKS_MD = REPO / "BENCHMARKS.md"
# --small: a tiny random Llama, built in a temporary directory
SMALL_ARGS = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128,
                       vocab_size=512, max_position_embeddings=512)


class Log:
    """Progress lines on stderr, stamped with the seconds since the tool started."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {msg}", file=sys.stderr, flush=True)


def machine_description(threads: int) -> str:
    import transformers

    from offload_runtime.api.machine import machine_fingerprint

    fp = machine_fingerprint("cpu")
    return (f"{fp['cpu_model']}, {threads} torch thread(s) used of {fp['cpu_count']} logical CPUs, "
            f"{fp['ram_total_gib']} GiB RAM; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {platform.python_version()}")


def csv(kind: type) -> Callable[[str], list]:
    """An argparse type: comma-separated values of `kind`."""
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    return parse


def output_file(text: str) -> Path:
    """An argparse type for a file a tool writes at the end of a long run: checked before the run starts."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_file():
        raise argparse.ArgumentTypeError(f"{path} is not a regular file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the directory {path.parent} does not exist; create it first")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path} cannot be written here")
    return path


def work_dir(text: str) -> Path:
    """An argparse type for a directory a tool writes its models into: made now, and proven writable, so a
    bad path stops the tool before its first run rather than in the middle."""
    path = Path(text).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{path} cannot be used as a work directory: {e.strerror or e}") from None
    return path


def check_positive(parser: argparse.ArgumentParser, ns: argparse.Namespace, names: Sequence[str]) -> None:
    for name in names:
        v = getattr(ns, name)
        if v is not None and v < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")


# --- models


@dataclass(frozen=True)
class Pair:
    label: str
    target: Path
    draft: Path
    about: str  # one line: what the models are


def demo_pair() -> Pair | None:
    from offload_runtime.api.registry import demo_paths

    target, draft = demo_paths()
    if not (target / "model.safetensors").is_file() or not (draft / "model.safetensors").is_file():
        return None
    return Pair("demo", target, draft, "the bundled demo pair (offload_runtime/demo)")


def named_pair(model: str, draft: str) -> Pair:
    from offload_runtime.api.registry import resolve_name
    from offload_runtime.weights.checkpoint import resolve_model_dir

    return Pair(Path(model).name, resolve_model_dir(resolve_name(model)), resolve_model_dir(resolve_name(draft)),
                f"{model} with draft {draft}")


def describe_model(path: Path) -> str:
    a = ModelArgs.from_file(path)
    return f"{a.n_params() / 1e6:.3g}M params, {a.n_layers} layers, dim {a.dim}, vocab {a.vocab_size}"


class NoisyCopy:
    """A weight source reading another one and adding noise x each tensor's std: a draft cut from a target (its
    args name fewer layers, so it holds the target's first ones), close to the target but not equal to it."""

    def __init__(self, base: WeightSource, args: ModelArgs, noise: float, seed: int):
        self.base, self.args, self.noise = base, args, noise
        self.label = f"{base.label}, {args.n_layers} layers, noised"
        self._draws = RandomWeights(args, seed, std=1.0)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        self.base.read_into(name, out)
        if out.numel() > 1:  # norms are ones: std 0, left as they are
            out.add_(self._draws.read_into(name, torch.empty_like(out)), alpha=self.noise * float(out.std()))
        return out


def hf_model(source: WeightSource, dtype: torch.dtype = torch.float32):
    """transformers' causal LM (config from ModelArgs.to_hf_config) holding exactly `source`'s weights.

    Built on the meta device and filled tensor by tensor, each in its own memory as a loaded checkpoint has it:
    no random init and no second copy, so published shapes fit in host RAM once.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = source.args.to_hf_config()
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    for name, param in list(model.named_parameters()):
        owner, leaf = name.rsplit(".", 1)
        value = source.read_into(name, torch.empty(param.shape, dtype=dtype))
        model.get_submodule(owner).register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    model.tie_weights()
    return model.eval()


def save_checkpoint(path: Path, source: WeightSource) -> Path:
    """`source` as a float32 transformers checkpoint (save_pretrained): what both sides of a benchmark load."""
    hf_model(source).save_pretrained(path)
    return path


def random_pair(root: Path, args: ModelArgs, label: str, about: str, draft_layers: int = 2, noise: float = 0.05,
                seed: int = 0) -> Pair:
    """A random target of `args` and a draft cut from it (its first layers, noised slightly); reused if present."""
    args = args.replace(bos_token_id=1, eos_token_ids=(2,))
    target, draft = root / f"{label}-target", root / f"{label}-draft"
    weights = RandomWeights(args, seed)
    if not (target / "model.safetensors").is_file():
        save_checkpoint(target, weights)
    if not (draft / "model.safetensors").is_file():
        save_checkpoint(draft, NoisyCopy(weights, args.replace(n_layers=draft_layers), noise, seed + 1))
    return Pair(label, target, draft, about)


def small_pair(root: Path) -> Pair:
    # Random weights: near-uniform distributions, so sampled drafts are accepted far more often than on a
    # trained pair; the small mode checks that everything runs, its numbers say nothing.
    return random_pair(root, SMALL_ARGS, "small", "tiny random Llama (--small), draft = its first 2 layers, noised")


def load_engine(pair: Pair, *, draft: bool | str, max_seq_len: int, device: str = "cpu", **options: Any) -> Engine:
    """The pair in float32 (unless `dtype=` is given), quietly; no plan unless `plan=` is given. `draft`: True for
    the pair's draft, False for none, or a draft name (a self-draft: "self-int4")."""
    name = str(pair.draft) if draft is True else draft
    return Engine.from_pretrained(str(pair.target), draft=name, device=device, max_seq_len=max_seq_len,
                                  progress=False, quiet=True, **{"plan": None, "dtype": "float32", **options})


def make_prompts(tokenizer: Any, vocab_size: int, count: int, length: int, generator: torch.Generator
                 ) -> list[list[int]]:
    """Token ids: the planner's built-in prompts through the tokenizer (cycled), or random ids without one."""
    from planner.acceptance import BUILTIN_PROMPTS

    if tokenizer is not None:
        return [list(tokenizer(BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]).input_ids) for i in range(count)]
    low = min(3, vocab_size - 1)  # keep clear of pad/bos/eos
    return [torch.randint(low, vocab_size, (length,), generator=generator).tolist() for _ in range(count)]


def search_card(p: Sequence[float], tm: Any, target: tuple[str, ModelArgs, Any], draft: tuple[str, ModelArgs, Any],
                dtype: torch.dtype, *, cuda: bool, budget: int, max_seq_len: int, max_tree: int, max_depth: int):
    """The planner's pick (planner/pipeline.py `search`: the runtime's residency rule for this device budget, then
    the optimiser) for shapes known only by name, ModelArgs and packed format (a QuantSpec or None), batch 1,
    streaming; returns (BatchChoice, the time model with the chosen resident layers)."""
    from offload_runtime.api.plans import ModelRef
    from offload_runtime.api.self_draft import is_self_draft
    from planner import pipeline

    def ref(name: str) -> ModelRef:  # a shape, not a checkpoint: the search reads only ModelArgs
        return ModelRef(name=name, identity=f"shape:{name}", fingerprint="", path=None)

    tref = ref(target[0])  # a self-draft ("self-int4") is the target's shape in its packed format, globals shared
    dref = ModelRef.of_self_draft(draft[0], tref, draft[2].label) if is_self_draft(draft[0]) else ref(draft[0])
    pair = pipeline.Pair(torch.device("cuda" if cuda else "cpu"), dtype, tref, target[1], dref, draft[1], target[2],
                         draft[2])
    req = pipeline.PlanRequest(model=target[0], max_tree=max_tree, max_depth=max_depth, slots=2, offload=True,
                               batch_size=1, top=5)
    choice, _ = pipeline.search(p, tm, pair, req, budget, max_seq_len)
    return choice, tm.with_resident(len(choice.residency.resident))


# --- one run, and the interleaving protocol


@dataclass
class Run:
    tokens: list[list[int]]  # the new tokens, per prompt
    seconds: float
    stats: CallStats  # target sweeps (steps), phase seconds, streamed sweeps of this run
    results: list[GenerationResult] = field(default_factory=list, repr=False)  # ours only: per-sequence stats

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("nan")


def run_engine(engine: Engine, prompts: Sequence[list[int]], *, tree: Tree | Sequence[int] | None, tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop_at: int | None = None) -> Run:
    """Every prompt through `engine` with `tree` (None: the engine's own choice), end-of-sequence ignored;
    prompt i uses seed + i. With `stop_at`, each request stops at the first step whose tokens reach it."""
    requests = [engine.request(ids, max_new_tokens=tokens, temperature=temperature, top_p=top_p, seed=seed + i,
                               ignore_eos=True, tree=tree) for i, ids in enumerate(prompts)]
    if stop_at is not None:
        for req in requests:
            req.stop_check = lambda r, new: len(new) if len(r.generated) + len(new) >= stop_at else None
    results: list[GenerationResult] = [None] * len(requests)  # type: ignore[list-item]
    t0 = time.perf_counter()
    for i, result in engine.run(requests):
        results[i] = result
    return Run([r.token_ids for r in results], time.perf_counter() - t0, engine.last_call, results)


Method = Callable[[int], Run]  # argument: the repeat index; -1 is the warm-up


def engine_method(engine: Engine, tree: Tree | Sequence[int] | None, prompts: Sequence[list[int]], tokens: int,
                  temperature: float, top_p: float = 1.0) -> Method:
    """Our side as a method of the protocol: every prompt through `engine` with `tree` (None: the engine's)."""
    def run(repeat: int) -> Run:
        todo, n = (prompts[:1], min(tokens, 8)) if repeat < 0 else (prompts, tokens)
        return run_engine(engine, todo, tree=tree, tokens=n, temperature=temperature, top_p=top_p,
                          seed=1000 * max(repeat, 0))
    return run


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


@dataclass(frozen=True)
class Summary:
    tokens_per_s: float  # median over repeats
    tokens_per_step: float  # pooled: all tokens / all target sweeps
    draft_ms: float  # per target sweep, pooled
    sweep_ms: float
    host_ms: float
    s_per_token: float  # 1 / median tokens/s


def summarise(runs: Sequence[Run]) -> Summary:
    steps = sum(r.stats.steps for r in runs)

    def per_step(seconds: float) -> float:
        return seconds / steps * 1e3 if steps else float("nan")

    tps = statistics.median(r.tokens_per_s for r in runs)
    return Summary(tps, sum(r.n_tokens for r in runs) / steps if steps else float("nan"),
                   per_step(sum(r.stats.draft_s for r in runs)), per_step(sum(r.stats.sweep_s for r in runs)),
                   per_step(sum(r.stats.host_s for r in runs)), 1.0 / tps if tps > 0 else float("nan"))


@dataclass(frozen=True)
class Match:
    """How many prompts of a method's runs gave other tokens than the reference's first run."""

    differ: int
    total: int

    @property
    def ok(self) -> bool:
        return self.differ == 0

    def __str__(self) -> str:
        return CHECK if self.ok else f"{CROSS} {self.differ}/{self.total} differ"


def same_tokens(runs: Sequence[Run], reference: Sequence[Run]) -> Match:
    ref = reference[0].tokens
    return Match(sum(t != u for r in runs for t, u in zip(r.tokens, ref)), sum(len(r.tokens) for r in runs))
