"""Project offloaded s/token of large models on a 24 GB PCIe-4 card from the planner's time model.

Nothing here is measured: copy bandwidth, compute, the draft's level time and the acceptance vector are stated
assumptions. BENCHMARKS.md labels the results as projections; tools/device_check.py replaces the assumed compute
and draft curves with ones measured on a lent GPU (and picks the plan the same way).

Each scenario is a target and a draft by preset shape and packed format. A decoder layer costs max(its weights
read from device memory, 2 x params x n FLOPs) for n tokens (packed weights are read packed: dequantizing is
assumed hidden in the read); a draft level costs the whole draft once plus its head. Residency follows the
runtime's own rule on the formats' bytes, and the planner's search picks the tree.

    python tools/project_70b.py [--bandwidth-gbps 25] [--memory-gib 22] [--acceptance 0.8,0.1,...]
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence

import harness as h
import torch

from offload_runtime.api.self_draft import is_self_draft
from offload_runtime.cli import ArgumentParser
from offload_runtime.errors import ResourceError
from offload_runtime.model.config import ModelArgs
from offload_runtime.model.quantization import QuantSpec
from offload_runtime.spec.tree_search import DEFAULT_ACCEPTANCE
from offload_runtime.weights.layout import layer_bytes
from planner import optimizer as opt
from planner.acceptance import parse_vector

GRID = (1, 2048)
INT4 = QuantSpec(4, 128)  # AWQ / GPTQ 4-bit with groups of 128, as the published 70B checkpoints are


# A self-int4 draft's acceptance vector: an assumption, below what the demo pair's self-int4 measured (p[1] 0.977 at
# T = 0.6, 0.992 greedy: BENCHMARKS.md, tools/ablations.py --experiments drafts), since a large model's
# round-to-nearest copy may agree less than a small one's; SubSpec reports ~28 tokens per sweep for Qwen2.5-32B.
SELF_INT4_ACCEPTANCE = (0.9, 0.05, 0.02, 0.01)
SELF_INT4_SOURCE = "assumed (below the demo's measured self-int4 p[1] 0.977)"


@dataclass(frozen=True)
class Scenario:
    label: str
    target: str  # a ModelArgs preset
    draft: str  # a ModelArgs preset, or a self-draft spelling ("self-int4": the target's shape in draft_quant)
    target_quant: QuantSpec | None = None
    draft_quant: QuantSpec | None = None
    acceptance: tuple[float, ...] | None = None  # this pair's assumed p (None: --acceptance or DEFAULT_ACCEPTANCE)


SCENARIOS = (
    Scenario("Llama-2-70B fp16 + Llama-2-7B fp16", "llama-2-70b", "llama-2-7b"),
    Scenario("Llama-3.1-70B fp16 + Llama-3.1-8B int4", "llama-3.1-70b", "llama-3.1-8b", None, INT4),
    Scenario("Llama-3.1-70B AWQ int4 + Llama-3.1-8B int4", "llama-3.1-70b", "llama-3.1-8b", INT4, INT4),
    Scenario("Qwen2.5-32B fp16 + Qwen2.5-0.5B fp16", "qwen2.5-32b", "qwen2.5-0.5b"),
    Scenario("Qwen2.5-32B fp16 + self-int4", "qwen2.5-32b", "self-int4", None, INT4, SELF_INT4_ACCEPTANCE),
    Scenario("Llama-3.1-70B fp16 + self-int4", "llama-3.1-70b", "self-int4", None, INT4, SELF_INT4_ACCEPTANCE),
)


def roofline_layer(args: ModelArgs, weight_bytes: int, tflops: float, mem_gbps: float) -> opt.Curve:
    """One decoder layer for n tokens: max(its weights read from device memory, 2 x params x n FLOPs)."""
    params = args.layer_numel()
    return opt.Curve(GRID, tuple(max(weight_bytes / (mem_gbps * 1e9), 2 * params * n / (tflops * 1e12))
                                 for n in GRID))


def project(bandwidth_gbps: float, memory_gib: float, tflops: float, mem_gbps: float, p: Sequence[float],
            scenario: Scenario = SCENARIOS[0], max_tree: int = 1024, max_depth: int = 20) -> dict[str, Any]:
    target = ModelArgs.from_name(scenario.target)
    draft = target if is_self_draft(scenario.draft) else ModelArgs.from_name(scenario.draft)
    p = scenario.acceptance or p
    dtype = torch.float16
    tq, dq = scenario.target_quant, scenario.draft_quant
    target_layer_b, draft_layer_b = layer_bytes(target, dtype, tq), layer_bytes(draft, dtype, dq)
    draft_layer = roofline_layer(draft, draft_layer_b, tflops, mem_gbps)
    level = opt.Curve(GRID, tuple(draft.n_layers * float(draft_layer(n)) + 2 * draft.vocab_size * draft.dim /
                                  (mem_gbps * 1e9) for n in GRID))
    tm = opt.TimeModel(layer=roofline_layer(target, target_layer_b, tflops, mem_gbps), head=opt.Curve.constant(0.0),
                       host=opt.Curve.constant(5e-3), draft_level=level, n_layers=target.n_layers, resident=0,
                       layer_bytes=target_layer_b, bandwidth=bandwidth_gbps * 1e9, overlap=True)
    choice, tm = h.search_card(p, tm, (scenario.target, target, tq), (scenario.draft, draft, dq), dtype, cuda=True,
                               budget=int(memory_gib * 2**30), max_seq_len=2048, max_tree=max_tree,
                               max_depth=max_depth)
    best = choice.optimum.best
    return {"scenario": scenario.label, "layer_bytes": target_layer_b,
            "draft_bytes": choice.residency.budget.fixed["draft"], "resident_layers": len(choice.residency.resident),
            "n_layers": target.n_layers, "stream_s": tm.stream_s, "n": best.n, "depth": best.depth,
            "tokens_per_step": best.tokens_per_step, "s_per_token": best.s_per_token,
            "plain_s_per_token": opt.evaluate([-1], 1.0, tm).s_per_token}


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bandwidth-gbps", type=float, default=25.0, help="pinned host-to-device copy GB/s")
    ap.add_argument("--memory-gib", type=float, default=22.0, help="device budget (a 24 GB card less the context)")
    ap.add_argument("--tflops", type=float, default=80.0, help="fp16 dense throughput the layers reach")
    ap.add_argument("--mem-gbps", type=float, default=900.0, help="device memory bandwidth GB/s")
    ap.add_argument("--acceptance", default=None, help="p[1..W] as 0.8,0.1,...; default: DEFAULT_ACCEPTANCE")
    a = ap.parse_args(argv)
    p = parse_vector(a.acceptance) if a.acceptance else list(DEFAULT_ACCEPTANCE)
    print(f"{a.memory_gib:g} GiB budget, {a.bandwidth_gbps:g} GB/s copies, {a.tflops:g} TFLOPS, {a.mem_gbps:g} GB/s "
          f"device memory; acceptance {'given' if a.acceptance else 'DEFAULT_ACCEPTANCE (an assumption)'}")
    for scenario in SCENARIOS:
        try:
            r = project(a.bandwidth_gbps, a.memory_gib, a.tflops, a.mem_gbps, p, scenario)
        except ResourceError as e:  # a self-draft too large for the card: the runtime's own one-line refusal
            print(f"{scenario.label}: does not fit: {e}")
            continue
        shown = f"; acceptance {SELF_INT4_SOURCE} {list(scenario.acceptance)}" if scenario.acceptance else ""
        print(f"{r['scenario']}{shown}: layer {r['layer_bytes'] / 1e9:.3g} GB, draft {r['draft_bytes'] / 1e9:.3g} GB, "
              f"{r['resident_layers']}/{r['n_layers']} resident, stream {r['stream_s']:.2f} s per sweep; plain "
              f"{r['plain_s_per_token']:.2f} s/token; tree {r['n']} nodes depth {r['depth']}: "
              f"{r['tokens_per_step']:.2f} tokens/step, {r['s_per_token']:.3f} s/token "
              f"({1 / r['s_per_token']:.2f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
