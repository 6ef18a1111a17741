"""Quantized layers on the CPU: bytes per sweep, streamed sweep time, plain greedy tokens/s, speculative decoding;
with --gguf the GGUF files' rows, with --gpu the CUDA rows.

    python tools/bench_quant.py [--quick] [--threads 2] [--new-tokens 48] [--repeats 3] [--markdown out.md]
                                [--gguf | --gpu] [--no-llama-cpp]

Every figure is a ratio against a baseline run in the same process (bf16 or float32 of the same shape), taken
with the harness's interleaved protocol (medians over repeats); absolute CPU times are this machine's and noisy.
Models are random weights of published shapes (bench-100m and SmolLM2-135M's) built through the runtime's loader;
the demo pair is the bundled checkpoint. llama.cpp (llama-cpp-python, an optional extra) is the outside anchor
where it is installed: its own Q8_0 / Q4_0 of the same random shapes, from an F32 GGUF written by gguf_write.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import harness as h  # first: this checkout on sys.path, transformers offline
import gguf_write
import report
from report import Column, Table, sig

import torch

from offload_runtime.api.engine import CallStats, Engine
from offload_runtime.cli import ArgumentParser
from offload_runtime.model.config import ModelArgs
from offload_runtime.model.quantization import QuantSpec
from offload_runtime.residency import Residency
from offload_runtime.weights.layout import layer_bytes
from offload_runtime.weights.loader import build_model
from offload_runtime.weights.random import RandomWeights

SMOLLM2_135M = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, intermediate_size=1536,
                         vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
                         rope_theta=100000.0)
QUICK = ModelArgs.from_name("tiny").replace(dim=128, intermediate_size=256, n_layers=4, n_heads=4, n_kv_heads=2,
                                            head_dim=32, vocab_size=512)
FORMATS = {  # label -> (activation dtype, bits, group: "g" = 128 where it divides every width, else 64)
    "float32": (torch.float32, None, None),
    "bf16": (torch.bfloat16, None, None),
    "int8 g": (torch.bfloat16, 8, "g"),
    "int8 per-channel": (torch.bfloat16, 8, -1),
    "int4 g": (torch.bfloat16, 4, "g"),
    "int4 g, float32": (torch.float32, 4, "g"),
}
Row = dict[str, Any]  # a table row: "model", "format", then the measured values


def fmt(label: str, args: ModelArgs) -> tuple[str, torch.dtype, QuantSpec | None]:
    """(label with the group size filled in, activation dtype, packed format) of FORMATS[label] for `args`."""
    dtype, bits, group = FORMATS[label]
    if bits is None:
        return label, dtype, None
    if group == "g":
        group = group_for(args)
        label = label.replace(" g", f" g{group}")
    return label, dtype, QuantSpec(bits, group)


def group_for(args: ModelArgs) -> int:
    """The largest of 128, 64, 32 that divides every linear's input width (SmolLM2-135M's 576 is 4.5 x 128)."""
    return next(g for g in (128, 64, 32) if all(w % g == 0 for w in (args.dim, args.q_size, args.intermediate_size)))


def random_engine(args: ModelArgs, dtype: torch.dtype, quant: QuantSpec | None, *, offload: bool = False,
                  draft_layers: int = 0, device: str = "cpu", distinct_layers: bool = True) -> Engine:
    """An engine on random weights of `args`, all layers streamed (`offload`) or all resident. The draft (if any)
    is the target's own first layers in the same format (same seed), so it agrees with the target often."""
    dev = torch.device(device)
    residency = Residency(offload, () if offload else tuple(range(args.n_layers)), 2, None)
    target = build_model(RandomWeights(args, seed=0, distinct_layers=distinct_layers), dev, dtype, residency,
                         quant=quant)
    draft = None
    if draft_layers:
        draft = build_model(RandomWeights(args.replace(n_layers=draft_layers), seed=0), dev, dtype,
                            Residency(False, tuple(range(draft_layers)), 0, None), quant=quant)
    return Engine(target, draft, None, max_seq_len=256, residency=residency,
                  trees=None if draft is None else sequoia_16())


def sequoia_16():
    from offload_runtime.spec.tree_search import DEFAULT_ACCEPTANCE, best_first_tree

    return best_first_tree(DEFAULT_ACCEPTANCE, 16, 6)[1]


def prompt(vocab: int, n: int = 16) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(1)).tolist()


def measure(engines: dict[str, Engine], repeats: int, new_tokens: int) -> dict[str, list[h.Run]]:
    """Greedy runs of one prompt through each engine (its own tree, or plain without a draft), interleaved."""
    return h.interleaved({k: h.engine_method(e, None, [prompt(e.target.args.vocab_size)], new_tokens, 0.0)
                          for k, e in engines.items()}, repeats)


def decode_method(engine: Engine, new_tokens: int) -> h.Method:
    """Plain decoding as a method of the harness's protocol, timed as llama.cpp's rows are (decode_run)."""
    return lambda repeat: decode_run(engine, min(new_tokens, 4) if repeat < 0 else new_tokens)


def decode_run(engine: Engine, new_tokens: int) -> h.Run:
    """Plain greedy decoding timed from the step that emits the first new token to the one that emits the last:
    new_tokens - 1 tokens, the prompt's cost left out (as llama_cpp_method times llama.cpp)."""
    req = engine.request(prompt(engine.target.args.vocab_size), max_new_tokens=new_tokens, temperature=0.0,
                         ignore_eos=True)
    marks: list[float] = []

    def mark(_request: Any, _emitted: list[int]) -> None:  # called at every step, as its tokens are emitted
        marks.append(time.perf_counter())

    req.stop_check = mark
    (_, result), = list(engine.run([req]))
    assert len(marks) == len(result.token_ids) == new_tokens, "plain decoding emits one token a step"
    return h.Run([result.token_ids[1:]], marks[-1] - marks[0], engine.last_call)


def tokens_per_s(runs: Sequence[h.Run]) -> float:
    return h.summarise(runs).tokens_per_s


def bytes_and_sweeps(label: str, args: ModelArgs, repeats: int, new_tokens: int) -> list[Row]:
    """Bytes per sweep and the streamed sweep time (all layers streamed) per format, vs bf16."""
    formats = {f: (dtype, quant) for f, dtype, quant in (fmt(f, args) for f in ("bf16", "int8 g", "int4 g"))}
    engines = {f: random_engine(args, dtype, quant, offload=True) for f, (dtype, quant) in formats.items()}
    runs = measure(engines, repeats, max(2, new_tokens // 4))
    sweep_s = {f: statistics.median(s.wall_s for r in rs for s in r.stats.sweeps[1:]) for f, rs in runs.items()}
    base_b = engines["bf16"].target.layers.bytes_per_sweep
    return [{"model": label, "format": f, "layer_bytes": layer_bytes(args, *formats[f]),
             "bytes_per_sweep": (b := e.target.layers.bytes_per_sweep), "bytes_vs_bf16": b / base_b,
             "sweep_ms": sweep_s[f] * 1e3, "sweep_vs_bf16": sweep_s[f] / sweep_s["bf16"]}
            for f, e in engines.items()]


def decode_speeds(engines: dict[str, Engine], anchors: dict[str, h.Method], repeats: int,
                  new_tokens: int) -> dict[str, float]:
    """Plain decoding tokens/s of each engine and of each anchor (llama.cpp on the same shape or files), all in one
    interleaved rotation, so a spell of a slower machine falls on both sides of every ratio."""
    methods = {f: decode_method(e, new_tokens) for f, e in engines.items()} | anchors
    return {f: tokens_per_s(rs) for f, rs in h.interleaved(methods, repeats).items()}


def plain_speed(label: str, args: ModelArgs, repeats: int, new_tokens: int,
                anchors: dict[str, h.Method]) -> list[Row]:
    """CPU plain greedy tokens/s per format (the whole model resident), ratios against float32; `anchors` beside
    them (decode_speeds)."""
    engines = {f: random_engine(args, dtype, quant) for f, dtype, quant in (fmt(f, args) for f in FORMATS)}
    speed = decode_speeds(engines, anchors, repeats, new_tokens)
    return [{"model": label, "format": f, "tokens_per_s": speed[f], "vs_float32": speed[f] / speed["float32"],
             "kernel_max_tokens": e.target.kernel.max_tokens if e.target.kernel else 0} for f, e in engines.items()] \
        + [{"model": label, "format": name, "tokens_per_s": speed[name]} for name in anchors]


def speculative(label: str, make: Callable[[int | None], Engine], repeats: int, new_tokens: int) -> list[Row]:
    """Tokens per step and tokens/s, int4 target and draft against unquantized, one process."""
    runs = measure({"unquantized": make(None), "int4 target + draft": make(4)}, repeats, new_tokens)
    base = tokens_per_s(runs["unquantized"])
    return [{"model": label, "format": v, "tokens_per_s": tokens_per_s(rs), "vs_unquantized": tokens_per_s(rs) / base,
             "tokens_per_step": h.summarise(rs).tokens_per_step} for v, rs in runs.items()]


def demo_engine(bits: int | None) -> Engine | None:
    """The bundled demo pair in float32, or int4 / int8 in bf16 (group 128 where it divides, else 64)."""
    pair = h.demo_pair()
    if pair is None:
        return None
    # One group size serves both models (the draft is narrower than the target).
    group = bits and min(group_for(ModelArgs.from_file(p)) for p in (pair.target, pair.draft))
    q = bits and f"int{bits}"
    return h.load_engine(pair, draft=True, max_seq_len=256, tree=sequoia_16(), quantize=q, draft_quantize=q,
                         group_size=group, dtype="bfloat16" if bits else "float32")


# --- llama.cpp, the outside anchor


def llama_cpp_method(path: Path, threads: int, vocab: int, new_tokens: int) -> h.Method:
    """llama.cpp's greedy decoding of the GGUF file `path` as a method of the harness's protocol: timed from the
    first new token to the last (new_tokens - 1 tokens), as decode_run times ours."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=threads, n_batch=64, verbose=False)

    def run(repeat: int) -> h.Run:
        n = min(new_tokens, 4) if repeat < 0 else new_tokens
        llm.reset()
        llm.eval(prompt(vocab))
        token, tokens = int(llm.sample(temp=0.0)), []
        t0 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([token])
            token = int(llm.sample(temp=0.0))
            tokens.append(token)
        return h.Run([tokens], time.perf_counter() - t0, CallStats(steps=n - 1))
    return run


def llama_cpp_anchors(files: dict[str, Path], threads: int, vocab: int, new_tokens: int) -> dict[str, h.Method]:
    """Row label -> llama.cpp's method (llama_cpp_method) for each of `files`."""
    return {label: llama_cpp_method(path, threads, vocab, new_tokens) for label, path in files.items()}


def llama_cpp_missing() -> str:
    """Why llama.cpp's rows are left out ("" when llama-cpp-python imports)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python not installed ({e.name})"
    return ""


def llama_cpp_files(label: str, args: ModelArgs, workdir: Path, threads: int) -> dict[str, Path] | str:
    """llama.cpp's own Q8_0 and Q4_0 (default settings: the anchor) of the same random shape, and a Q4_0 whose head
    and embedding stay F16: a same-bytes comparison, not the anchor. Plain Q4_0 keeps its head in 8 or 6 bits; our
    int4 keeps the checkpoint's 16-bit head (the issue's rule), and the head is a large part of a small model's
    token. Returns row label -> file, or why llama.cpp could not make one."""
    import llama_cpp

    f32 = gguf_write.random_gguf(args, workdir / f"{label}-f32.gguf", "F32", fill=True)
    files = {}
    for i, (qname, head16) in enumerate((("Q8_0", False), ("Q4_0", False), ("Q4_0, F16 head and embedding", True))):
        out = workdir / f"{label}-{i}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qname[:4]}"), threads
        if head16:
            params.output_tensor_type = params.token_embedding_type = llama_cpp.GGML_TYPE_F16
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params) != 0:
            return f"llama.cpp could not quantize to {qname}"
        files[f"llama.cpp {qname}"] = out
    return files


# --- GGUF files: the file's blocks streamed and dequantized by the runtime, llama.cpp on the same files


def gguf_rows(label: str, args: ModelArgs, workdir: Path, threads: int, repeats: int, new_tokens: int,
              with_llama_cpp: bool = True) -> tuple[list[Row], str]:
    """Bytes per sweep (all layers streamed) and plain greedy tokens/s (whole model resident) of a Q8_0 and a
    Q4_K_M-like file (llama.cpp's mix, with its fallbacks where rows are not whole 256-weight super-blocks) of
    random blocks, against the same shape in bf16; llama.cpp on the same files where it imports. Returns the rows
    and a note ("" or why llama.cpp is missing)."""
    files = {"GGUF Q8_0": gguf_write.random_gguf(args, workdir / f"{label}-q8_0.gguf", "Q8_0"),
             "GGUF Q4_K_M-like": gguf_write.random_gguf(args, workdir / f"{label}-q4_k_m.gguf",
                                                        gguf_write.q4_k_m_types(args.n_layers))}
    opts = dict(device="cpu", draft=False, plan=None, progress=False, quiet=True)
    engines = {"bf16": random_engine(args, torch.bfloat16, None)}
    streamed_bytes = {"bf16": random_engine(args, torch.bfloat16, None, offload=True).target.layers.bytes_per_sweep}
    for name, path in files.items():
        for dtype in ("bfloat16", "float32"):
            engines[f"{name}, {dtype}"] = Engine.from_pretrained(path, dtype=dtype, **opts)
        streamed = Engine.from_pretrained(path, dtype="bfloat16", offload=True, resident_layers=0, **opts)
        streamed_bytes[name] = streamed.target.layers.bytes_per_sweep
    note = llama_cpp_missing() if with_llama_cpp else ""
    anchors = {} if note or not with_llama_cpp else llama_cpp_anchors(
        {f"llama.cpp {name.removeprefix('GGUF ')}": path for name, path in files.items()}, threads, args.vocab_size,
        new_tokens)
    speed = decode_speeds(engines, anchors, repeats, new_tokens)
    rows = [{"model": label, "format": f, "bytes_per_sweep": (b := streamed_bytes[f.split(",")[0]]),
             "bytes_vs_bf16": b / streamed_bytes["bf16"], "tokens_per_s": speed[f], "vs_bf16": speed[f] / speed["bf16"]}
            for f in engines]
    rows += [{"model": label, "format": name, "tokens_per_s": speed[name], "vs_bf16": speed[name] / speed["bf16"]}
             for name in anchors]
    return rows, note


# --- on a GPU (device_check's int4 rows; not run without CUDA)


def int4_rows(args: ModelArgs, device: torch.device, bandwidth_Bps: float, repeats: int = 5,
              float_dtype: torch.dtype = torch.float16, grid: tuple[int, ...] = (1, 64, 512),
              group_size: int = 128) -> list[Row]:
    """int4 vs 16-bit layers of one shape streamed from host RAM: bytes and time of a sweep and its efficiency
    (bytes / s over the copy bandwidth); then the int4 kernel vs dequantize + matmul on its MLP linear at `grid`
    tokens (device_check runs this on a lent GPU with the 13B shape, and on the CPU with a tiny one)."""
    from offload_runtime.model.quantization import measure_kernel_times

    dev = torch.device(device)
    rows = []
    int4 = QuantSpec(4, group_size)
    for label, dtype, quant in ((str(float_dtype).removeprefix("torch."), float_dtype, None),
                                (f"int4 g{group_size}", torch.bfloat16, int4)):
        engine = random_engine(args, dtype, quant, offload=True, device=str(dev), distinct_layers=False)
        run = h.run_engine(engine, [prompt(args.vocab_size)], tree=None, tokens=repeats + 1)
        t = statistics.median(s.wall_s for s in run.stats.sweeps[2:])  # after the prefill and a first warm sweep
        b = engine.target.layers.bytes_per_sweep
        rows.append({"model": f"{args.n_layers} layers, dim {args.dim}", "format": label, "bytes_per_sweep": b,
                     "sweep_ms": t * 1e3, "efficiency": b / t / bandwidth_Bps})
        del engine
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for r in rows:
        r["sweep_vs_fp16"] = r["sweep_ms"] / rows[0]["sweep_ms"]
    times = measure_kernel_times(args.intermediate_size, args.dim, int4, torch.bfloat16, dev, grid=grid,
                                 repeats=repeats)
    for i, (n, d) in enumerate(zip(times.grid, times.dequant_s)):
        k = times.kernel_s[i] if i < len(times.kernel_s or ()) else None
        rows.append({"model": "MLP linear", "format": f"{n} tokens", "dequant_matmul_us": d * 1e6,
                     "kernel_us": None if k is None else k * 1e6})
    return rows


# --- the command line


def commas(x: float) -> str:
    return f"{x:,.0f}"


def table(title: str, rows: list[Row], keys: Sequence[str]) -> Table:
    cols = {"layer_bytes": commas, "bytes_per_sweep": commas,
            "kernel_max_tokens": lambda n: "all" if n >= 1 << 30 else f"{n:d}"}  # all: exact_kernel_choice
    return Table(title, [Column("model", "model"), Column("format", "format", left=True)]
                 + [Column(k, k, cols.get(k, sig)) for k in keys], rows)


def cpu_tables(quick: bool, threads: int, repeats: int, new_tokens: int, with_llama_cpp: bool) -> list[Table]:
    shapes = {"tiny-128": QUICK} if quick else {"bench-100m": ModelArgs.from_name("bench-100m"),
                                                 "SmolLM2-135M shape": SMOLLM2_135M}
    log = h.Log()
    first, main_shape = next(iter(shapes.items()))
    sweeps = table("Bytes per sweep and streamed sweep time (all layers streamed)",
                   bytes_and_sweeps(first, main_shape, repeats, new_tokens),
                   ["layer_bytes", "bytes_per_sweep", "bytes_vs_bf16", "sweep_ms", "sweep_vs_bf16"])
    log(report.to_text(sweeps))
    plain = table("Plain greedy decoding, whole model resident", [],
                  ["tokens_per_s", "vs_float32", "vs_llama_cpp_q4_0", "kernel_max_tokens"])
    missing = llama_cpp_missing() if with_llama_cpp else ""
    with tempfile.TemporaryDirectory() as tmp:
        for label, args in shapes.items():
            files = llama_cpp_files(label, args, Path(tmp), threads) if with_llama_cpp and not missing else {}
            if isinstance(files, str):
                missing, files = files, {}
            anchors = llama_cpp_anchors(files, threads, args.vocab_size, new_tokens)
            plain.rows += plain_speed(label, args, repeats, new_tokens, anchors)
            log(report.to_text(plain))
    if missing:
        plain.notes.append(f"llama.cpp: {missing}.")
    anchor = {r["model"]: r["tokens_per_s"] for r in plain.rows if r["format"] == "llama.cpp Q4_0"}
    for r in plain.rows:  # the goal: our int4 at least half of llama.cpp's Q4_0
        r["vs_llama_cpp_q4_0"] = r["tokens_per_s"] / anchor[r["model"]] if r["model"] in anchor else None
    plain.notes.append("tokens/s: decoding only, from the first new token to the last, on both sides")
    group = QuantSpec(4, group_for(main_shape))
    spec = table("Speculative decoding, int4 target and draft (greedy, 16-node Sequoia tree)",
                 speculative(first, lambda bits: random_engine(main_shape, torch.bfloat16 if bits else torch.float32,
                                                               bits and group, draft_layers=2), repeats, new_tokens),
                 ["tokens_per_s", "vs_unquantized", "tokens_per_step"])
    if not quick and h.demo_pair() is not None:
        spec.rows += speculative("demo", demo_engine, repeats, new_tokens)
    return [sweeps, plain, spec]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny shape (smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--markdown", type=h.output_file, default=None, help="also append the tables to this file")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="only the CUDA rows (13B sweep, kernel vs dequantize)")
    mode.add_argument("--gguf", action="store_true", help="only the GGUF rows (Q8_0, Q4_K_M-like vs bf16, llama.cpp)")
    a = ap.parse_args(argv)
    h.check_positive(ap, a, ["threads", "repeats"])
    if a.new_tokens < 2:
        ap.error(f"--new-tokens must be >= 2 (decoding is timed from the first new token), got {a.new_tokens}")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    heading, machine = "Quantized layers on the CPU", h.machine_description(a.threads)
    if a.gpu:
        if not torch.cuda.is_available():
            print("no CUDA device: the GPU rows need one", file=sys.stderr)
            return 1
        from planner.profile import Effort, measure_bandwidth

        dev = torch.device("cuda")
        heading, machine = "int4 layers on the GPU", torch.cuda.get_device_name()
        tables = [table("int4 vs fp16: 13B shape", int4_rows(ModelArgs.from_name("llama-2-13b"), dev,
                                                               measure_bandwidth(dev, Effort()), a.repeats),
                        ["bytes_per_sweep", "sweep_ms", "sweep_vs_fp16", "efficiency", "kernel_us",
                         "dequant_matmul_us"])]
    elif a.gguf:
        label, args = ("tiny-128", QUICK) if a.quick else ("SmolLM2-135M shape", SMOLLM2_135M)
        with tempfile.TemporaryDirectory() as tmp:
            rows, note = gguf_rows(label, args, Path(tmp), a.threads, a.repeats, a.new_tokens, not a.no_llama_cpp)
        heading = "GGUF files on the CPU"
        tables = [table("Random blocks, streamed bytes and resident greedy speed", rows,
                        ["bytes_per_sweep", "bytes_vs_bf16", "tokens_per_s", "vs_bf16"])]
        tables[0].notes += [f"llama.cpp: {note}."] if note else []
    else:
        tables = cpu_tables(a.quick, a.threads, a.repeats, a.new_tokens, not a.no_llama_cpp)
    command = "`python tools/bench_quant.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`"
    text = report.section(heading, machine=machine, command=command, blocks=tables, intro=[
        f"Random weights; ratios within one process; medians of {a.repeats} interleaved repeats, "
        f"{a.new_tokens} new tokens."])
    print(text)
    if a.markdown:
        report.append(a.markdown, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
