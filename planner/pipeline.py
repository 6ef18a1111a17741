"""The planning pipeline as functions: profile (if missing) -> acceptance (if missing) -> search -> calibration
-> plan. The command line (`python -m planner`) and the tools call these; nothing here prints.

    request = PlanRequest(model="demo", draft="demo-draft", device="cpu", log=print)
    result = make_plan(request)            # the plan, written to the store
    result.plan.summary()
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from offload_runtime.api import registry
from offload_runtime.api.home import runtime_home, short_hash, store_dir, write_json
from offload_runtime.api.machine import describe_machine, machine_fingerprint
from offload_runtime.api.options import GenerationDefaults, check_sampling, parse_device, parse_dtype
from offload_runtime.api.plans import ModelRef, Plan, dtype_name, read_plan, save_plan
from offload_runtime.api.self_draft import check_self_draft_fits, is_self_draft, self_draft_quant
from offload_runtime.errors import OffloadError, ResourceError, UsageError
from offload_runtime.memory import parse_bytes
from offload_runtime.residency import device_budget_bytes, fixed_device_bytes
from offload_runtime.model.config import ModelArgs
from offload_runtime.model.quantization import QuantSpec
from offload_runtime.spec.tree_search import DEFAULT_ACCEPTANCE
from offload_runtime.weights.quantized import quant_spec_for, quantize_flags
from offload_runtime.weights.disk import DEFAULT_PREFETCH, DEFAULT_READ_THREADS

from . import acceptance as acc
from . import optimizer as opt
from . import profile as prof
from .models import resolve_model


@dataclass
class PlanRequest:
    """Everything a plan depends on; field names match the command line's flags."""

    model: str
    draft: str | None = None  # None: the model's default draft
    no_draft: bool = False  # profile only: the target alone
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    temperature: float | None = None  # None: the model's generation_config, else greedy
    top_p: float | None = None
    gpu_memory: str | int | None = None
    host_memory: str | int | None = None  # host budget: streamed layers beyond it are read from the disk store
    offload_dir: str | None = None  # where the disk store lives (its disk is what gets profiled)
    prefetch: int | None = None  # staging buffers of the disk tier (None: the search chooses)
    read_threads: int | None = None  # reader threads (None: the fewest that reach the disk's bandwidth)
    max_tree: int = 1024
    max_depth: int = 16
    batch_size: int | str = 1  # or "auto"
    max_batch: int = 64
    max_seq_len: int | None = None
    slots: int = 2
    offload: bool | None = None
    acceptance: str | None = None  # a file of `acceptance`, a vector "0.7,0.1", or "default"
    profile: str | None = None  # a profile file to use instead of this machine's
    grid: str | None = None
    prefix: int | None = None
    quick: bool = False
    prompts: str | None = None
    width: int = 16
    max_new_tokens: int = 64
    limit: int | None = None
    seed: int = 0
    acceptance_batch: int = 8
    remeasure: bool = False
    no_calibrate: bool = False
    calibration_time: float | None = None
    top: int = 10
    quantize: str | None = None  # quantize the target on load: "int8" | "int4" (AWQ / GPTQ need no flag)
    group_size: int | None = None
    draft_quantize: str | None = None
    policy: str = "auto"  # auto: measure static and dynamic trees and keep the faster; static / dynamic: that one
    dynamic_sizes: str | None = None  # budgets of dynamic trees to measure, e.g. "16,64,256" (default: 4..512)
    log: Callable[[str], None] = field(default=lambda s: None, repr=False)
    progress: bool = False

    @classmethod
    def from_namespace(cls, ns: Any, **overrides: Any) -> "PlanRequest":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names}, **overrides)


@dataclass(frozen=True)
class Pair:
    """The device, dtype and models a request resolves to."""

    device: torch.device
    dtype: torch.dtype
    target: ModelRef
    target_args: ModelArgs
    draft: ModelRef | None
    draft_args: ModelArgs | None
    quant: QuantSpec | None = None  # the target's packed format (its checkpoint's own, or quantized on load)
    draft_quant: QuantSpec | None = None

    @property
    def formats(self) -> tuple[str | None, str | None]:
        """The packed formats' labels, as plans and acceptance files are keyed (None: float)."""
        return tuple(q.label if q else None for q in (self.quant, self.draft_quant))  # type: ignore[return-value]


def engine_options(req: PlanRequest) -> dict[str, Any]:
    """What the planner's own engine runs (acceptance, calibration) need to load the pair as planned."""
    return {k: v for k, v in (("quantize", req.quantize), ("group_size", req.group_size),
                              ("draft_quantize", req.draft_quantize)) if v is not None}


def _draft_name(req: PlanRequest) -> str | None:
    """The draft asked for, else (unless --no-draft) the model family's default draft: `plan` and `show` alike."""
    if req.draft is not None or req.no_draft:
        return req.draft
    return registry.default_draft(req.model)


def check_request(req: PlanRequest) -> None:
    """The flags that are text until used (--grid, --prefix, --dynamic-sizes, --acceptance, --prompts), read now:
    a typo must cost a second, not the minutes of profiling and measuring that come before their first use."""
    profile_grid(req)
    if req.prefix is not None and req.prefix < 0:
        raise UsageError(f"--prefix must be >= 0, got {req.prefix}")
    if req.dynamic_sizes is not None:
        asked_dynamic_sizes(req.dynamic_sizes)
    if req.acceptance is not None:
        given_acceptance(req.acceptance)
    if req.prompts is not None:
        acc.read_prompts(req.prompts)


def resolve(req: PlanRequest) -> Pair:
    check_request(req)
    if req.threads:
        torch.set_num_threads(req.threads)
    dev = parse_device(req.device)
    tref, targs, note = resolve_model(req.model)
    if note:
        req.log(note)
    draft_name = _draft_name(req)
    self_draft = is_self_draft(draft_name)
    dref = dargs = None
    if draft_name is not None and not self_draft:
        dref, dargs, note = resolve_model(draft_name)
        if note:
            req.log(note)
    both = req.quantize is not None or req.draft_quantize is not None or self_draft
    quant = quant_spec_for(targs, req.quantize, req.group_size if req.quantize else None, f"model {req.model}")
    if self_draft:  # the target's own weights in fewer bits (offload_runtime/api/self_draft.py)
        draft_quant = self_draft_quant(draft_name, targs, quant, req.group_size, req.draft_quantize, req.model)
        dref, dargs = ModelRef.of_self_draft(draft_name, tref, draft_quant.label), targs
    else:
        if req.group_size is not None and not both:
            quant_spec_for(targs, None, req.group_size, f"model {req.model}")  # says what --group-size needs
        draft_quant = None if dargs is None else quant_spec_for(dargs, req.draft_quantize,
                                                                req.group_size if req.draft_quantize else None,
                                                                f"draft {draft_name}")
    return Pair(dev, parse_dtype(req.dtype, dev, targs.torch_dtype, quant), tref, targs, dref, dargs, quant, draft_quant)


def check_weights(pair: Pair, req: PlanRequest) -> None:
    """What the engine checks when it loads the pair (api/loading.py): each checkpoint's headers against its config,
    and that the draft speaks the target's vocabulary. Run before profiling, which takes minutes and reads neither;
    shape presets have no files to check."""
    from offload_runtime.api.loading import check_vocab_compatible, model_tokenizer, open_checkpoint

    if pair.target.is_preset:
        return
    target_path, target_source = open_checkpoint(pair.target.path)
    if pair.draft is None or pair.draft.is_preset or pair.draft.is_self_draft:
        return
    draft_path, draft_source = open_checkpoint(pair.draft.path)
    notice = check_vocab_compatible(pair.target_args, pair.draft_args, model_tokenizer(target_path, target_source),
                                    model_tokenizer(draft_path, draft_source), pair.target.name, pair.draft.name)
    if notice:
        req.log(notice)


PLANNER_STORES = ("profiles", "acceptance", "plans")


def check_store(kinds: Sequence[str] = PLANNER_STORES) -> None:
    """The runtime home and its store directories are directories this process can write (or make): checked before
    measuring, since the results are written there only at the end."""
    home = runtime_home()
    named = f"OFFLOAD_RUNTIME_HOME={home}" if os.environ.get("OFFLOAD_RUNTIME_HOME") else f"the runtime home {home}"
    for directory in (home, *(store_dir(k) for k in kinds)):
        existing = next(d for d in (directory, *directory.parents) if d.exists())
        problem = ("is a file, not a directory" if not existing.is_dir() else
                   "is not writable" if not os.access(existing, os.W_OK | os.X_OK) else None)
        if problem:
            raise UsageError(f"{named} cannot hold the planner's results: {existing} {problem}; point "
                             f"OFFLOAD_RUNTIME_HOME at a directory you can write")


OUTPUT_MAX_BYTES = 64 << 20  # far above any file the planner writes: a larger one is not read to find that out


def check_output(path: str | os.PathLike | None, what: str, read: Callable[[Path], Any],
                 flag: str = "--output") -> None:
    """Before any measuring: `path` is a new file in an existing directory, or a `what` file this tool wrote before
    (`read` accepts it: rebuilding replaces it). Anything else is a user's file and is never overwritten."""
    if path is None:
        return
    path = Path(path).expanduser()
    if not path.exists():
        if not path.parent.is_dir():
            raise UsageError(f"the directory of {flag} {path} does not exist; create it (mkdir -p {path.parent}) "
                             f"or give another path")
        return
    if not path.is_file():
        raise UsageError(f"{flag} {path} is not a regular file; give a file path")
    try:
        if path.stat().st_size > OUTPUT_MAX_BYTES:
            raise UsageError(f"{path} is too large")
        read(path)
    except OffloadError:
        raise UsageError(f"{flag} {path} exists and is not one of the planner's {what} files, so it is not "
                         f"overwritten; give a new path") from None


def need_draft(pair: Pair, req: PlanRequest, command: str) -> None:
    if pair.draft is None:
        raise UsageError(f"`{command}` needs a draft model: {req.model} has no default draft; pass --draft D")


def sampling(req: PlanRequest, pair: Pair) -> tuple[float, float]:
    """(temperature, top_p): as asked, else what the engine gives a request that names none."""
    d = GenerationDefaults.from_dir(pair.target.path)
    temperature = d.temperature if req.temperature is None else req.temperature
    top_p = d.top_p if req.top_p is None else req.top_p
    check_sampling(temperature, top_p, 1)
    return float(temperature), float(top_p)


# --- the steps


def profile_grid(req: PlanRequest) -> list[int]:
    """The token counts to time: --grid, else the quick or the full default grid."""
    if req.grid is not None:
        return prof.parse_grid(req.grid)
    return list(prof.QUICK_GRID if req.quick else prof.DEFAULT_GRID)


def profile_effort(req: PlanRequest) -> prof.Effort:
    return prof.Effort.quick() if req.quick else prof.Effort()


def ensure_profile(req: PlanRequest, pair: Pair, *, force: bool, output: Path | None = None) -> tuple[dict, Path]:
    """This machine's profile for the pair: read from the store when it covers what is asked (the grid, the prefix,
    at least this effort: a --quick profile never stands in for a full one), else measured now (and stored)."""
    fp = machine_fingerprint(pair.device)
    path = output or prof.profile_path(fp["id"], pair.device, pair.dtype, pair.target_args, pair.draft_args,
                                       pair.quant, pair.draft_quant)
    grid, effort = profile_grid(req), profile_effort(req)
    prefix = prof.DEFAULT_PREFIX if req.prefix is None else req.prefix
    if not force and path.is_file():
        try:
            profile = prof.read_profile(path)
        except UsageError:  # from an older profiler: measure again
            profile = {"machine": {}}
        if profile["machine"].get("id") == fp["id"] and prof.is_current(profile):
            shortfall = prof.shortfall(profile, grid, prefix, effort)
            if shortfall is None:
                req.log(f"using profile {path} (made {profile.get('created', '?')}; --remeasure profiles again)")
                return profile, path
            req.log(f"profile {path} {shortfall}; profiling again")
    if output is None:
        check_store(("profiles",))
    req.log(f"profiling {pair.target.name}{f' and draft {pair.draft.name}' if pair.draft else ''} on "
            f"{describe_machine(fp)}, {pair.device.type}, {dtype_name(pair.dtype)}")
    profile = prof.run_profile(pair.target_args, pair.draft_args, pair.device, pair.dtype, grid=grid,
                               prefix=prefix, effort=effort,
                               names=(pair.target.name, pair.draft.name if pair.draft else None),
                               progress=req.progress, log=req.log, quant=pair.quant, draft_quant=pair.draft_quant)
    write_json(path, profile)
    req.log(f"profile written to {path}")
    return profile, path


def ensure_disk_profile(req: PlanRequest, pair: Pair, *, force: bool) -> tuple[dict, Path]:
    """The direct-I/O read bandwidth of the disk the store goes on (--offload-dir, else the runtime home's store
    directory), per reader thread count: read from the planner's store, or measured now (and stored)."""
    directory = Path(req.offload_dir) if req.offload_dir is not None else store_dir("layer-stores")
    fp = machine_fingerprint(pair.device)
    path = store_dir("profiles") / f"disk-{fp['id'][:12]}-{short_hash(str(directory.resolve()), 12)}.json"
    if not force and path.is_file():
        try:
            profile = json.loads(path.read_text())
            if profile.get("kind") == "disk-profile" and profile.get("machine") == fp["id"]:
                req.log(f"using disk profile {path} (made {profile.get('created', '?')})")
                return profile, path
        except (OSError, ValueError):
            pass
    req.log(f"measuring the direct-I/O read bandwidth of {directory}")
    profile = {"kind": "disk-profile", "machine": fp["id"], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               **prof.disk_read_bandwidth(directory, profile_effort(req))}
    write_json(path, profile)
    return profile, path


def disk_reading(req: PlanRequest, disk_profile: dict) -> tuple[int, float]:
    """(reader threads, bytes/s) for the disk tier: as asked, else the fewest threads that reach the bandwidth."""
    if req.read_threads is None:
        return prof.read_threads_for(disk_profile)
    measured = dict(zip(disk_profile["threads"], disk_profile["Bps"]))
    nearest = min(measured, key=lambda t: abs(t - req.read_threads))
    return req.read_threads, float(measured[nearest])


PREFETCH_CHOICES = (1, 2, 3, 4)  # staging buffers the search tries for a disk tier


def given_profile(req: PlanRequest, pair: Pair) -> tuple[dict, Path]:
    """The profile named by --profile, checked against the pair."""
    path = Path(req.profile)
    if req.grid is not None or req.prefix is not None:
        req.log(f"note: --grid and --prefix are not used with --profile {req.profile} (its own are)")
    profile = prof.read_profile(path)
    prof.check_profile(profile, pair.device, pair.dtype, pair.target_args, pair.draft_args, req.profile)
    if profile["machine"].get("id") != machine_fingerprint(pair.device)["id"]:
        req.log(f"note: profile {req.profile} was made on another machine ({describe_machine(profile['machine'])})")
    return profile, path


def _prompts(req: PlanRequest) -> tuple[list | None, str]:
    prompts = acc.read_prompts(req.prompts) if req.prompts else None
    source = req.prompts or "built-in"
    if req.limit is not None:
        prompts = (prompts if prompts is not None else list(acc.BUILTIN_PROMPTS))[: req.limit]
    return prompts, source


def ensure_acceptance(req: PlanRequest, pair: Pair, temperature: float, top_p: float, *, force: bool,
                      output: Path | None = None) -> tuple[acc.AcceptanceResult, Path]:
    """The pair's acceptance measurement at these settings: read from the store, or measured now (and stored)."""
    prompts, source = _prompts(req)
    sha = acc.prompts_sha(prompts if prompts is not None else list(acc.BUILTIN_PROMPTS))
    path = output or acc.acceptance_path(pair.target, pair.draft, temperature, top_p, req.width, sha, pair.formats)
    if not force and path.is_file():
        result = acc.read_acceptance(path)
        if result.max_new_tokens == req.max_new_tokens and result.seed == req.seed:
            req.log(f"using acceptance {path} ({result.steps} steps, measured {result.created})")
            return result, path
    if output is None:
        check_store(("acceptance",))
    req.log(f"measuring acceptance of {pair.draft.name} for {pair.target.name}: width {req.width}, temperature "
            f"{temperature:g}, top-p {top_p:g}, {req.max_new_tokens} tokens per prompt")
    result = acc.measure_acceptance(pair.target, pair.draft, device=pair.device, dtype=pair.dtype,
                                    temperature=temperature, top_p=top_p, width=req.width, prompts=prompts,
                                    prompts_source=source, max_new_tokens=req.max_new_tokens, seed=req.seed,
                                    batch_size=req.acceptance_batch, progress=req.progress, log=req.log,
                                    engine_options=engine_options(req))
    acc.save_acceptance(result, path)
    req.log(f"acceptance written to {path}")
    if pair.device.type == "cuda":  # the measuring engine is gone: give its memory back before residency is planned
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return result, path


def given_acceptance(spec: str) -> dict[str, Any]:
    """--acceptance as given: 'default', a file of `acceptance`, or a vector like 0.7,0.1,0.05."""
    if spec == "default":
        return {"p": list(DEFAULT_ACCEPTANCE), "se": None, "steps": None, "source": "default", "file": None,
                "confidence": None}
    path = Path(spec).expanduser()
    if path.is_file():
        result = acc.read_acceptance(path)
        return {"p": result.p, "se": result.se, "steps": result.steps, "source": "given", "file": str(spec),
                "confidence": result.confidence}
    if spec.endswith(".json") or os.sep in spec or "/" in spec:  # meant as a file: say so, not "bad vector"
        raise UsageError(f"acceptance file {spec} {'is not a file' if path.exists() else 'does not exist'}; "
                         f"measure one with `python -m planner acceptance --output {spec}` (and the plan's --model "
                         f"and --draft), or give a vector like 0.7,0.1,0.05, or 'default'")
    return {"p": acc.parse_vector(spec), "se": None, "steps": None, "source": "given", "file": None,
            "confidence": None}


def acceptance_vector(req: PlanRequest, pair: Pair, temperature: float, top_p: float) -> dict[str, Any]:
    """p[1..W] with where it came from: given, measured (from the store or now), or the default assumption."""
    spec = req.acceptance
    if spec is None and (pair.target.is_preset or pair.draft.is_preset):
        req.log("no weights to measure acceptance with; using the default acceptance vector (an assumption "
                "shaped like Sequoia's Llama-2 measurements); pass --acceptance to give one")
        spec = "default"
    if spec is not None:
        return given_acceptance(spec)
    result, path = ensure_acceptance(req, pair, temperature, top_p, force=req.remeasure)
    if result.confidence is None:
        req.log(f"{path} predates the confidence measurement dynamic trees are keyed by; they use the draft's own "
                f"probabilities (pass --remeasure to measure it)")
    return {"p": result.p, "se": result.se, "steps": result.steps, "source": "measured", "file": str(path),
            "confidence": result.confidence}


# --- the plan


@dataclass
class PlanResult:
    plan: Plan
    time_model: opt.TimeModel  # calibrated, with the chosen resident layers
    choice: opt.BatchChoice
    policy: opt.PolicyChoice | None = None  # static against dynamic trees, when measured


# Budgets of dynamic trees the plan measures: one real-engine run each (a quarter of the sizes of tools/ablations'
# sweep: an offloaded 70B step takes seconds).
DYNAMIC_SIZES = (4, 16, 64, 256, 1024)
QUICK_DYNAMIC_SIZES = (4, 16)


def asked_dynamic_sizes(text: str) -> list[int]:
    """--dynamic-sizes '16,64,256' -> [16, 64, 256]."""
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--dynamic-sizes: cannot read {text!r}; write it like 16,64,256") from None
    if not sizes or sizes[0] < 2:
        raise UsageError(f"--dynamic-sizes needs budgets >= 2 nodes, got {text!r}")
    return sizes


def dynamic_sizes(req: PlanRequest, max_seq_len: int) -> list[int]:
    """The budgets to measure: asked, or the defaults up to --max-tree and half the context window."""
    if req.dynamic_sizes is not None:
        return asked_dynamic_sizes(req.dynamic_sizes)
    return [n for n in (QUICK_DYNAMIC_SIZES if req.quick else DYNAMIC_SIZES) if n <= min(req.max_tree, max_seq_len // 2)]


def choose_tree_policy(req: PlanRequest, pair: Pair, tm: opt.TimeModel, best: opt.BatchChoice,
                       confidence: dict[str, Any] | None, temperature: float, top_p: float, budget: int | None,
                       max_seq_len: int, options: dict[str, Any]) -> tuple[opt.PolicyChoice, dict[str, Any] | None]:
    """Measure Sequoia's chosen tree and dynamic trees of several budgets on the real engine (same prompts and seeds),
    predict each one's tokens/s with the time model (draft cost as measured), and keep the faster; with the plan's
    `dynamic` record (budget, calibration, every measurement, the reason)."""
    c = best.optimum.best
    static_only = opt.PolicyChoice("static", c, [], "static: only Sequoia's tree was planned (--policy static)")
    if req.policy == "static":
        return static_only, None
    if pair.target.is_preset or pair.draft.is_preset:
        if req.policy == "dynamic":
            raise UsageError("dynamic trees are measured on the real models; a shape preset has no weights "
                             "(give checkpoints, or --policy static)")
        return opt.PolicyChoice("static", c, [], "static: shape presets have no weights to measure dynamic trees "
                                                 "on"), None
    from offload_runtime.spec.growth import ConfidenceAcceptance, DynamicTree

    from .calibrate import measure_trees

    sizes = dynamic_sizes(req, max_seq_len)
    if req.dynamic_sizes is None and c.n >= 2 and sizes:
        sizes = sorted(set(sizes) | {c.n})  # and at the static tree's own size: the like-for-like comparison
    if not sizes:
        return opt.PolicyChoice("static", c, [], f"static: no dynamic budget fits --max-tree {req.max_tree}"), None
    calibration = ConfidenceAcceptance.from_dict(confidence) if confidence else None
    depth = max(1, req.max_depth)
    grown = [DynamicTree(n, depth, acceptance=calibration) for n in sizes]
    req.log(f"measuring Sequoia's {c.n}-node tree against dynamic trees of {', '.join(map(str, sizes))} nodes "
            f"(depth <= {depth}) on the real engine")
    measured = measure_trees(str(pair.target.path), pair.draft.loads_as, [list(c.parents)] + grown,
                             device=pair.device, dtype=pair.dtype, temperature=temperature, top_p=top_p,
                             batch=best.batch, offload=best.residency.offload, gpu_memory=budget,
                             prompts=2 if req.quick else max(4, best.batch), tokens=12 if req.quick else 32,
                             seed=req.seed, max_seq_len=max_seq_len, engine_options=options)
    static = opt.evaluate_measured(c.n, c.depth, measured[0], tm, best.batch, parents=c.parents)
    dynamic = [opt.evaluate_measured(n, depth, m, tm, best.batch) for n, m in zip(sizes, measured[1:])]
    choice = opt.choose_policy(static, dynamic, forced="dynamic" if req.policy == "dynamic" else None)
    req.log(choice.reason)
    top = choice.best_dynamic
    record = {"size": top.n, "depth": depth, "width": None, "acceptance": confidence,
              "keyed_by": DynamicTree(top.n, depth, acceptance=calibration).model.describe(),
              "candidates": [{"n": cand.n, "measured": m, "predicted": cand.row()}
                             for m, cand in zip(measured[1:], dynamic)],
              "static": {"n": static.n, "measured": measured[0], "predicted": static.row()},
              "reason": choice.reason}
    return choice, record


def _calibration_time(req: PlanRequest) -> float:
    if req.calibration_time is not None:
        return req.calibration_time
    return 0.0 if req.quick else 20.0


def batch_sizes(req: PlanRequest) -> list[int]:
    if req.batch_size == "auto":
        return [2 ** k for k in range(int(math.log2(req.max_batch)) + 1)]
    return [int(req.batch_size)]


def check_self_draft(pair: Pair, req: PlanRequest, budget: int | None, max_seq_len: int) -> None:
    """A self-draft's low-bit copy must fit the device beside what the target needs there at the least (one-node
    trees, batch 1); else one line that suggests fewer bits or an external draft (api/self_draft.py)."""
    if pair.draft is None or not pair.draft.is_self_draft:
        return
    fixed = fixed_device_bytes(pair.target_args, pair.dtype, draft_args=pair.draft_args, batch=1,
                               max_seq_len=max_seq_len, tree_size=1, max_chunk=1, slots=req.slots,
                               on_cuda=pair.device.type == "cuda", quant=pair.quant, draft_quant=pair.draft_quant,
                               draft_shares_globals=True)
    check_self_draft_fits(pair.draft.name, fixed, device_budget_bytes(budget, pair.device), pair.draft_quant,
                          pair.target_args)


def search(p: Sequence[float], tm: opt.TimeModel, pair: Pair, req: PlanRequest, budget: int | None,
           max_seq_len: int, host_budget: int | None = None) -> tuple[opt.BatchChoice, list[opt.BatchChoice]]:
    """The best (tree, batch, resident layers, and under a host budget: staging buffers) for this time model and
    acceptance vector. Each extra staging buffer takes one layer's room from the host, so a deeper prefetch
    hides more of the reads between sweeps but reads more every sweep: the search weighs the two."""
    check_self_draft(pair, req, budget, max_seq_len)
    def searched(prefetch: int) -> tuple[opt.BatchChoice, list[opt.BatchChoice]]:
        def residency_of(B: int):
            return opt.residency(pair.target_args, pair.dtype, pair.device, draft=pair.draft_args,
                                 budget_bytes=budget, batch=B, max_seq_len=max_seq_len, max_tree=req.max_tree,
                                 slots=req.slots, offload=req.offload, host_budget=host_budget, prefetch=prefetch,
                                 quant=pair.quant, draft_quant=pair.draft_quant,
                                 draft_shares_globals=pair.draft.is_self_draft)

        return opt.optimize_batch(p, tm, batch_sizes(req), residency_of, max_tree=req.max_tree,
                                  max_depth=req.max_depth, top=req.top)

    if host_budget is None or req.prefetch is not None:
        return searched(req.prefetch or DEFAULT_PREFETCH)
    found = []
    for prefetch in PREFETCH_CHOICES:
        try:
            found.append(searched(prefetch))
        except ResourceError:  # a ring this deep does not fit the host budget, nor will deeper ones
            break
    if not found:
        return searched(PREFETCH_CHOICES[0])  # raises the budget's own error
    return max(found, key=lambda f: f[0].optimum.best.tokens_per_s)


def build_plan(req: PlanRequest) -> PlanResult:
    """Profile (if missing), acceptance (if missing), the search, a calibration run; the plan (not yet saved)."""
    check_store(PLANNER_STORES + (("layer-stores",) if req.host_memory is not None and req.offload_dir is None
                                  else ()))
    pair = resolve(req)
    need_draft(pair, req, "plan")
    check_weights(pair, req)
    if req.max_depth < 0:
        raise UsageError(f"--max-depth must be >= 0, got {req.max_depth}")
    temperature, top_p = sampling(req, pair)
    budget = None if req.gpu_memory is None else parse_bytes(req.gpu_memory)
    host_budget = None if req.host_memory is None else parse_bytes(req.host_memory)
    limit = pair.target_args.max_position_embeddings
    max_seq_len = min(limit, 4096) if req.max_seq_len is None else req.max_seq_len
    if max_seq_len > limit:
        raise UsageError(f"--max-seq-len {max_seq_len} exceeds the model's context window ({limit})")
    check_self_draft(pair, req, budget, max_seq_len)  # before minutes of profiling
    profile, profile_path = given_profile(req, pair) if req.profile else ensure_profile(req, pair,
                                                                                       force=req.remeasure)
    acceptance = acceptance_vector(req, pair, temperature, top_p)
    p = acceptance["p"]
    n_layers = pair.target_args.n_layers
    disk_profile = disk_path = None
    read_threads, disk_bw = DEFAULT_READ_THREADS, math.inf
    if host_budget is not None:
        disk_profile, disk_path = ensure_disk_profile(req, pair, force=req.remeasure)
        read_threads, disk_bw = disk_reading(req, disk_profile)
    tm = opt.time_model_from_profile(profile, resident=n_layers, n_layers=n_layers, temperature=temperature,
                                     top_p=top_p, disk_bandwidth=disk_bw)
    best, choices = search(p, tm, pair, req, budget, max_seq_len, host_budget)
    calibration = None
    if not req.no_calibrate and not (pair.target.is_preset or pair.draft.is_preset) and best.optimum.best.n > 1:
        from .calibrate import measure_step_split

        tree = list(best.optimum.best.parents)
        req.log(f"calibrating on {best.optimum.best.n}-node trees with the real engine")
        streamed = best.residency.offload
        measured = measure_step_split(str(pair.target.path), pair.draft.loads_as, device=pair.device,
                                      dtype=pair.dtype, tree=tree, temperature=temperature, top_p=top_p,
                                      batch=best.batch, offload=streamed, gpu_memory=budget,
                                      host_memory=host_budget, prefetch=best.residency.prefetch or None,
                                      read_threads=read_threads, offload_dir=req.offload_dir,
                                      tokens=16 if streamed else 64,  # streamed steps are slow
                                      min_time=_calibration_time(req), engine_options=engine_options(req),
                                      reference=not streamed)  # plain streamed decoding is slower still
        tm = tm.with_residency(best.residency).calibrated(measured, tree, best.batch)
        calibration = {"tree": tree, "batch": best.batch, "measured": measured,
                       "factors": {"draft": tm.draft_scale, "verify": tm.verify_scale, "host": tm.host_scale}}
        best, choices = search(p, tm, pair, req, budget, max_seq_len, host_budget)
    c = best.optimum.best
    tm_best = tm.with_residency(best.residency)
    res = best.residency
    confidence = acceptance.pop("confidence")
    # The dynamic measurement loads the pair as the plan runs it (as the calibration does).
    options = {**engine_options(req), "host_memory": host_budget, "prefetch": res.prefetch or None,
               "read_threads": read_threads, "offload_dir": req.offload_dir}
    choice, dynamic = choose_tree_policy(req, pair, tm_best, best, confidence, temperature, top_p, budget,
                                         max_seq_len, options)
    figures = {
        "profile": str(profile_path), "profile_created": profile.get("created"),
        "bandwidth_Bps": profile["bandwidth_Bps"], "layer_bytes": profile["layer_bytes"],
        "layer_copy_s": profile["layer_copy_s"], "copy_bandwidth_Bps": tm_best.bandwidth,
        "overlap": tm_best.overlap, "stream_s": tm_best.stream_s if res.offload else 0.0, "disk_s": tm_best.disk_s,
        "prefix": profile.get("prefix"), "threads": profile.get("threads"), "grid": profile["grid"],
        "layer_s": profile["layer_s"], "head_s": profile["head_s"], "host_s": profile["host_s"],
        "warp_s": profile["warp_s"], "draft_level_s": profile["draft_level_s"], "calibration": calibration,
        # Quantized targets: the format and up to how many tokens the int kernel runs (the engine follows it).
        "quant": profile.get("quant"), "quant_kernel": profile.get("quant_kernel"),
    }
    row = choice.chosen.row() if choice.policy == "dynamic" else c.row()
    predicted = {k: row[k] for k in ("tokens_per_step", "step_s", "draft_s", "verify_s", "host_s", "s_per_token",
                                     "tokens_per_s")}
    plan = Plan(
        target=pair.target, draft=pair.draft, device=pair.device.type, dtype=dtype_name(pair.dtype),
        temperature=temperature, top_p=top_p, batch_size=best.batch, machine=machine_fingerprint(pair.device),
        tree=list(c.parents), resident_layers=list(res.resident), n_layers=n_layers, offload=res.offload,
        gpu_memory=budget, max_seq_len=max_seq_len, slots=req.slots, acceptance={**acceptance, "width": len(p)},
        figures=figures, predicted=predicted, candidates=[r.row() for r in best.optimum.ranked],
        search={"max_tree": req.max_tree, "max_depth": req.max_depth, "batch_sizes": batch_sizes(req),
                "evaluated": best.optimum.evaluated, "pairs": best.optimum.candidates,
                "per_batch": [{"batch": ch.batch, "resident": len(ch.residency.resident),
                               **{k: ch.optimum.best.row()[k] for k in ("n", "depth", "tokens_per_s", "s_per_token")}}
                              for ch in choices]},
        weights={} if pair.formats == (None, None) else {
            "target": pair.formats[0], "draft": pair.formats[1], "flags": quantize_flags(req.quantize, req.group_size, req.draft_quantize)},
        storage={} if host_budget is None else {
            "host_memory": host_budget, "prefetch": res.prefetch or None, "read_threads": read_threads,
            "host_layers": list(res.host), "disk_layers": list(res.disk), "disk_Bps": disk_bw,
            "disk_profile": str(disk_path), "offload_dir": req.offload_dir},
        policy=choice.policy, dynamic=dynamic,
    )
    return PlanResult(plan, tm_best, best, choice)


def make_plan(req: PlanRequest, output: str | Path | None = None) -> PlanResult:
    """build_plan, then save it to the store (and to `output` too when given: a new file or a plan, checked first)."""
    check_output(output, "plan", read_plan)
    result = build_plan(req)
    result.plan.path = save_plan(result.plan)
    if output is not None:
        save_plan(result.plan, output)
    return result


# --- which draft


@dataclass
class DraftOption:
    """One draft the comparison planned: its plan, or why it could not be planned (does not fit, ...)."""

    draft: str  # a draft name, a self-draft spelling, or "none" (plain decoding)
    tokens_per_s: float | None  # predicted; None where refused
    tokens_per_step: float | None
    plan: Plan | None = None
    refused: str | None = None  # the one-line reason


@dataclass
class DraftComparison:
    options: list[DraftOption]

    @property
    def best(self) -> DraftOption:
        """The fastest predicted; on a tie, no draft (a draft that gains nothing costs its memory)."""
        return max((o for o in self.options if o.tokens_per_s is not None),
                   key=lambda o: (o.tokens_per_s, o.draft == "none"))


def compare_drafts(req: PlanRequest, drafts: Sequence[str]) -> DraftComparison:
    """A plan for each draft (external checkpoints and self-drafts alike, each measured and saved like any pair's),
    and plain decoding with the target's own residency, ranked by predicted tokens/s. A draft that cannot be
    planned here (a self-draft too large for the device budget, ...) is listed with its one-line reason."""
    from offload_runtime.errors import OffloadError

    def for_draft(name: str | None) -> PlanRequest:  # --group-size is the self-drafts' unless something else is quantized
        uses_group = (name is not None and is_self_draft(name)) or req.quantize or req.draft_quantize
        return dataclasses.replace(req, draft=name, no_draft=name is None,
                                   group_size=req.group_size if uses_group else None)

    options, plain = [], None
    for name in drafts:
        try:
            result = make_plan(for_draft(name))
        except OffloadError as e:
            options.append(DraftOption(name, None, None, refused=str(e)))
            req.log(f"draft {name}: not planned: {e}")
            continue
        plan = result.plan
        options.append(DraftOption(name, plan.predicted["tokens_per_s"], plan.predicted["tokens_per_step"], plan))
        if plain is None:  # the same time model, with the residency the target gets when nothing drafts
            pair = resolve(for_draft(None))
            alone = opt.residency(pair.target_args, pair.dtype, pair.device, draft=None,
                                  budget_bytes=plan.gpu_memory, batch=1, max_seq_len=plan.max_seq_len, max_tree=1,
                                  slots=req.slots, offload=req.offload,
                                  host_budget=plan.storage.get("host_memory"), quant=pair.quant)
            row = opt.evaluate([-1], 1.0, result.time_model.with_residency(alone)).row()
            plain = DraftOption("none", row["tokens_per_s"], 1.0)
    if plain is None:
        raise UsageError("none of the drafts could be planned: " + "; ".join(f"{o.draft}: {o.refused}" for o in options))
    # A one-node plan drafts nothing: it is plain decoding, whatever its own profile's timings (each pair's profile
    # is measured on its own, so on a busy machine their target curves differ by noise).
    for o in options:
        if o.plan is not None and o.plan.policy == "static" and o.plan.n == 1:
            o.tokens_per_s = plain.tokens_per_s
    return DraftComparison(options + [plain])
