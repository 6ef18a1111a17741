"""Project Llama-2-70B fp16 offloaded s/token on a 24 GB PCIe-4 card from the planner's time model.

Nothing here is measured: copy bandwidth, compute and the draft's level time are stated assumptions, and so is
the acceptance vector. BENCHMARKS.md labels the result as a projection; tools/device_check.py replaces the
assumed compute and draft curves with ones measured on a lent GPU (and picks the plan the same way).

    python tools/project_70b.py [--bandwidth-gbps 25] [--memory-gib 22] [--acceptance 0.8,0.1,...]
"""
from __future__ import annotations

import argparse
import sys

import harness as h
import torch

from offload_runtime.model.config import ModelArgs
from offload_runtime.spec.tree_search import DEFAULT_ACCEPTANCE
from offload_runtime.weights.layout import layer_bytes
from planner import optimizer as opt
from planner.acceptance import parse_vector

GRID = (1, 2048)


def roofline_layer(args: ModelArgs, tflops: float, mem_gbps: float) -> opt.Curve:
    """One decoder layer for n tokens: max(weights read from device memory, 2 x params x n FLOPs)."""
    params = args.layer_numel()
    return opt.Curve(GRID, tuple(max(2 * params / (mem_gbps * 1e9), 2 * params * n / (tflops * 1e12)) for n in GRID))


def project(bandwidth_gbps: float, memory_gib: float, tflops: float, mem_gbps: float, p, max_tree: int = 1024,
            max_depth: int = 20) -> dict:
    target, draft = ModelArgs.from_name("llama-2-70b"), ModelArgs.from_name("llama-2-7b")
    dtype = torch.float16
    draft_layer = roofline_layer(draft, tflops, mem_gbps)
    # A draft level: its whole model once (memory-bound at these widths) plus its head, per level.
    level = opt.Curve(GRID, tuple(draft.n_layers * float(draft_layer(n)) + 2 * draft.vocab_size * draft.dim /
                                  (mem_gbps * 1e9) for n in GRID))
    tm = opt.TimeModel(layer=roofline_layer(target, tflops, mem_gbps), head=opt.Curve.constant(0.0),
                       host=opt.Curve.constant(5e-3), draft_level=level, n_layers=target.n_layers, resident=0,
                       layer_bytes=layer_bytes(target, dtype), bandwidth=bandwidth_gbps * 1e9, overlap=True)
    choice, tm = h.search_card(p, tm, ("llama-2-70b", target), ("llama-2-7b", draft), dtype, cuda=True,
                               budget=int(memory_gib * 2**30), max_seq_len=2048, max_tree=max_tree, max_depth=max_depth)
    best = choice.optimum.best
    return {"resident_layers": len(choice.residency.resident), "stream_s": tm.stream_s, "n": best.n,
            "depth": best.depth, "tokens_per_step": best.tokens_per_step, "s_per_token": best.s_per_token,
            "plain_s_per_token": opt.evaluate([-1], 1.0, tm).s_per_token}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bandwidth-gbps", type=float, default=25.0, help="pinned host-to-device copy GB/s")
    ap.add_argument("--memory-gib", type=float, default=22.0, help="device budget (a 24 GB card less the context)")
    ap.add_argument("--tflops", type=float, default=80.0, help="fp16 dense throughput the layers reach")
    ap.add_argument("--mem-gbps", type=float, default=900.0, help="device memory bandwidth GB/s")
    ap.add_argument("--acceptance", default=None, help="p[1..W] as 0.8,0.1,...; default: DEFAULT_ACCEPTANCE")
    a = ap.parse_args(argv)
    p = parse_vector(a.acceptance) if a.acceptance else list(DEFAULT_ACCEPTANCE)
    r = project(a.bandwidth_gbps, a.memory_gib, a.tflops, a.mem_gbps, p)
    print(f"Llama-2-70B fp16 + Llama-2-7B draft, {a.memory_gib:g} GiB budget, {a.bandwidth_gbps:g} GB/s, "
          f"{a.tflops:g} TFLOPS, {a.mem_gbps:g} GB/s device memory; acceptance {'given' if a.acceptance else 'DEFAULT_ACCEPTANCE'}")
    print(f"resident layers {r['resident_layers']}/80, stream {r['stream_s']:.2f} s per sweep")
    print(f"plain offloaded decoding: {r['plain_s_per_token']:.2f} s/token")
    print(f"Sequoia tree {r['n']} nodes, depth {r['depth']}: {r['tokens_per_step']:.2f} tokens/step, "
          f"{r['s_per_token']:.3f} s/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
