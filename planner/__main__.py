"""`python -m planner <command>` (console script: offload-planner): profile, acceptance, plan, show.

    python -m planner profile --model llama-2-70b            # this machine's copy and compute curves
    python -m planner acceptance --model M --draft D         # the pair's acceptance vector
    python -m planner plan --model M --draft D               # runs the missing steps, writes the plan
    python -m planner show [PLAN.json | --model M --draft D]

Results live under $OFFLOAD_RUNTIME_HOME (default ~/.cache/offload_runtime): profiles/, acceptance/, plans/.
The runtime picks up the matching plan by itself (Engine.from_pretrained(..., plan="auto")).
Tables go to stdout; notices and progress bars to stderr.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from offload_runtime.cli import ArgumentParser, run_main
from offload_runtime.errors import UsageError

PROG = "python -m planner"


def _notice(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _progress() -> bool:
    return sys.stderr.isatty()


# --- arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text}")
    return value


def _batch(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def _common(p: argparse.ArgumentParser, draft_required: bool = False) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory, HF repo id (cached), alias or shape preset")
    p.add_argument("--draft", required=False,
                   help="draft model (default: the model's default draft)" + (" [needed]" if draft_required else ""))
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float16, bfloat16, float32 (default: as the runtime picks)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature, 0 = greedy (default: the model's generation_config, else 0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus threshold (default: generation_config, else 1)")


def _acceptance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default=None, help="JSONL file of {\"prompt\": ...} (default: a built-in set)")
    p.add_argument("--width", type=_positive_int, default=16, help="children per one-level tree (default 16)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens generated per prompt (default 64)")
    p.add_argument("--limit", type=_positive_int, default=None, help="use only the first N prompts")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--acceptance-batch", type=_positive_int, default=8,
                   help="prompts sharing each target sweep while measuring acceptance (default 8)")


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", default=None, help="token counts to time, e.g. 1,2,4,8 or 1-4096 (default: 1..4096)")
    p.add_argument("--prefix", type=int, default=None, help="cached tokens the timed ones attend to (default 512)")
    p.add_argument("--quick", action="store_true", help="a small grid and few repeats (tests, smoke runs)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description="Profile the machine, measure acceptance, and plan the tree.")
    sub = parser.add_subparsers(dest="command", metavar="{profile,acceptance,plan,show}",
                                parser_class=ArgumentParser)
    sub.required = True

    p = sub.add_parser("profile", help="measure bandwidth and time curves on this machine")
    _common(p)
    p.add_argument("--no-draft", action="store_true", help="profile the target only")
    _profile_args(p)
    p.add_argument("--output", default=None, help="write the profile here (default: the planner's store)")

    a = sub.add_parser("acceptance", help="measure the pair's acceptance vector")
    _common(a)
    _sampling(a)
    _acceptance_args(a)
    a.add_argument("--output", default=None, help="write the result here (default: the planner's store)")

    pl = sub.add_parser("plan", help="choose the tree, batch and resident layers; write the plan")
    _common(pl)
    _sampling(pl)
    pl.add_argument("--gpu-memory", default=None, help="device budget, e.g. 20GiB (default: free memory)")
    pl.add_argument("--max-tree", type=_positive_int, default=1024, help="largest tree considered (default 1024)")
    pl.add_argument("--max-depth", type=int, default=16, help="deepest tree considered (default 16)")
    pl.add_argument("--batch-size", type=_batch, default=1, help="sequences per sweep: N or auto (default 1)")
    pl.add_argument("--max-batch", type=_positive_int, default=64, help="largest batch auto tries (default 64)")
    pl.add_argument("--max-seq-len", type=_positive_int, default=None, help="context to allocate (default 4096 or less)")
    pl.add_argument("--slots", type=_positive_int, default=2, help="device staging slots (default 2)")
    o = pl.add_mutually_exclusive_group()
    o.add_argument("--offload", action="store_true", default=None, help="stream the target's layers")
    o.add_argument("--no-offload", dest="offload", action="store_false", help="keep the whole target resident")
    pl.add_argument("--acceptance", default=None,
                    help="acceptance vector: a file from `acceptance`, a list like 0.7,0.1,0.05, or 'default'")
    pl.add_argument("--profile", default=None, help="profile file to use (default: this machine's, made if missing)")
    _profile_args(pl)
    _acceptance_args(pl)
    pl.add_argument("--remeasure", action="store_true", help="profile and measure acceptance again")
    pl.add_argument("--no-calibrate", action="store_true",
                    help="skip the short real-engine run that scales the time model to measured step times")
    pl.add_argument("--calibration-time", type=_seconds, default=None,
                    help="seconds of real engine steps to calibrate on (default 20; --quick: one reply)")
    pl.add_argument("--top", type=_positive_int, default=10, help="candidates in the table (default 10)")
    pl.add_argument("--plot", default=None, help="also plot tokens/s vs tree size into this PNG (needs matplotlib)")
    pl.add_argument("--output", default=None, help="write the plan here too (the store always gets a copy)")

    s = sub.add_parser("show", help="print a plan")
    s.add_argument("path", nargs="?", default=None, help="plan file (default: the plan for --model/--draft)")
    s.add_argument("--model", default=None)
    s.add_argument("--draft", default=None)
    s.add_argument("--device", default=None)
    s.add_argument("--dtype", default=None)
    _sampling(s)
    s.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return parser.parse_args(argv)


# --- shared steps


def _setup(args: argparse.Namespace):
    """(device, target ref, target args, draft ref | None, draft args | None, dtype)."""
    import torch

    from offload_runtime import registry
    from offload_runtime.engine import parse_device, parse_dtype

    from .plan import resolve_model

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    dev = parse_device(args.device)
    tref, targs, note = resolve_model(args.model)
    if note:
        _notice(note)
    draft_name = args.draft
    if draft_name is None and not getattr(args, "no_draft", False):
        draft_name = registry.default_draft(args.model)
    dref = dargs = None
    if draft_name is not None:
        dref, dargs, note = resolve_model(draft_name)
        if note:
            _notice(note)
    dt = parse_dtype(args.dtype, dev, targs.torch_dtype)
    return dev, tref, targs, dref, dargs, dt


def _need_draft(dref, model: str, command: str) -> None:
    if dref is None:
        raise UsageError(f"`{command}` needs a draft model: {model} has no default draft; pass --draft D")


def _calibration_time(args: argparse.Namespace) -> float:
    if args.calibration_time is not None:
        return args.calibration_time
    return 0.0 if args.quick else 20.0


def _grid(args: argparse.Namespace) -> list[int]:
    from . import hardware

    if args.grid is not None:
        return hardware.parse_grid(args.grid)
    return list(hardware.QUICK_GRID if args.quick else hardware.DEFAULT_GRID)


def ensure_profile(args: argparse.Namespace, dev, tref, targs, dref, dargs, dt, *, force: bool) -> tuple[dict, Path]:
    """This machine's profile for the pair: read from the store, or measured now (and stored)."""
    from . import hardware

    fp = hardware.machine_fingerprint(dev)
    path = Path(args.output) if getattr(args, "output", None) and args.command == "profile" else \
        hardware.profile_path(fp["id"], dev, dt, targs, dargs)
    if not force and path.is_file():
        try:
            profile = hardware.read_profile(path)
        except UsageError:  # from an older profiler: measure again
            profile = {"machine": {}}
        if profile["machine"].get("id") == fp["id"] and hardware.is_current(profile):
            _notice(f"using profile {path} (made {profile.get('created', '?')})")
            return profile, path
    _notice(f"profiling {tref.name}{f' and draft {dref.name}' if dref else ''} on {hardware.describe_machine(fp)}, "
            f"{dev.type}, {str(dt).replace('torch.', '')}")
    effort = hardware.Effort.quick() if args.quick else hardware.Effort()
    prefix = hardware.DEFAULT_PREFIX if args.prefix is None else args.prefix
    profile = hardware.run_profile(targs, dargs, dev, dt, grid=_grid(args), prefix=prefix, effort=effort,
                                   names=(tref.name, dref.name if dref else None), progress=_progress(),
                                   log=_notice)
    hardware.write_json(path, profile)
    _notice(f"profile written to {path}")
    return profile, path


def _sampling_values(args: argparse.Namespace, tref) -> tuple[float, float]:
    from .plan import default_sampling

    t0, p0 = default_sampling(tref.path)
    temperature = t0 if args.temperature is None else args.temperature
    top_p = p0 if args.top_p is None else args.top_p
    return float(temperature), float(top_p)


def _prompts(args: argparse.Namespace) -> tuple[list | None, str]:
    from .acceptance import BUILTIN_PROMPTS, read_prompts

    prompts = read_prompts(args.prompts) if args.prompts else None
    source = args.prompts or "built-in"
    if args.limit is not None:
        prompts = (prompts if prompts is not None else list(BUILTIN_PROMPTS))[: args.limit]
    return prompts, source


def ensure_acceptance(args: argparse.Namespace, dev, tref, dref, dt, temperature: float, top_p: float, *,
                      force: bool, output: Path | None = None):
    """The pair's acceptance measurement at these settings: read from the store, or measured now (and stored)."""
    from . import acceptance as acc

    prompts, source = _prompts(args)
    sha = acc._prompts_sha(prompts if prompts is not None else list(acc.BUILTIN_PROMPTS))
    path = output or acc.acceptance_path(tref, dref, temperature, top_p, args.width, sha)
    if not force and path.is_file():
        result = acc.read_acceptance(path)
        if result.max_new_tokens == args.max_new_tokens and result.seed == args.seed:
            _notice(f"using acceptance {path} ({result.steps} steps, measured {result.created})")
            return result, path
    _notice(f"measuring acceptance of {dref.name} for {tref.name}: width {args.width}, temperature {temperature:g}, "
            f"top-p {top_p:g}, {args.max_new_tokens} tokens per prompt")
    result = acc.measure_acceptance(tref, dref, device=dev, dtype=dt, temperature=temperature, top_p=top_p,
                                    width=args.width, prompts=prompts, prompts_source=source,
                                    max_new_tokens=args.max_new_tokens, seed=args.seed,
                                    batch_size=args.acceptance_batch, progress=_progress(),
                                    log=_notice)
    acc.save_acceptance(result, path)
    _notice(f"acceptance written to {path}")
    if dev.type == "cuda":  # the measuring engine is gone: give its memory back before residency is planned
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
    return result, path


# --- tables


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.3g}"


def _candidate_rows(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[i + 1, r["n"], r["depth"], r["batch"], f"{r['tokens_per_step']:.3f}", _ms(r["draft_s"]),
             _ms(r["verify_s"]), _ms(r["host_s"]), f"{r['s_per_token']:.4g}", f"{r['tokens_per_s']:.4g}"]
            for i, r in enumerate(rows)]


CANDIDATE_HEADERS = ("rank", "nodes", "depth", "batch", "tokens/step", "draft ms", "verify ms", "host ms",
                     "s/token", "tokens/s")


# --- commands


def cmd_profile(args: argparse.Namespace) -> int:
    from . import hardware

    dev, tref, targs, dref, dargs, dt = _setup(args)
    if dref is None and not args.no_draft:
        _notice(f"{args.model} has no default draft; profiling the target only (plans need --draft)")
    profile, path = ensure_profile(args, dev, tref, targs, dref, dargs, dt, force=True)
    print(f"machine     {hardware.describe_machine(profile['machine'])}")
    print(f"bandwidth   {profile['bandwidth_Bps'] / 1e9:.3g} GB/s ({'pinned host-to-device' if profile['pinned'] else 'memcpy'}, "
          f"{profile['bandwidth_copy_bytes'] / 2**20:.0f} MiB copies)")
    print(f"one layer   {profile['layer_bytes'] / 2**20:.4g} MiB, copied in {_ms(profile['layer_copy_s'])} ms")
    level = profile["draft_level_s"] or [None] * len(profile["grid"])
    rows = [[n, _ms(a), _ms(b), _ms(c), _ms(d)] for n, a, b, c, d in
            zip(profile["grid"], profile["layer_s"], profile["head_s"], profile["host_s"], level)]
    print(_table(("tokens", "layer ms", "head ms", "host ms", "draft level ms"), rows))
    print(f"saved to {path}")
    return 0


def cmd_acceptance(args: argparse.Namespace) -> int:
    dev, tref, targs, dref, dargs, dt = _setup(args)
    _need_draft(dref, args.model, "acceptance")
    temperature, top_p = _sampling_values(args, tref)
    result, path = ensure_acceptance(args, dev, tref, dref, dt, temperature, top_p, force=True,
                                     output=Path(args.output) if args.output else None)
    print(f"acceptance of {dref.name} for {tref.name}: temperature {temperature:g}, top-p {top_p:g}, "
          f"width {result.width}, {result.steps} steps over {result.prompts['count']} prompts")
    rows = [[k + 1, f"{p:.4f}", f"{se:.4f}", c] for k, (p, se, c) in enumerate(zip(result.p, result.se, result.counts))]
    rows.append(["none", f"{result.none / result.steps:.4f}", "", result.none])
    print(_table(("rank", "p", "std err", "count"), rows))
    print(f"tokens per step with this one-level tree: {result.tokens_per_step:.3f}")
    print(f"saved to {path}")
    return 0


def _acceptance_vector(args, dev, tref, dref, dt, temperature, top_p) -> dict[str, Any]:
    from . import acceptance as acc
    from .tree_search import DEFAULT_ACCEPTANCE

    spec = args.acceptance
    if spec == "default" or (spec is None and (tref.is_preset or dref.is_preset)):
        if spec is None:
            _notice("no weights to measure acceptance with; using the default acceptance vector (an assumption "
                    "shaped like Sequoia's Llama-2 measurements); pass --acceptance to give one")
        return {"p": list(DEFAULT_ACCEPTANCE), "se": None, "steps": None, "source": "default", "file": None}
    if spec is not None:
        if Path(spec).is_file():
            result = acc.read_acceptance(spec)
            return {"p": result.p, "se": result.se, "steps": result.steps, "source": "given", "file": str(spec)}
        return {"p": acc.parse_vector(spec), "se": None, "steps": None, "source": "given", "file": None}
    result, path = ensure_acceptance(args, dev, tref, dref, dt, temperature, top_p, force=args.remeasure)
    return {"p": result.p, "se": result.se, "steps": result.steps, "source": "measured", "file": str(path)}


def build_plan(args: argparse.Namespace):
    """Profile (if missing), acceptance (if missing), then the search; returns (plan, table, time model, choices)."""
    from offload_runtime.memory import parse_bytes

    from . import hardware
    from . import optimizer as opt
    from .plan import Plan, dtype_name

    dev, tref, targs, dref, dargs, dt = _setup(args)
    _need_draft(dref, args.model, "plan")
    if args.max_depth < 0:
        raise UsageError(f"--max-depth must be >= 0, got {args.max_depth}")
    temperature, top_p = _sampling_values(args, tref)
    from offload_runtime.engine import check_sampling

    check_sampling(temperature, top_p, 1)
    budget = None if args.gpu_memory is None else parse_bytes(args.gpu_memory)
    limit = targs.max_position_embeddings
    max_seq_len = min(limit, 4096) if args.max_seq_len is None else args.max_seq_len
    if max_seq_len > limit:
        raise UsageError(f"--max-seq-len {max_seq_len} exceeds the model's context window ({limit})")

    if args.profile:
        profile, profile_path = hardware.read_profile(Path(args.profile)), Path(args.profile)
        hardware.check_profile(profile, dev, dt, targs, dargs, args.profile)
        if profile["machine"].get("id") != hardware.machine_fingerprint(dev)["id"]:
            _notice(f"note: profile {args.profile} was made on another machine "
                    f"({hardware.describe_machine(profile['machine'])})")
    else:
        profile, profile_path = ensure_profile(args, dev, tref, targs, dref, dargs, dt, force=args.remeasure)
    acceptance = _acceptance_vector(args, dev, tref, dref, dt, temperature, top_p)
    p = acceptance["p"]

    if args.batch_size == "auto":
        batches = [2 ** k for k in range(int(math.log2(args.max_batch)) + 1)]
    else:
        batches = [args.batch_size]

    def residency_of(B: int):
        return opt.residency(targs, dt, dev, draft=dargs, budget_bytes=budget, batch=B, max_seq_len=max_seq_len,
                             max_tree=args.max_tree, slots=args.slots, offload=args.offload)

    tm = opt.time_model_from_profile(profile, resident=targs.n_layers, n_layers=targs.n_layers,
                                     temperature=temperature, top_p=top_p)
    best, choices = opt.optimize_batch(p, tm, batches, residency_of, max_tree=args.max_tree,
                                       max_depth=args.max_depth, top=args.top)
    calibration = None
    if not args.no_calibrate and not (tref.is_preset or dref.is_preset) and best.optimum.best.n > 1:
        from .calibrate import measure_step_split

        tree = list(best.optimum.best.parents)
        _notice(f"calibrating on {best.optimum.best.n}-node trees with the real engine")
        measured = measure_step_split(str(tref.path), str(dref.path), device=dev, dtype=dt, tree=tree,
                                      temperature=temperature, top_p=top_p, batch=best.batch,
                                      offload=best.residency.offload, gpu_memory=budget,
                                      tokens=16 if best.residency.offload else 64,  # streamed steps are slow
                                      min_time=_calibration_time(args),
                                      reference=not best.residency.offload)  # plain streamed decoding is slower still
        tm = tm.with_resident(len(best.residency.resident)).calibrated(measured, tree, best.batch)
        calibration = {"tree": tree, "batch": best.batch, "measured": measured,
                       "factors": {"draft": tm.draft_scale, "verify": tm.verify_scale, "host": tm.host_scale}}
        best, choices = opt.optimize_batch(p, tm, batches, residency_of, max_tree=args.max_tree,
                                           max_depth=args.max_depth, top=args.top)
    c = best.optimum.best
    tm_best = tm.with_resident(len(best.residency.resident))
    res = best.residency
    figures = {
        "profile": str(profile_path), "profile_created": profile.get("created"),
        "bandwidth_Bps": profile["bandwidth_Bps"], "layer_bytes": profile["layer_bytes"],
        "layer_copy_s": profile["layer_copy_s"], "copy_bandwidth_Bps": tm_best.bandwidth,
        "overlap": tm_best.overlap, "stream_s": tm_best.stream_s if res.offload else 0.0,
        "prefix": profile.get("prefix"), "threads": profile.get("threads"), "grid": profile["grid"],
        "layer_s": profile["layer_s"], "head_s": profile["head_s"], "host_s": profile["host_s"],
        "warp_s": profile["warp_s"], "draft_level_s": profile["draft_level_s"], "calibration": calibration,
    }
    row = c.row()
    predicted = {k: row[k] for k in ("tokens_per_step", "step_s", "draft_s", "verify_s", "host_s", "s_per_token",
                                     "tokens_per_s")}
    plan = Plan(
        target=tref, draft=dref, device=dev.type, dtype=dtype_name(dt), temperature=temperature, top_p=top_p,
        batch_size=best.batch, machine=hardware.machine_fingerprint(dev), tree=list(c.parents),
        resident_layers=list(res.resident), n_layers=targs.n_layers, offload=res.offload, gpu_memory=budget,
        max_seq_len=max_seq_len, slots=args.slots, acceptance={**acceptance, "width": len(p)}, figures=figures,
        predicted=predicted, candidates=[r.row() for r in best.optimum.ranked],
        search={"max_tree": args.max_tree, "max_depth": args.max_depth, "batch_sizes": batches,
                "evaluated": best.optimum.evaluated, "pairs": best.optimum.candidates,
                "per_batch": [{"batch": ch.batch, "resident": len(ch.residency.resident),
                               **{k: ch.optimum.best.row()[k] for k in ("n", "depth", "tokens_per_s", "s_per_token")}}
                              for ch in choices]},
    )
    return plan, tm_best, best


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import save_plan

    if args.plot is not None:
        _require_matplotlib()
    plan, tm, best = build_plan(args)
    print(f"plan for {plan.target.name} with draft {plan.draft.name} on {plan.device} ({plan.dtype}), "
          f"temperature {plan.temperature:g}, top-p {plan.top_p:g}")
    print(f"resident layers: {len(plan.resident_layers)} of {plan.n_layers}"
          f"{'' if plan.offload else ' (nothing streams)'}; acceptance: {plan.acceptance['source']}")
    if len(plan.search["per_batch"]) > 1:
        print(_table(("batch", "resident", "nodes", "depth", "tokens/s", "s/token"),
                     [[r["batch"], r["resident"], r["n"], r["depth"], f"{r['tokens_per_s']:.4g}",
                       f"{r['s_per_token']:.4g}"] for r in plan.search["per_batch"]]))
    print(_table(CANDIDATE_HEADERS, _candidate_rows(plan.candidates)))
    path = plan.path = save_plan(plan)
    if args.output:
        path = save_plan(plan, args.output)
    print(f"chosen: {plan.summary()}")
    print(f"plan written to {path}")
    if args.plot is not None:
        plot_throughput(Path(args.plot), plan, tm, best)
        print(f"plot written to {args.plot}")
    return 0


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed: pip install 'offload-runtime[plot]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(path: Path, plan, tm, best) -> None:
    """Predicted tokens/s vs tree size at the chosen depth, the chosen point marked."""
    from .optimizer import throughput_curve
    from .tree_search import best_trees

    plt = _require_matplotlib()
    max_tree = plan.search["max_tree"]
    # The chosen depth; when no tree pays (n = 1), the depth of the best tree among the candidates.
    depth = plan.depth or next((c["depth"] for c in plan.candidates if c["depth"] > 0), 1)
    table = best_trees(plan.acceptance["p"], max_tree, depth)
    ns, tps = throughput_curve(table, tm, depth, max_tree, plan.batch_size)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(ns, tps, lw=1.5, label=f"depth <= {depth}")
    ax.plot([plan.n], [plan.predicted["tokens_per_s"]], "o", ms=8, color="C3",
            label=f"chosen: {plan.n} nodes, {plan.predicted['tokens_per_s']:.3g} tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree size n (nodes)")
    ax.set_ylabel("predicted tokens/s" + (f" (batch {plan.batch_size})" if plan.batch_size > 1 else ""))
    where = plan.machine.get("gpu_name") or plan.machine.get("cpu_model")
    ax.set_title(f"{Path(plan.target.name).name} + {Path(plan.draft.name).name} on {where}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_show(args: argparse.Namespace) -> int:
    from .plan import find_plan, read_plan, stale_reasons

    if args.path is not None:
        plan = read_plan(args.path)
    else:
        if args.model is None or args.draft is None:
            raise UsageError("show needs a plan file, or --model and --draft to find one")
        from offload_runtime.engine import parse_device, parse_dtype

        from .plan import resolve_model

        dev = parse_device(args.device)
        _, targs, _ = resolve_model(args.model)
        dt = parse_dtype(args.dtype, dev, targs.torch_dtype)
        plan, msg = find_plan(args.model, args.draft, dev, dt, args.temperature, args.top_p)
        if plan is None:
            raise UsageError(msg)
    print(f"plan        {plan.path}")
    print(f"created     {plan.created}")
    print(f"models      {plan.target.name} ({plan.target.identity}) with draft {plan.draft.name} ({plan.draft.identity})")
    print(f"machine     {_describe(plan.machine)}")
    print(f"settings    {plan.device}, {plan.dtype}, temperature {plan.temperature:g}, top-p {plan.top_p:g}, "
          f"batch {plan.batch_size}, max_seq_len {plan.max_seq_len}, slots {plan.slots}")
    print(f"tree        {plan.n} nodes, depth {plan.depth}, level widths {plan.to_dict()['level_widths']}")
    print(f"resident    {len(plan.resident_layers)} of {plan.n_layers} layers {plan.resident_layers}"
          f"{'' if plan.offload else ' (nothing streams)'}")
    acc = plan.acceptance
    steps = f" ({acc['steps']} steps)" if acc.get("steps") else ""
    print(f"acceptance  {acc['source']}{steps}: " + ", ".join(f"{x:.3g}" for x in acc["p"]))
    pr = plan.predicted
    print(f"predicted   {pr['s_per_token']:.4g} s/token, {pr['tokens_per_s']:.4g} tokens/s, "
          f"{pr['tokens_per_step']:.3f} tokens/step; step {_ms(pr['step_s'])} ms = draft {_ms(pr['draft_s'])} + "
          f"verify {_ms(pr['verify_s'])} + host {_ms(pr['host_s'])}")
    reasons = stale_reasons(plan)
    print(f"status      {'STALE: ' + '; '.join(reasons) if reasons else 'current'}")
    print(f"parents     {plan.tree}")
    if plan.candidates:
        print(_table(CANDIDATE_HEADERS, _candidate_rows(plan.candidates)))
    return 0


def _describe(machine: dict) -> str:
    from .hardware import describe_machine

    return describe_machine(machine)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "profile": cmd_profile, "acceptance": cmd_acceptance, "plan": cmd_plan, "show": cmd_show,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return COMMANDS[args.command](args)


def entry() -> None:
    run_main(main)


if __name__ == "__main__":
    entry()
