"""Quantized layers on the CPU: bytes per sweep, streamed sweep time, plain greedy tokens/s, speculative decoding.

Every figure is a ratio against a baseline run in the same process (bf16 or float32 of the same shape); the
absolute CPU times are this machine's and noisy. Models are random weights of published shapes (bench-100m and
SmolLM2-135M's), built through the runtime's own loader; the demo pair is the bundled checkpoint. llama.cpp
(llama-cpp-python, an optional extra) is the outside anchor where it is installed: Q8_0 / Q4_0 of the same
random shapes, written as GGUF with the `gguf` package.

    python tools/bench_quant.py [--quick] [--threads 2] [--new-tokens 48] [--repeats 3] [--markdown out.md]

Needs from tools/harness.py when that lands: the machine description and markdown table helpers (here they are
a few lines of their own), nothing else.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload_runtime.api.engine import Engine  # noqa: E402
from offload_runtime.model.config import ModelArgs  # noqa: E402
from offload_runtime.model.quantization import QuantSpec  # noqa: E402
from offload_runtime.residency import Residency  # noqa: E402
from offload_runtime.weights.layout import layer_bytes  # noqa: E402
from offload_runtime.weights.loader import build_model  # noqa: E402
from offload_runtime.weights.random import RandomWeights  # noqa: E402

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


@dataclass
class Row:
    model: str
    format: str
    values: dict[str, float] = field(default_factory=dict)


def random_engine(args: ModelArgs, dtype: torch.dtype, quant: QuantSpec | None, *, offload: bool = False,
                  draft_layers: int = 0, draft_quant: QuantSpec | None = None, max_seq_len: int = 256) -> Engine:
    """An engine on random weights of `args`; the draft (if any) is the target's own first layers (same seed),
    so it agrees with the target often."""
    dev = torch.device("cpu")
    residency = Residency(offload, () if offload else tuple(range(args.n_layers)), 2, None)
    target = build_model(RandomWeights(args, seed=0), dev, dtype, residency, quant=quant)
    draft = None
    if draft_layers:
        dargs = args.replace(n_layers=draft_layers)
        draft = build_model(RandomWeights(dargs, seed=0), dev, dtype,
                            Residency(False, tuple(range(draft_layers)), 0, None), quant=draft_quant)
    return Engine(target, draft, None, max_seq_len=max_seq_len, residency=residency,
                  trees=None if draft is None else _tree())


def _tree():
    from offload_runtime.spec.tree_search import DEFAULT_ACCEPTANCE, best_first_tree

    return best_first_tree(DEFAULT_ACCEPTANCE, 16, 6)[1]


def _prompt(vocab: int, n: int = 16) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(1)).tolist()


def greedy_tokens_per_s(engine: Engine, new_tokens: int) -> tuple[float, float]:
    """(tokens/s, tokens per step) of one greedy generate call after the prompt."""
    ids = _prompt(engine.target.args.vocab_size)
    engine.generate(ids, max_new_tokens=4, temperature=0, ignore_eos=True)  # warm
    t0 = time.perf_counter()
    out = engine.generate(ids, max_new_tokens=new_tokens, temperature=0, ignore_eos=True)[0]
    dt = time.perf_counter() - t0
    return len(out.token_ids) / dt, len(out.token_ids) / max(1, out.stats.steps)


def bytes_and_sweeps(label: str, args: ModelArgs, repeats: int, new_tokens: int) -> list[Row]:
    """Bytes per sweep and the streamed sweep time (all layers streamed) per format, vs bf16."""
    rows = []
    sweep_s: dict[str, list[float]] = {}
    formats = [fmt(f, args) for f in ("bf16", "int8 g", "int4 g")]
    engines = {f: random_engine(args, dtype, quant, offload=True) for f, dtype, quant in formats}
    specs = {f: (dtype, quant) for f, dtype, quant in formats}
    for _ in range(repeats):  # interleaved, so load on the machine hits every format alike
        for f, e in engines.items():
            n = len(e.sweep_stats())
            e.generate(_prompt(args.vocab_size), max_new_tokens=new_tokens // 4, temperature=0, ignore_eos=True)
            sweep_s.setdefault(f, []).extend(s.wall_s for s in e.sweep_stats()[n + 1:])  # decode sweeps only
    base_b = engines["bf16"].target.layers.bytes_per_sweep
    base_t = statistics.median(sweep_s["bf16"])
    for f, e in engines.items():
        b, t = e.target.layers.bytes_per_sweep, statistics.median(sweep_s[f])
        rows.append(Row(label, f, {"bytes_per_sweep": b, "bytes_vs_bf16": b / base_b, "sweep_ms": t * 1e3,
                                          "sweep_vs_bf16": t / base_t,
                                          "layer_bytes": layer_bytes(args, *specs[f])}))
    return rows


def plain_speed(label: str, args: ModelArgs, repeats: int, new_tokens: int, formats: list[str]) -> list[Row]:
    """CPU plain greedy tokens/s per format (the whole model resident), ratios against float32."""
    engines = {label: random_engine(args, dtype, quant) for label, dtype, quant in (fmt(f, args) for f in formats)}
    speeds: dict[str, list[float]] = {f: [] for f in engines}
    for _ in range(repeats):
        for f, e in engines.items():
            speeds[f].append(greedy_tokens_per_s(e, new_tokens)[0])
    base = statistics.median(speeds["float32"])
    out = []
    for f, e in engines.items():
        k = e.target.kernel
        s = statistics.median(speeds[f])
        out.append(Row(label, f, {"tokens_per_s": s, "vs_float32": s / base,
                                  "kernel_max_tokens": k.max_tokens if k else 0}))
    return out


def speculative(label: str, make: Any, repeats: int, new_tokens: int) -> list[Row]:
    """Tokens per step and tokens/s, quantized (int4 target and draft) against unquantized, one process."""
    variants = {"unquantized": make(None), "int4 target + draft": make(4)}
    speeds: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for _ in range(repeats):
        for v, e in variants.items():
            speeds[v].append(greedy_tokens_per_s(e, new_tokens))
    base = statistics.median(s for s, _ in speeds["unquantized"])
    out = []
    for v in variants:
        s = statistics.median(x for x, _ in speeds[v])
        out.append(Row(label, v, {"tokens_per_s": s, "vs_unquantized": s / base,
                                  "tokens_per_step": statistics.median(t for _, t in speeds[v])}))
    return out


def demo_engine(quant: QuantSpec | None, dtype: str) -> Engine | None:
    """The bundled demo pair, int4 (group 128 where it divides, else 64) when `quant` is given."""
    from offload_runtime.api.registry import demo_paths

    target, draft = demo_paths()
    if not (target / "model.safetensors").is_file():
        return None
    q = None if quant is None else f"int{quant.bits}"
    # One group size serves both models (the draft is narrower than the target).
    group = None if quant is None else min(group_for(ModelArgs.from_file(p)) for p in (target, draft))
    return Engine.from_pretrained(target, draft=str(draft), dtype=dtype, plan=None, tree=_tree(), quantize=q,
                                  draft_quantize=q, group_size=group, progress=False)


# --- llama.cpp, the outside anchor


def write_gguf(path: Path, args: ModelArgs) -> Path:
    """A random Llama of `args` as an F32 GGUF (a made-up vocabulary of plain pieces: speed only)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_dimension_count(args.head_dim)
    w.add_layer_norm_rms_eps(args.rms_norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>".encode() for i in range(args.vocab_size)])
    w.add_token_scores([0.0] * args.vocab_size)
    w.add_token_types([1] * args.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    src = RandomWeights(args, seed=0)

    def put(name: str, hf: str, shape: tuple[int, ...]) -> None:
        w.add_tensor(name, src.read_into(hf, torch.empty(shape)).numpy().astype(np.float32))

    put("token_embd.weight", "model.embed_tokens.weight", (args.vocab_size, args.dim))
    put("output_norm.weight", "model.norm.weight", (args.dim,))
    if not args.tie_word_embeddings:
        put("output.weight", "lm_head.weight", (args.vocab_size, args.dim))
    names = {"input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "attn_q",
             "self_attn.k_proj.weight": "attn_k", "self_attn.v_proj.weight": "attn_v",
             "self_attn.o_proj.weight": "attn_output", "post_attention_layernorm.weight": "ffn_norm",
             "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
    for i in range(args.n_layers):
        for hf, shape in args.layer_shapes().items():
            put(f"blk.{i}.{names[hf]}.weight", f"model.layers.{i}.{hf}", shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_cpp_speed(label: str, args: ModelArgs, workdir: Path, threads: int, repeats: int,
                    new_tokens: int) -> list[Row] | str:
    """Q8_0 and Q4_0 greedy tokens/s of llama.cpp on the same random shape; a reason string when unavailable."""
    try:
        import gguf  # noqa: F401
        import llama_cpp
    except ImportError as e:
        return f"llama-cpp-python not installed ({e.name})"
    f32 = write_gguf(workdir / f"{label}-f32.gguf", args)
    rows = []
    # The third is a same-bytes comparison, not the anchor: plain Q4_0 keeps its head in 8 or 6 bits, our int4
    # keeps the checkpoint's 16-bit head (the rule), and the head is a large part of a small model's token.
    for qname, ftype, head16 in (("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, False),
                                 ("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, False),
                                 ("Q4_0, F16 head and embedding", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, True)):
        out = workdir / f"{label}-{qname.replace(' ', '').replace(',', '-')}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = threads
        if head16:
            params.output_tensor_type = params.token_embedding_type = llama_cpp.GGML_TYPE_F16
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params) != 0:
            return f"llama.cpp could not quantize to {qname}"
        llm = llama_cpp.Llama(str(out), n_ctx=256, n_threads=threads, n_batch=64, verbose=False)
        ids = _prompt(args.vocab_size)
        speeds = [_llama_cpp_greedy(llm, ids, new_tokens) for _ in range(repeats)]
        rows.append(Row(label, f"llama.cpp {qname}", {"tokens_per_s": statistics.median(speeds)}))
        del llm
    return rows


# --- GGUF files: the file's blocks streamed and dequantized by the runtime, llama.cpp on the same files


def gguf_rows(label: str, args: ModelArgs, workdir: Path, threads: int, repeats: int, new_tokens: int,
              with_llama_cpp: bool = True) -> tuple[list[Row], str]:
    """Bytes per sweep (all layers streamed) and plain greedy tokens/s (whole model resident) of a Q8_0 and a
    Q4_K_M-like file (llama.cpp's mix, with its fallbacks where rows are not whole 256-weight super-blocks) of
    random blocks, against the same shape in bf16; llama.cpp on the same files where it imports. Returns the rows
    and a note ("" or why llama.cpp is missing)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gguf_write

    files = {"GGUF Q8_0": gguf_write.random_gguf(args, workdir / f"{label}-q8_0.gguf", "Q8_0"),
             "GGUF Q4_K_M-like": gguf_write.random_gguf(args, workdir / f"{label}-q4_k_m.gguf",
                                                        gguf_write.q4_k_m_types(args.n_layers))}
    engines = {"bf16": random_engine(args, torch.bfloat16, None)}
    streamed = {"bf16": random_engine(args, torch.bfloat16, None, offload=True)}
    for name, path in files.items():
        for dtype in ("bfloat16", "float32"):
            engines[f"{name}, {dtype}"] = Engine.from_pretrained(path, device="cpu", dtype=dtype, draft=False,
                                                                 plan=None, progress=False, quiet=True)
        streamed[name] = Engine.from_pretrained(path, device="cpu", dtype="bfloat16", draft=False, plan=None,
                                                offload=True, resident_layers=0, progress=False, quiet=True)
    speeds: dict[str, list[float]] = {f: [] for f in engines}
    for _ in range(repeats):  # interleaved
        for f, e in engines.items():
            speeds[f].append(greedy_tokens_per_s(e, new_tokens)[0])
    base_s = statistics.median(speeds["bf16"])
    base_b = streamed["bf16"].target.layers.bytes_per_sweep
    rows = []
    for f, e in engines.items():
        s_ = statistics.median(speeds[f])
        b = streamed[f.split(",")[0]].target.layers.bytes_per_sweep
        rows.append(Row(label, f, {"bytes_per_sweep": b, "bytes_vs_bf16": b / base_b, "tokens_per_s": s_,
                                   "vs_bf16": s_ / base_s}))
    note = ""
    if with_llama_cpp:
        try:
            import llama_cpp
        except ImportError as e:
            return rows, f"llama-cpp-python not installed ({e.name})"
        for name, path in files.items():
            llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=threads, n_batch=64, verbose=False)
            got = []
            for _ in range(repeats):
                got.append(_llama_cpp_greedy(llm, _prompt(args.vocab_size), new_tokens))
            rows.append(Row(label, f"llama.cpp {name.removeprefix('GGUF ')}",
                            {"tokens_per_s": statistics.median(got), "vs_bf16": statistics.median(got) / base_s}))
            del llm
    return rows, note


def _llama_cpp_greedy(llm: Any, ids: list[int], new_tokens: int) -> float:
    """llama.cpp's greedy decode tokens/s after the prompt."""
    llm.reset()
    llm.eval(ids)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([int(llm.sample(temp=0.0))])
    return new_tokens / (time.perf_counter() - t0)


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
        residency = Residency(True, (), 2, None)
        model = build_model(RandomWeights(args, distinct_layers=False), dev, dtype, residency, quant=quant)
        engine = Engine(model, None, None, max_seq_len=256, residency=residency)
        engine.generate(_prompt(args.vocab_size), max_new_tokens=repeats + 1, temperature=0, ignore_eos=True)
        sweeps = model.layers.resolve_stats()[2:]
        t = statistics.median(s.wall_s for s in sweeps)
        b = model.layers.bytes_per_sweep
        rows.append(Row(f"{args.n_layers} layers, dim {args.dim}", label,
                        {"bytes_per_sweep": b, "sweep_ms": t * 1e3, "efficiency": b / t / bandwidth_Bps}))
        del engine, model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0].values["sweep_ms"]
    for r in rows:
        r.values["sweep_vs_fp16"] = r.values["sweep_ms"] / base
    times = measure_kernel_times(args.intermediate_size, args.dim, int4, torch.bfloat16, dev, grid=grid,
                                 repeats=repeats)
    for n, d in zip(times.grid, times.dequant_s):
        k = times.kernel_s[times.grid.index(n)] if times.kernel_s and n in times.grid[:len(times.kernel_s)] else None
        rows.append(Row("MLP linear", f"{n} tokens",
                        {"dequant_matmul_us": d * 1e6, **({"kernel_us": k * 1e6} if k is not None else {})}))
    return rows


# --- report


def table(rows: list[Row], keys: list[str]) -> str:
    lines = ["| model | format | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.values.get(k)
            cells.append("" if v is None else (f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"))
        lines.append(f"| {r.model} | {r.format} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(quick: bool, threads: int, repeats: int, new_tokens: int, with_llama_cpp: bool = True) -> dict[str, Any]:
    torch.set_num_threads(threads)
    shapes = {"tiny-128": QUICK} if quick else {"bench-100m": ModelArgs.from_name("bench-100m"),
                                                 "SmolLM2-135M shape": SMOLLM2_135M}
    main_shape = next(iter(shapes.values()))
    result: dict[str, Any] = {"threads": threads, "new_tokens": new_tokens, "repeats": repeats}
    result["sweeps"] = bytes_and_sweeps(next(iter(shapes)), main_shape, repeats, new_tokens)
    _progress(result["sweeps"])
    result["plain"] = []
    for label, args in shapes.items():
        result["plain"] += plain_speed(label, args, repeats, new_tokens, list(FORMATS))
        _progress(result["plain"])
    result["llama_cpp"] = []
    result["llama_cpp_note"] = ""
    if with_llama_cpp:
        with tempfile.TemporaryDirectory() as tmp:
            for label, args in shapes.items():
                got = llama_cpp_speed(label, args, Path(tmp), threads, repeats, new_tokens)
                if isinstance(got, str):
                    result["llama_cpp_note"] = got
                    break
                result["llama_cpp"] += got
    label = next(iter(shapes))
    result["speculative"] = speculative(
        label, lambda bits: random_engine(main_shape, torch.bfloat16 if bits else torch.float32,
                                          bits and QuantSpec(bits, group_for(main_shape)), draft_layers=2,
                                          draft_quant=bits and QuantSpec(bits, group_for(main_shape))),
        repeats, new_tokens)
    if not quick and demo_engine(None, "float32") is not None:
        result["speculative"] += speculative(
            "demo", lambda bits: demo_engine(bits and QuantSpec(bits, 128), "bfloat16" if bits else "float32"),
            repeats, new_tokens)
    return result


def _progress(rows: list[Row]) -> None:
    """Each section's rows on stderr as they are measured (a long run that fails late keeps them)."""
    for r in rows:
        print(f"{r.model} | {r.format} | " + ", ".join(f"{k} {v:.4g}" for k, v in r.values.items()), file=sys.stderr,
              flush=True)


def markdown(result: dict[str, Any], command: str) -> str:
    import platform

    out = [f"## Quantized layers on the CPU, {time.strftime('%Y-%m-%d %H:%M')}", "",
           f"Machine: {platform.processor() or platform.machine()}, {result['threads']} torch threads, torch "
           f"{torch.__version__}. Command: `{command}`. Random weights; ratios within one process; "
           f"{result['repeats']} interleaved repeats, medians; {result['new_tokens']} new tokens.", "",
           "### Bytes per sweep and streamed sweep time (all layers streamed)", "",
           table(result["sweeps"], ["layer_bytes", "bytes_per_sweep", "bytes_vs_bf16", "sweep_ms", "sweep_vs_bf16"]),
           "", "### Plain greedy decoding, whole model resident", "",
           table(result["plain"] + result["llama_cpp"], ["tokens_per_s", "vs_float32", "kernel_max_tokens"])]
    if result["llama_cpp_note"]:
        out += ["", f"llama.cpp: {result['llama_cpp_note']}."]
    out += ["", "### Speculative decoding, int4 target and draft (greedy, 16-node Sequoia tree)", "",
            table(result["speculative"], ["tokens_per_s", "vs_unquantized", "tokens_per_step"]), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny shape (smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--markdown", default=None, help="also append the tables to this file")
    ap.add_argument("--gpu", action="store_true", help="only the CUDA rows (13B sweep, kernel vs dequantize)")
    ap.add_argument("--gguf", action="store_true", help="only the GGUF rows (Q8_0, Q4_K_M-like vs bf16, llama.cpp)")
    a = ap.parse_args(argv)
    if a.gguf:
        torch.set_num_threads(a.threads)
        label, args = ("tiny-128", QUICK) if a.quick else ("SmolLM2-135M shape", SMOLLM2_135M)
        with tempfile.TemporaryDirectory() as tmp:
            rows, note = gguf_rows(label, args, Path(tmp), a.threads, a.repeats, a.new_tokens, not a.no_llama_cpp)
        command = "python tools/bench_quant.py " + " ".join(sys.argv[1:] if argv is None else argv)
        text = (f"### GGUF files on the CPU ({a.threads} torch threads; `{command}`; random blocks; medians of "
                f"{a.repeats} interleaved repeats, {a.new_tokens} new tokens)\n\n"
                + table(rows, ["bytes_per_sweep", "bytes_vs_bf16", "tokens_per_s", "vs_bf16"])
                + (f"\n\nllama.cpp: {note}." if note else ""))
        print(text)
        if a.markdown:
            with open(a.markdown, "a") as f:
                f.write("\n" + text + "\n")
        return 0
    if a.gpu:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        if name is None:
            print("no CUDA device: the GPU rows need one")
            return 1
        from planner.profile import Effort, measure_bandwidth

        dev = torch.device("cuda")
        rows = int4_rows(ModelArgs.from_name("llama-2-13b"), dev, measure_bandwidth(dev, Effort()), a.repeats)
        print(f"### int4 on {name}\n\n" + table(rows, ["bytes_per_sweep", "sweep_ms", "sweep_vs_fp16", "efficiency",
                                                        "kernel_us", "dequant_matmul_us"]))
        return 0
    result = run(a.quick, a.threads, a.repeats, a.new_tokens, not a.no_llama_cpp)
    text = markdown(result, "python tools/bench_quant.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(text)
    if a.markdown:
        with open(a.markdown, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
