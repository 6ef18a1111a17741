"""Engine.from_pretrained: find the checkpoints, read the plans, decide residency, build the models.

Every check that can fail on a user's input runs before the first weight is read (a 70B load takes minutes).
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..errors import UsageError
from ..memory import parse_bytes
from ..model.config import ModelArgs
from ..model.quantization import KernelChoice, QuantSpec
from ..model.tree import Tree
from ..residency import Residency, choose_residency, fixed_device_bytes
from ..spec.methods import get_method
from ..spec.policy import PlannedTree, TreePolicy, default_tree
from ..weights.checkpoint import Checkpoint, resolve_model_dir
from ..weights.loader import build_model
from ..weights.quantized import quant_spec_for
from . import registry
from .options import GenerationDefaults, parse_device, parse_dtype
from .home import short_hash, store_dir
from .plans import find_plans, load_plan, model_fingerprint, model_identity
from .text import load_tokenizer


def open_checkpoint(name: str) -> tuple[Path, Checkpoint]:
    path = resolve_model_dir(registry.resolve_name(name))
    ckpt = Checkpoint(path)
    ckpt.validate()
    return path, ckpt


def check_vocab_compatible(target_args: ModelArgs, draft_args: ModelArgs, target_tok: Any, draft_tok: Any,
                           target_name: str, draft_name: str) -> None:
    """The draft must speak the target's vocabulary; padded embedding sizes may differ."""
    if target_tok is not None and draft_tok is not None:
        tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
        shared = set(tv) & set(dv)
        same = len(shared) >= 0.99 * min(len(tv), len(dv)) and all(tv[t] == dv[t] for t in shared)
        if not same:
            raise UsageError(
                f"draft {draft_name} has another vocabulary than target {target_name}; pick a draft of the same "
                f"model family (same tokenizer), or run without one (--no-draft)"
            )
    elif target_args.vocab_size != draft_args.vocab_size:
        raise UsageError(
            f"draft {draft_name} has vocab_size {draft_args.vocab_size} but target {target_name} has "
            f"{target_args.vocab_size}; pick a draft with the target's vocabulary, or run without one (--no-draft)"
        )


@contextmanager
def progress_bar(total: int, label: str, show: bool) -> Iterator[Any]:
    """A per-layer progress callback (a tqdm bar on stderr when `show`)."""
    if not show:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=f"loading {label}", unit="layer", leave=False, file=sys.stderr)
    try:
        yield bar.update
    finally:
        bar.close()


def _draft_name(model: str, draft: str | os.PathLike | None | bool) -> str | None:
    if draft is None:
        return registry.default_draft(model)
    if draft is False:
        return None
    if draft is True or not isinstance(draft, (str, os.PathLike)):
        raise UsageError(f"draft must be a model name or path, None (the default draft) or False (no draft); "
                         f"got {draft!r}")
    return str(draft)


def _planned_trees(plan: str | os.PathLike | None, model: str, draft: str, device: torch.device,
                   dtype: torch.dtype, batch_size: int, max_seq_len: int, quiet: bool) -> list:
    """The plans to follow (one per sampling regime) after dropping those whose tree does not fit the window."""
    if plan is None:
        return []
    if str(plan) == "auto":
        lookup = find_plans(model, draft, device, dtype, batch_size=batch_size)
        plans, message = lookup.plans, lookup.message
    else:
        found, message = load_plan(plan, target=model, draft=draft, device=device, dtype=dtype)
        plans = [found]
    kept = []
    for p in plans:
        if len(p.tree) >= max_seq_len:
            message += (f"; plan {p.path}'s {len(p.tree)}-node tree does not fit the {max_seq_len}-token context "
                        f"window, so {p.regime()} requests use the default tree")
        else:
            kept.append(p)
    if message and not quiet:
        print(message, file=sys.stderr)
    return kept


def quant_cache_dir(path: Path) -> Path:
    """Where a checkpoint's linears quantized on load are kept: keyed like plans, by the checkpoint's
    fingerprint (config.json, shard headers and data ends), so a changed checkpoint never reads a stale cache."""
    return store_dir("quantized") / short_hash({"model": model_identity(path), "fingerprint": model_fingerprint(path)})


def planned_kernel(plan: Any, quant: QuantSpec | None) -> KernelChoice | None:
    """The int-kernel threshold the plan's profile measured for this format (None: measure at load)."""
    measured = (plan.figures.get("quant_kernel") or {}) if plan is not None and quant is not None else {}
    if "max_tokens" not in measured or plan.figures.get("quant") != quant.label:
        return None
    return KernelChoice(int(measured["max_tokens"]), f"plan {plan.path}")


def load(cls: type, model: str | os.PathLike, *, draft: str | os.PathLike | None | bool = None,
         device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         offload: bool | None = None, gpu_memory: str | int | None = None, max_seq_len: int | None = None,
         batch_size: int = 1, tree: Sequence[int] | Tree | None = None, method: Any = "sequoia",
         plan: str | os.PathLike | None = "auto", slots: int = 2, resident_layers: int | None = None,
         max_chunk: int = 2048, progress: bool | None = None, quiet: bool = False, quantize: str | None = None,
         group_size: int | None = None, draft_quantize: str | None = None, cache_quantized: bool = False) -> Any:
    """Engine.from_pretrained (api/engine.py documents the options)."""
    dev = parse_device(device)
    model = str(model)
    progress = sys.stderr.isatty() if progress is None else progress
    for label, value, lowest in (("batch_size", batch_size, 1), ("slots", slots, 1), ("max_chunk", max_chunk, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise UsageError(f"{label} must be a whole number >= {lowest}, got {value!r}")
    spec_method = get_method(method)
    fixed_tree = None
    if tree is not None:
        try:
            fixed_tree = Tree.of(tree)
        except (ValueError, TypeError) as e:
            raise UsageError(f"invalid tree: {e}") from None
    target_path, target_ckpt = open_checkpoint(model)
    targs = target_ckpt.args
    if group_size is not None and quantize is None and draft_quantize is None:
        raise UsageError("group_size (--group-size) needs quantize or draft_quantize (--quantize / --draft-quantize)")
    target_quant = quant_spec_for(targs, quantize, group_size if quantize else None, f"model {model}")
    dt = parse_dtype(dtype, dev, targs.torch_dtype)
    limit = targs.max_position_embeddings
    seq_len = min(limit, 4096) if max_seq_len is None else max_seq_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= limit:
        raise UsageError(f"max_seq_len must be between 1 and the model's context window ({limit}), got {max_seq_len}")
    tokenizer = load_tokenizer(target_path)
    defaults = GenerationDefaults.from_dir(target_path)
    draft_name = _draft_name(model, draft)
    draft_ckpt, draft_quant = None, None
    if draft_name is None and draft_quantize is not None:
        raise UsageError("draft_quantize (--draft-quantize) needs a draft; drop it or give --draft")
    if draft_name is not None:
        draft_path, draft_ckpt = open_checkpoint(draft_name)
        draft_quant = quant_spec_for(draft_ckpt.args, draft_quantize, group_size if draft_quantize else None,
                                     f"draft {draft_name}")
        check_vocab_compatible(targs, draft_ckpt.args, tokenizer, load_tokenizer(draft_path), model, draft_name)
    plans = []
    trees = TreePolicy.one(Tree([-1]))
    if draft_ckpt is not None:
        if fixed_tree is None:
            # Plans by the names the user gave, as the planner keyed them.
            plans = _planned_trees(plan, model, draft_name, dev, dt, batch_size, seq_len, quiet)
            trees = TreePolicy(default_tree(dev), [PlannedTree(p.temperature, p.top_p, Tree(p.tree), str(p.path))
                                                   for p in plans])
        else:
            trees = TreePolicy.one(fixed_tree)
    # The budget the plan for the model's default sampling chose its resident layers for.
    guide = next((p for p in plans if p.temperature == defaults.temperature), plans[0] if plans else None)
    if guide is not None and gpu_memory is None and resident_layers is None and guide.offload:
        gpu_memory = guide.gpu_memory
    fixed = fixed_device_bytes(targs, dt, draft_args=draft_ckpt.args if draft_ckpt else None, batch=batch_size,
                               max_seq_len=seq_len, tree_size=trees.largest, max_chunk=max_chunk, slots=slots,
                               on_cuda=dev.type == "cuda", quant=target_quant, draft_quant=draft_quant)
    residency = choose_residency(targs, dt, dev, offload=offload,
                                 budget_bytes=None if gpu_memory is None else parse_bytes(gpu_memory),
                                 fixed=fixed, slots=slots, resident_layers=resident_layers, quant=target_quant)
    with progress_bar(targs.n_layers, "target", progress) as tick:
        target = build_model(target_ckpt, dev, dt, residency, tick, quant=target_quant,
                             kernel=planned_kernel(guide, target_quant),
                             quant_cache=quant_cache_dir(target_path) if cache_quantized and quantize else None)
    draft_model = None
    if draft_ckpt is not None:
        everything = Residency(False, tuple(range(draft_ckpt.args.n_layers)), 0, None)
        with progress_bar(draft_ckpt.args.n_layers, "draft", progress) as tick:
            draft_model = build_model(draft_ckpt, dev, dt, everything, tick, quant=draft_quant,
                                      quant_cache=quant_cache_dir(draft_path) if cache_quantized and draft_quantize
                                      else None)
    eos = set(targs.eos_token_ids) | set(defaults.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return cls(target, draft_model, tokenizer, max_seq_len=seq_len, batch_size=batch_size, trees=trees,
               method=spec_method, defaults=defaults, eos_ids=eos, name=model, max_chunk=max_chunk,
               residency=residency, plans=plans)
