"""Calibrate the time model on real engine steps.

The profile times each phase in isolation (one layer, one draft level, the walk); a real step adds what they
leave out: Python between kernels, input building per level, allocator and cache effects. Running the engine
with the chosen tree for a few steps and dividing each phase's measured time by its predicted time gives one
factor per phase; the optimiser then searches again with the scaled model, so the plan predicts what the chat
measures.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import torch

from .acceptance import BUILTIN_PROMPTS


def measure_step_split(target: str, draft: str, *, device: torch.device, dtype: torch.dtype, tree: Sequence[int],
                       temperature: float, top_p: float, batch: int = 1, offload: bool | None = None,
                       gpu_memory: int | None = None, tokens: int = 64, min_time: float = 0.0, max_runs: int = 100,
                       reference: bool = True, seed: int = 0, host_memory: int | None = None,
                       prefetch: int | None = None, read_threads: int | None = None,
                       offload_dir: str | None = None, engine_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Seconds per step of each phase (draft_s, verify_s, host_s) while replying `tokens` tokens to short prompts,
    prompt processing included, as a chat turn does.

    The replies are repeated until `min_time` seconds have passed (at least once, at most `max_runs` times) and
    each phase's figure is the median over the repeats: a shared machine's speed comes and goes in bursts of
    seconds, and one short run would calibrate the plan to whichever burst it fell in.

    With `reference`, each repeat is followed by the same replies decoded plainly (no tree) on the same engine;
    the median of their seconds per token, `reference_s_per_token`, tells later measurements how fast the
    machine was while the plan was calibrated (tools/bench_cpu.py's plan check compares with it).
    """
    from offload_runtime.api.engine import Engine
    from offload_runtime.api.text import load_tokenizer
    from offload_runtime.weights.gguf import model_args

    tokenizer = load_tokenizer(target)
    texts = list(BUILTIN_PROMPTS[: max(batch, 2)])
    per_prompt = max(2, tokens)
    limit = model_args(target).max_position_embeddings
    template_slack = 64  # room for the chat template's tokens around each message
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(3, 64, (12,), generator=g).tolist() for _ in texts]
    else:
        prompts = [list(tokenizer(t).input_ids) for t in texts]
    longest = max(map(len, prompts)) + (template_slack if tokenizer is not None else 0)
    max_seq_len = min(limit, longest + per_prompt + len(tree) + 2)
    engine = Engine.from_pretrained(target, draft=draft, device=device, dtype=dtype, tree=list(tree), plan=None,
                                    quiet=True, progress=False, batch_size=batch, offload=offload,
                                    gpu_memory=gpu_memory, max_seq_len=max_seq_len, host_memory=host_memory,
                                    prefetch=prefetch, read_threads=read_threads, offload_dir=offload_dir,
                                    **(engine_options or {}))
    if tokenizer is not None:  # what the chat sends: each message under the chat template
        prompts = [engine.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    room = max(1, max_seq_len - per_prompt - len(tree) - 2)
    prompts = [p[-room:] for p in prompts]
    engine.generate(prompts[:1], max_new_tokens=4, temperature=temperature, top_p=top_p, seed=seed, ignore_eos=True)
    runs: list[dict[str, float]] = []
    t0 = time.perf_counter()
    while not runs or (time.perf_counter() - t0 < min_time and len(runs) < max_runs):
        seed_i = seed + len(runs)
        w0 = time.perf_counter()
        results = engine.generate(prompts, max_new_tokens=per_prompt, temperature=temperature, top_p=top_p,
                                  seed=seed_i, ignore_eos=True, tree=tree)
        wall = time.perf_counter() - w0
        call = results.stats
        k = max(1, call.steps)
        draft_s, verify_s = call.draft_s / k, call.sweep_s / k
        # host_s takes everything else the caller waits for, between steps included, so the three phases add
        # up to the wall time a reply takes.
        runs.append({"draft_s": draft_s, "verify_s": verify_s, "host_s": wall / k - draft_s - verify_s, "steps": k,
                     "tokens_per_sweep": sum(len(r.token_ids) for r in results) / k})
        if reference:
            r0 = time.perf_counter()
            plain = engine.generate(prompts, max_new_tokens=per_prompt, temperature=temperature, top_p=top_p,
                                    seed=seed_i, ignore_eos=True, tree=[-1])
            plain_tokens = max(1, sum(len(r.token_ids) for r in plain))
            runs[-1]["reference_s_per_token"] = (time.perf_counter() - r0) / plain_tokens
    out: dict[str, Any] = {key: statistics.median(r[key] for r in runs)
                           for key in ("draft_s", "verify_s", "host_s", "reference_s_per_token") if key in runs[0]}
    out.update(steps=sum(r["steps"] for r in runs), runs=len(runs), wall_s=time.perf_counter() - t0,
               tokens_per_sweep=statistics.mean(r["tokens_per_sweep"] for r in runs))
    return out


def measure_trees(target: str, draft: str, trees: Sequence[Any], *, device: torch.device, dtype: torch.dtype,
                  temperature: float, top_p: float, batch: int = 1, offload: bool | None = None,
                  gpu_memory: int | None = None, prompts: int = 8, tokens: int = 48, seed: int = 0,
                  max_seq_len: int | None = None, engine_options: dict[str, Any] | None = None
                  ) -> list[dict[str, Any]]:
    """Tokens per step and seconds per step of each tree (a parent array, or a DynamicTree that grows one per step),
    all on the same prompts and seeds, so their differences are the trees' own. `engine_options` load the pair as
    the plan will (quantized layers, host budget, disk tier).

    Each request generates past `tokens` and stops at the first step that reaches it, so no counted step is cut
    short by the length budget. The context window is `max_seq_len` (default: the model's, at most 4096), as the
    runtime will have it: a grown tree draws each level within the room left in it (spec/growth.py), so a window
    cut to the prompts would narrow the trees. tokens_per_step is pooled over sequences (tokens / steps) with a per-sequence
    standard error; draft_s, verify_s and host_s are per step (host_s: the rest of the wall time); nodes is the mean
    size of the verified trees and draft_nodes the nodes the draft ran per step.
    """
    import math

    from offload_runtime.api.engine import Engine
    from offload_runtime.api.text import load_tokenizer
    from offload_runtime.model.config import ModelArgs
    from offload_runtime.model.tree import Tree
    from offload_runtime.spec.growth import DynamicTree

    tokenizer = load_tokenizer(target)
    texts = list(BUILTIN_PROMPTS[: max(prompts, batch)])
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        ids = [torch.randint(3, 64, (12,), generator=g).tolist() for _ in texts]
    else:
        ids = [list(tokenizer(t).input_ids) for t in texts]
    specs = [t if isinstance(t, DynamicTree) else Tree.of(t) for t in trees]
    size = max(s.size if isinstance(s, DynamicTree) else len(s) for s in specs)
    depth = max(s.depth if isinstance(s, DynamicTree) else s.max_depth for s in specs)
    window = max_seq_len or min(ModelArgs.from_file(target).max_position_embeddings, 4096)
    room = max(1, window - tokens - depth - size - 2)
    ids = [x[-room:] for x in ids]
    engine = Engine.from_pretrained(target, draft=draft, device=device, dtype=dtype, tree=[-1], plan=None, quiet=True,
                                    progress=False, batch_size=batch, offload=offload, gpu_memory=gpu_memory,
                                    max_seq_len=window, **(engine_options or {}))
    for spec in specs:  # first calls allocate and warm caches: keep them out of the timings
        engine.generate(ids[:1], max_new_tokens=3, temperature=temperature, top_p=top_p, seed=seed, ignore_eos=True,
                        tree=spec)
    out = []
    for spec in specs:
        d = spec.depth if isinstance(spec, DynamicTree) else spec.max_depth
        requests = []
        for i, x in enumerate(ids):
            req = engine.request(x, max_new_tokens=tokens + d + 1, temperature=temperature, top_p=top_p,
                                 seed=seed + i, ignore_eos=True, tree=spec)
            req.stop_check = lambda r, new: len(new) if len(r.generated) + len(new) >= tokens else None
            requests.append(req)
        t0 = time.perf_counter()
        stats = [result.stats for _, result in sorted(engine.run(requests), key=lambda ir: ir[0])]
        wall = time.perf_counter() - t0
        call = engine.last_call
        steps = sum(s.steps for s in stats)
        R = sum(s.new_tokens for s in stats) / steps
        mean_steps = steps / len(stats)
        infl = [(s.new_tokens - R * s.steps) / mean_steps for s in stats]
        se = statistics.stdev(infl) / math.sqrt(len(infl)) if len(infl) > 1 else None
        k = max(1, call.steps)
        out.append({"tokens_per_step": R, "se": se, "steps": steps, "sequences": len(stats),
                    "draft_s": call.draft_s / k, "verify_s": call.sweep_s / k,
                    "host_s": wall / k - (call.draft_s + call.sweep_s) / k,
                    "nodes": statistics.mean(n for s in stats for n in s.tree_sizes),
                    "draft_nodes": sum(s.draft_nodes for s in stats) / steps})
    return out
