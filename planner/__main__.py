"""`python -m planner <command>` (console script: offload-planner): profile, acceptance, plan, show.

    python -m planner profile --model llama-2-70b            # this machine's copy and compute curves
    python -m planner acceptance --model M --draft D         # the pair's acceptance vector
    python -m planner plan --model M --draft D               # runs the missing steps, writes the plan
    python -m planner show [PLAN.json | --model M [--draft D]]   # the draft defaults as in `plan`

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

from offload_runtime.api.machine import describe_machine
from offload_runtime.cli import DRAFT_HELP, ArgumentParser, add_quantize_args, run_main
from offload_runtime.errors import UsageError

from . import pipeline
from .pipeline import PlanRequest

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
    p.add_argument("--model", required=True,
                   help="checkpoint directory, GGUF file, HF repo id (cached), alias or shape preset")
    p.add_argument("--draft", required=False, help=DRAFT_HELP + (" [needed]" if draft_required else ""))
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float16, bfloat16, float32 (default: as the runtime picks)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's)")
    add_quantize_args(p)
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
    pl.add_argument("--host-memory", default=None,
                    help="host RAM the streamed layers may take, e.g. 20GiB; the rest are read from disk every sweep")
    pl.add_argument("--offload-dir", default=None, help="directory of the disk layer store (its disk is profiled)")
    pl.add_argument("--prefetch", type=_positive_int, default=None,
                    help="staging buffers of the disk tier (default: the search chooses)")
    pl.add_argument("--read-threads", type=_positive_int, default=None,
                    help="disk reader threads (default: the fewest that reach the disk's bandwidth)")
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
    pl.add_argument("--compare-drafts", default=None,
                    help="plan each of these drafts (comma-separated; e.g. demo-draft,self-int4,self-int8) and plain "
                         "decoding, and print them ranked by predicted tokens/s (each plan is saved)")
    pl.add_argument("--policy", choices=("auto", "static", "dynamic"), default="auto",
                    help="tree policy: auto measures Sequoia's static tree against trees grown per step and keeps "
                         "the faster (default); static or dynamic plans that one")
    pl.add_argument("--dynamic-sizes", default=None,
                    help="budgets of dynamic trees to measure, e.g. 16,64,256 (default: 4, 16, 64, 256, 1024 up to "
                         "--max-tree and half the context; --quick: 4,16)")
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


# --- the pipeline, from the command line


def _request(args: argparse.Namespace) -> PlanRequest:
    return PlanRequest.from_namespace(args, log=_notice, progress=_progress())


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
POLICY_HEADERS = ("policy", "nodes", "depth", "tokens/step (measured)", "draft nodes/step", "draft ms", "verify ms",
                  "host ms", "tokens/s")


def _policy_rows(dynamic: dict[str, Any]) -> list[list[Any]]:
    """The measured policies: Sequoia's tree, then each dynamic budget (tokens/step and draft time measured, sweep and
    host time from the time model)."""
    rows = []
    for name, entry in [("static", dynamic["static"])] + [("dynamic", e) for e in dynamic["candidates"]]:
        m, pr = entry["measured"], entry["predicted"]
        se = "" if m["se"] is None or math.isnan(m["se"]) else f" +- {m['se']:.2f}"
        rows.append([name, entry["n"], pr["depth"], f"{m['tokens_per_step']:.3f}{se}", f"{m['draft_nodes']:.1f}",
                     _ms(pr["draft_s"]), _ms(pr["verify_s"]), _ms(pr["host_s"]), f"{pr['tokens_per_s']:.4g}"])
    return rows


def _print_policy(plan) -> None:
    if plan.dynamic is None:
        print(f"policy      {plan.policy} (dynamic trees not measured)")
        return
    print(_table(POLICY_HEADERS, _policy_rows(plan.dynamic)))
    print(f"policy      {plan.dynamic['reason']}")


# --- commands


def cmd_profile(args: argparse.Namespace) -> int:
    from .profile import read_profile

    pipeline.check_output(args.output, "profile", read_profile)
    req = _request(args)
    pair = pipeline.resolve(req)
    if pair.draft is None and not args.no_draft:
        _notice(f"{args.model} has no default draft; profiling the target only (plans need --draft)")
    profile, path = pipeline.ensure_profile(req, pair, force=True, output=Path(args.output) if args.output else None)
    print(f"machine     {describe_machine(profile['machine'])}")
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
    from .acceptance import read_acceptance

    pipeline.check_output(args.output, "acceptance", read_acceptance)
    req = _request(args)
    pair = pipeline.resolve(req)
    pipeline.need_draft(pair, req, "acceptance")
    temperature, top_p = pipeline.sampling(req, pair)
    result, path = pipeline.ensure_acceptance(req, pair, temperature, top_p, force=True,
                                              output=Path(args.output) if args.output else None)
    print(f"acceptance of {pair.draft.name} for {pair.target.name}: temperature {temperature:g}, top-p {top_p:g}, "
          f"width {result.width}, {result.steps} steps over {result.prompts['count']} prompts")
    rows = [[k + 1, f"{p:.4f}", f"{se:.4f}", c] for k, (p, se, c) in enumerate(zip(result.p, result.se, result.counts))]
    rows.append(["none", f"{result.none / result.steps:.4f}", "", result.none])
    print(_table(("rank", "p", "std err", "count"), rows))
    print(f"tokens per step with this one-level tree: {result.tokens_per_step:.3f}")
    print(f"saved to {path}")
    return 0


def cmd_compare_drafts(args: argparse.Namespace) -> int:
    drafts = [d.strip() for d in args.compare_drafts.split(",") if d.strip()]
    if not drafts:
        raise UsageError("--compare-drafts takes draft names, comma-separated: demo-draft,self-int4,self-int8")
    found = pipeline.compare_drafts(_request(args), drafts)
    rows = [[o.draft, "-" if o.tokens_per_s is None else f"{o.tokens_per_s:.4g}",
             "-" if o.tokens_per_step is None else f"{o.tokens_per_step:.3g}",
             (o.plan.describe_tree() + (" (= plain decoding)" if o.plan.policy == "static" and o.plan.n == 1 else ""))
             if o.plan else ("plain decoding" if o.refused is None else f"refused: {o.refused}")]
            for o in found.options]
    print(_table(("draft", "tokens/s", "tokens/step", "tree"), rows))
    best = found.best
    speculates = best.plan is not None and (best.plan.policy == "dynamic" or best.plan.n > 1)
    print("best: " + (f"--draft {best.draft} (plan {best.plan.path})" if speculates else "no draft (--no-draft)"))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    if args.compare_drafts is not None:
        return cmd_compare_drafts(args)
    if args.plot is not None:
        pipeline.check_output(args.plot, "plot", _read_png, flag="--plot")
        _require_matplotlib()
    result = pipeline.make_plan(_request(args), output=args.output)
    plan, tm, best = result.plan, result.time_model, result.choice
    print(f"plan for {plan.target.name} with draft {plan.draft.name} on {plan.device} ({plan.dtype}), "
          f"temperature {plan.temperature:g}, top-p {plan.top_p:g}")
    print(f"resident layers: {len(plan.resident_layers)} of {plan.n_layers}"
          f"{'' if plan.offload else ' (nothing streams)'}; acceptance: {plan.acceptance['source']}")
    if plan.storage.get("disk_layers"):
        st = plan.storage
        print(f"disk tier: {len(st['disk_layers'])} layers read every sweep at {st['disk_Bps'] / 1e9:.3g} GB/s "
              f"({st['read_threads']} reader threads, {st['prefetch']} staging buffers), {len(st['host_layers'])} "
              f"in host RAM")
    if len(plan.search["per_batch"]) > 1:
        print(_table(("batch", "resident", "nodes", "depth", "tokens/s", "s/token"),
                     [[r["batch"], r["resident"], r["n"], r["depth"], f"{r['tokens_per_s']:.4g}",
                       f"{r['s_per_token']:.4g}"] for r in plan.search["per_batch"]]))
    print(_table(CANDIDATE_HEADERS, _candidate_rows(plan.candidates)))
    _print_policy(plan)
    print(f"chosen: {plan.summary()}")
    print(f"plan written to {args.output or plan.path}")
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


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_png(path: Path) -> None:
    """A PNG (what --plot writes) may be replaced; any other file is refused."""
    with open(path, "rb") as f:
        if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            raise UsageError(f"{path} is not a PNG image")


def plot_throughput(path: Path, plan, tm, best) -> None:
    """Predicted tokens/s vs tree size at the chosen depth, the chosen point marked."""
    from offload_runtime.spec.tree_search import best_trees

    from .optimizer import throughput_curve

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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_show(args: argparse.Namespace) -> int:
    from offload_runtime.api.plans import find_plan, read_plan, stale_reasons

    if args.path is not None:
        plan = read_plan(args.path)
    else:
        if args.model is None:
            raise UsageError("show needs a plan file, or --model (and --draft, default: the model's default draft) "
                             "to find one")
        req = PlanRequest(model=args.model, draft=args.draft, device=args.device, dtype=args.dtype, log=_notice)
        pair = pipeline.resolve(req)  # the draft defaults as `plan`'s does
        pipeline.need_draft(pair, req, "show")
        plan, msg = find_plan(args.model, pair.draft.name, pair.device, pair.dtype, args.temperature, args.top_p,
                              target_ref=pair.target, draft_ref=pair.draft, formats=pair.formats)
        if plan is None:
            raise UsageError(msg)
    print(f"plan        {plan.path}")
    print(f"created     {plan.created}")
    print(f"models      {plan.target.name} ({plan.target.identity}) with draft {plan.draft.name} ({plan.draft.identity})")
    print(f"machine     {_describe(plan.machine)}")
    print(f"settings    {plan.device}, {plan.dtype}, temperature {plan.temperature:g}, top-p {plan.top_p:g}, "
          f"batch {plan.batch_size}, max_seq_len {plan.max_seq_len}, slots {plan.slots}")
    if plan.policy == "dynamic":
        d = plan.dynamic
        print(f"tree        grown per step: up to {d['size']} nodes, depth <= {d['depth']}, keyed by {d['keyed_by']}")
        print(f"static      {plan.n} nodes, depth {plan.depth} (tree='static' uses it)")
    else:
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
    _print_policy(plan)
    return 0


def _describe(machine: dict) -> str:
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
