"""Calibrate the time model on real engine steps.

The profile times each phase in isolation (one layer, one draft level, the walk); a real step adds what they
leave out: Python between kernels, input building per level, allocator and cache effects. Running the engine
with the chosen tree for a few steps and dividing each phase's measured time by its predicted time gives one
factor per phase; the optimiser then searches again with the scaled model, so the plan predicts what the chat
measures.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from .acceptance import BUILTIN_PROMPTS


def measure_step_split(target: str, draft: str, *, device: torch.device, dtype: torch.dtype, tree: Sequence[int],
                       temperature: float, top_p: float, batch: int = 1, offload: bool | None = None,
                       gpu_memory: int | None = None, tokens: int = 64, seed: int = 0) -> dict[str, Any]:
    """Mean seconds per step of each phase (draft_s, verify_s, host_s) while replying `tokens` tokens to short
    prompts, prompt processing included, as a chat turn does."""
    from offload_runtime.checkpoint import load_tokenizer
    from offload_runtime.config import ModelArgs
    from offload_runtime.engine import Engine

    tokenizer = load_tokenizer(target)
    texts = list(BUILTIN_PROMPTS[: max(batch, 2)])
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(3, 64, (12,), generator=g).tolist() for _ in texts]
    else:
        prompts = [list(tokenizer(t).input_ids) for t in texts]
    per_prompt = max(2, tokens)
    limit = ModelArgs.from_file(target).max_position_embeddings
    room = max(1, limit - per_prompt - len(tree) - 2)
    prompts = [p[-room:] for p in prompts]
    engine = Engine.from_pretrained(target, draft=draft, device=device, dtype=dtype, tree=list(tree), plan=None,
                                    quiet=True, progress=False, batch_size=batch, offload=offload,
                                    gpu_memory=gpu_memory,
                                    max_seq_len=min(limit, max(map(len, prompts)) + per_prompt + len(tree) + 2))
    engine.generate(prompts[:1], max_new_tokens=4, temperature=temperature, top_p=top_p, seed=seed, ignore_eos=True)
    before = engine.decoder.times
    draft_s, verify_s, other_s, n = before.draft_s, before.verify_s, before.other_s, before.steps
    t0 = time.perf_counter()
    results = engine.generate(prompts, max_new_tokens=per_prompt, temperature=temperature, top_p=top_p, seed=seed,
                              ignore_eos=True)
    t = engine.decoder.times
    k = max(1, t.steps - n)
    return {"draft_s": (t.draft_s - draft_s) / k, "verify_s": (t.verify_s - verify_s) / k,
            "host_s": (t.other_s - other_s) / k, "steps": k,
            "tokens_per_sweep": sum(len(r.token_ids) for r in results) / k, "wall_s": time.perf_counter() - t0}
