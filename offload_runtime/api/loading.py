"""Engine.from_pretrained: find the checkpoints, read the plans, decide residency, build the models.

Every check that can fail on a user's input runs before the first weight is read (a 70B load takes minutes).
"""
from __future__ import annotations

import os
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import UsageError
from ..memory import parse_bytes
from ..model.config import ModelArgs
from ..model.quantization import KernelChoice, QuantSpec
from ..model.tree import Tree
from ..residency import Residency, choose_residency, device_budget_bytes, fixed_device_bytes
from ..spec.growth import ConfidenceAcceptance, DynamicTree
from ..spec.methods import get_method
from ..spec.policy import PlannedTree, TreePolicy, default_dynamic, default_tree, tree_option
from ..weights.checkpoint import Checkpoint, resolve_model_dir
from ..weights.disk import DEFAULT_PREFETCH, DEFAULT_READ_THREADS, LayerFiles, StoreKey, layout_signature, open_store
from ..weights.gguf import GGUFSource, is_gguf
from ..weights.layout import layer_layout
from ..weights.loader import build_model, packed_source
from ..weights.quantized import quant_spec_for, quantize_flags
from ..weights.source import WeightSource
from . import registry
from .home import short_hash, store_dir
from .options import GenerationDefaults, parse_device, parse_dtype
from .self_draft import check_self_draft_fits, is_self_draft, self_draft_quant
from .plans import find_plans, load_plan, model_fingerprint, model_identity
from .text import load_tokenizer


def open_checkpoint(name: str) -> tuple[Path, Checkpoint | GGUFSource]:
    """(path, source) of a model: a safetensors checkpoint directory, or a GGUF file (its path: the first file)."""
    resolved = registry.resolve_name(name)
    if is_gguf(resolved):
        source = GGUFSource(resolved)
        return source.path, source
    path = resolve_model_dir(resolved)
    ckpt = Checkpoint(path)
    ckpt.validate()
    return path, ckpt


def model_tokenizer(path: Path, source: Checkpoint | GGUFSource) -> Any:
    """The model's tokenizer (None: it ships none); a GGUF file's comes from its metadata, when that has one."""
    if isinstance(source, GGUFSource) and not source.has_tokenizer:
        return None
    return load_tokenizer(path)


@dataclass(frozen=True)
class VocabDifference:
    """Token ids whose token differs between two tokenizers (None: the id is not in that tokenizer)."""

    ids: list[tuple[int, str | None, str | None]]  # (id, target's token, draft's token), by id
    smaller: int  # size of the smaller vocabulary
    highest: int  # the highest id of the target's tokenizer

    def describe(self, limit: int = 4) -> str:
        def tok(t: str | None) -> str:
            return "nothing" if t is None else repr(t)
        shown = "; ".join(f"id {i} is {tok(t)} in the target but {tok(d)} in the draft" for i, t, d in self.ids[:limit])
        more = len(self.ids) - limit
        return shown + (f" (and {more} more ids)" if more > 0 else "")


def vocab_difference(target_tok: Any, draft_tok: Any) -> VocabDifference:
    tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
    t_by_id, d_by_id = {i: t for t, i in tv.items()}, {i: t for t, i in dv.items()}
    ids = sorted(set(t_by_id) | set(d_by_id))
    return VocabDifference([(i, t_by_id.get(i), d_by_id.get(i)) for i in ids if t_by_id.get(i) != d_by_id.get(i)],
                           min(len(tv), len(dv)), max(t_by_id, default=-1))


def check_vocab_compatible(target_args: ModelArgs, draft_args: ModelArgs, target_tok: Any, draft_tok: Any,
                           target_name: str, draft_name: str) -> str | None:
    """The draft must speak the target's vocabulary: the same token at (nearly) every id.

    Embedding tables padded to different sizes are fine (Qwen2.5-0.5B's 151936 rows, 72B's 152064, one tokenizer).
    A few ids whose token differs (renamed special tokens) are allowed: verification compares ids, so the output
    stays exact, and the returned notice says where the draft will guess poorly. More than 1% refuses the pair.
    """
    if target_tok is not None and draft_tok is not None:
        diff = vocab_difference(target_tok, draft_tok)
        if len(diff.ids) > 0.01 * diff.smaller:
            raise UsageError(
                f"draft {draft_name} has another vocabulary than target {target_name}: {diff.describe()}; pick a "
                f"draft of the same model family (same tokenizer), or run without one (--no-draft)"
            )
        missing = diff.highest + 1 - draft_args.vocab_size  # ids the draft could only see as its last row
        if missing > 0.01 * diff.smaller:
            raise UsageError(
                f"draft {draft_name}'s embedding has {draft_args.vocab_size} rows but the tokenizer has ids up to "
                f"{diff.highest}: the checkpoint's weights and its tokenizer do not belong together; pick a draft "
                f"of the same model family, or run without one (--no-draft)"
            )
        if diff.ids:
            n = len(diff.ids)
            return (f"draft {draft_name} and target {target_name} differ in {n} token id{'s' * (n != 1)} "
                    f"({diff.describe(2)}): the output is unchanged, but the draft guesses poorly where they appear")
        return None
    if target_args.vocab_size != draft_args.vocab_size:
        raise UsageError(
            f"draft {draft_name} has vocab_size {draft_args.vocab_size} but target {target_name} has "
            f"{target_args.vocab_size}; pick a draft with the target's vocabulary, or run without one (--no-draft)"
        )
    if (target_tok is None) != (draft_tok is None):
        which = f"draft {draft_name}" if draft_tok is None else f"target {target_name}"
        return (f"{which} has no tokenizer, so the pair's vocabularies cannot be compared; the draft's ids are taken "
                f"to be the target's (the output is unchanged; a draft of another vocabulary only guesses poorly)")
    return None


@contextmanager
def progress_bar(total: int, label: str, show: bool, verb: str = "loading") -> Iterator[Any]:
    """A per-layer progress callback (a tqdm bar on stderr when `show`)."""
    if not show:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=f"{verb} {label}", unit="layer", leave=False, file=sys.stderr)
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
                   dtype: torch.dtype, batch_size: int, max_seq_len: int, quiet: bool,
                   formats: tuple[str | None, str | None], flags: str, mode: str = "auto") -> list:
    """The plans to follow (one per sampling regime, made for these weight formats) after dropping those whose
    tree does not fit the window."""
    if plan is None:
        return []
    if str(plan) == "auto":
        lookup = find_plans(model, draft, device, dtype, batch_size=batch_size, formats=formats, flags=flags)
        plans, message = lookup.plans, lookup.message
    else:
        found, message = load_plan(plan, target=model, draft=draft, device=device, dtype=dtype, formats=formats)
        plans = [found]
    kept = []
    for p in plans:
        if len(p.tree) >= max_seq_len:
            message += (f"; plan {p.path}'s {len(p.tree)}-node tree does not fit the {max_seq_len}-token context "
                        f"window, so {p.regime()} requests use the default tree")
        else:
            kept.append(p)
    if mode == "dynamic" and not any(p.dynamic and p.dynamic.get("acceptance") for p in kept):
        message += ("; " if message else "") + ("dynamic trees have no measured calibration here: they are keyed by "
                                                "the draft's own probabilities (a plan measures one)")
    if message and not quiet:
        print(message, file=sys.stderr)
    return kept


def layer_store(path: Path, source: WeightSource, dtype: torch.dtype, quant: QuantSpec | None,
                offload_dir: str | os.PathLike | None, *, progress: bool, quiet: bool) -> LayerFiles:
    """The checkpoint's disk store (written first when missing, finished when interrupted, rebuilt when stale):
    in `offload_dir`, else in the runtime home under a name of the checkpoint and the layout. `source` and
    `quant` are the packed source and format the loader reads (weights/loader.py packed_source)."""
    layout = layer_layout(source.args, dtype, quant)
    key = StoreKey(model_identity(path), model_fingerprint(path), source.label)
    directory = Path(offload_dir) if offload_dir is not None else \
        store_dir("layer-stores") / short_hash([key.identity, layout_signature(layout)])

    def log(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr)

    with ExitStack() as bars:
        def start(total: int) -> Any:
            log(f"writing the layer store of {source.label} to {directory} ({total} of {source.args.n_layers} "
                f"layers; once)")
            return bars.enter_context(progress_bar(total, "layer store", progress, verb="writing"))

        return open_store(directory, key, layout, source.args.n_layers, source, explicit=offload_dir is not None,
                          progress=start, log=log)


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


def planned_tree(plan: Any) -> PlannedTree:
    """What the runtime takes from a plan (api/plans.py Plan): its static tree, its policy, its dynamic budget."""
    grown = None
    if plan.dynamic:
        d = plan.dynamic
        calibration = ConfidenceAcceptance.from_dict(d["acceptance"]) if d.get("acceptance") else None
        grown = DynamicTree(int(d["size"]), int(d["depth"]), d.get("width"), calibration)
    return PlannedTree(plan.temperature, plan.top_p, Tree(plan.tree), str(plan.path), plan.policy, grown,
                       tuple(plan.acceptance.get("p") or ()))


def load(cls: type, model: str | os.PathLike, *, draft: str | os.PathLike | None | bool = None,
         device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         offload: bool | None = None, gpu_memory: str | int | None = None, max_seq_len: int | None = None,
         batch_size: int = 1, tree: Any = None, tree_size: int | None = None, tree_depth: int | None = None,
         method: Any = "sequoia",
         plan: str | os.PathLike | None = "auto", slots: int = 2, resident_layers: int | None = None,
         max_chunk: int = 2048, host_memory: str | int | None = None, offload_dir: str | os.PathLike | None = None,
         prefetch: int | None = None, read_threads: int | None = None, progress: bool | None = None,
         quiet: bool = False, quantize: str | None = None, group_size: int | None = None,
         draft_quantize: str | None = None, cache_quantized: bool = False) -> Any:
    """Engine.from_pretrained (api/engine.py documents the options)."""
    dev = parse_device(device)
    model = str(model)
    progress = sys.stderr.isatty() if progress is None else progress
    for label, value, lowest in (("batch_size", batch_size, 1), ("slots", slots, 1), ("max_chunk", max_chunk, 1),
                                 ("prefetch", 1 if prefetch is None else prefetch, 1),
                                 ("read_threads", 1 if read_threads is None else read_threads, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise UsageError(f"{label} must be a whole number >= {lowest}, got {value!r}")
    spec_method = get_method(method)
    mode, fixed_tree = tree_option(tree, tree_size, tree_depth)
    target_path, target_ckpt = open_checkpoint(model)
    targs = target_ckpt.args
    draft_name = _draft_name(model, draft)
    self_draft = is_self_draft(draft_name)
    if group_size is not None and quantize is None and draft_quantize is None and not self_draft:
        raise UsageError("group_size (--group-size) needs quantize or draft_quantize (--quantize / --draft-quantize)")
    if cache_quantized and quantize is None:
        raise UsageError("cache_quantized (--cache-quantized) keeps the target's layers as quantized on load; it "
                         "needs quantize (--quantize int4|int8): add it, or drop --cache-quantized")
    if offload is False and (host_memory is not None or offload_dir is not None):
        raise UsageError("host_memory and offload_dir (--host-memory, --offload-dir) place streamed layers, but "
                         "offload=False (--no-offload) streams none; drop one or the other")
    target_quant = quant_spec_for(targs, quantize, group_size if quantize else None, f"model {model}")
    dt = parse_dtype(dtype, dev, targs.torch_dtype, target_quant)
    limit = targs.max_position_embeddings
    seq_len = min(limit, 4096) if max_seq_len is None else max_seq_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= limit:
        raise UsageError(f"max_seq_len (--max-seq-len) must be between 1 and the model's context window ({limit}), "
                         f"got {max_seq_len}")
    nodes = len(fixed_tree) if isinstance(fixed_tree, Tree) else fixed_tree.size if fixed_tree else tree_size
    if draft_name is not None and nodes is not None and nodes >= seq_len:  # else each step would cut it, unseen
        raise UsageError(f"a tree of {nodes} nodes does not fit the {seq_len}-token context with a prompt beside it; "
                         f"pass a smaller tree (--tree, --tree-size) or a larger --max-seq-len (up to {limit})")
    tokenizer = model_tokenizer(target_path, target_ckpt)
    defaults = GenerationDefaults.from_dir(target_path if target_path.is_dir() else None)
    draft_ckpt, draft_quant = None, None
    if draft_name is None and draft_quantize is not None:
        raise UsageError("draft_quantize (--draft-quantize) needs a draft; drop it or give --draft")
    if self_draft:  # the target's own checkpoint, in fewer bits (api/self_draft.py); its tokenizer is the target's
        draft_path, draft_ckpt = target_path, target_ckpt
        draft_quant = self_draft_quant(draft_name, targs, target_quant, group_size, draft_quantize, model)
    elif draft_name is not None:
        draft_path, draft_ckpt = open_checkpoint(draft_name)
        draft_quant = quant_spec_for(draft_ckpt.args, draft_quantize, group_size if draft_quantize else None,
                                     f"draft {draft_name}")
        notice = check_vocab_compatible(targs, draft_ckpt.args, tokenizer, model_tokenizer(draft_path, draft_ckpt), model,
                                        draft_name)
        if notice and not quiet:
            print(notice, file=sys.stderr)
    plans = []
    trees = TreePolicy.one(Tree([-1]))
    if draft_ckpt is not None:
        if fixed_tree is None:
            # Plans by the names the user gave, as the planner keyed them.
            formats = (target_quant.label if target_quant else None, draft_quant.label if draft_quant else None)
            plans = _planned_trees(plan, model, draft_name, dev, dt, batch_size, seq_len, quiet, formats,
                                   quantize_flags(quantize, group_size, draft_quantize), mode)
            trees = TreePolicy(default_tree(dev), [planned_tree(p) for p in plans], mode=mode, size=tree_size,
                               depth=tree_depth, default_grown=default_dynamic(dev))
        else:
            trees = TreePolicy.one(fixed_tree)
    # The budget the plan for the model's default sampling chose its resident layers for.
    guide = next((p for p in plans if p.temperature == defaults.temperature), plans[0] if plans else None)
    if guide is not None and gpu_memory is None and resident_layers is None and guide.offload:
        gpu_memory = guide.gpu_memory
    if guide is not None and host_memory is None and guide.storage.get("host_memory") is not None:
        host_memory = guide.storage["host_memory"]
        prefetch = guide.storage.get("prefetch") if prefetch is None else prefetch
        read_threads = guide.storage.get("read_threads") if read_threads is None else read_threads
    fixed = fixed_device_bytes(targs, dt, draft_args=draft_ckpt.args if draft_ckpt else None, batch=batch_size,
                               max_seq_len=seq_len, tree_size=trees.largest, max_chunk=max_chunk, slots=slots,
                               on_cuda=dev.type == "cuda", quant=target_quant, draft_quant=draft_quant,
                               draft_shares_globals=self_draft)
    if self_draft:
        check_self_draft_fits(draft_name, fixed, device_budget_bytes(
            None if gpu_memory is None else parse_bytes(gpu_memory), dev), draft_quant, targs)
    residency = choose_residency(targs, dt, dev, offload=offload,
                                 budget_bytes=None if gpu_memory is None else parse_bytes(gpu_memory),
                                 fixed=fixed, slots=slots, resident_layers=resident_layers,
                                 host_budget=None if host_memory is None else parse_bytes(host_memory),
                                 prefetch=prefetch or DEFAULT_PREFETCH, quant=target_quant)
    # On the CPU the "device" is RAM: the target's load checks RAM for the caches, the draft and the rest beside
    # it. Not counted: its own embeddings (it counts them), staging slots when nothing streams, and activations,
    # whose bound is the device budget's, generous for the transient buffers of one chunk.
    beside = {} if dev.type != "cpu" else {
        "KV caches": fixed["target KV cache"] + fixed.get("draft KV cache", 0),
        **{k: v for k, v in fixed.items() if k not in ("embeddings and head", "target KV cache", "draft KV cache",
                                                       "activations") and (k != "staging slots" or residency.offload)}}
    target_source, target_quant = packed_source(target_ckpt, target_quant, dev,
                                                quant_cache_dir(target_path) if cache_quantized and quantize else None)
    disk_store = None
    if offload_dir is not None and not residency.offload and not quiet:
        print(f"note: --offload-dir {offload_dir} is not used: the whole model is held in memory (nothing streams; "
              f"--host-memory below the model's size puts layers on disk)", file=sys.stderr)
    if residency.offload and (residency.disk or offload_dir is not None):
        if targs.ggml_types is not None:
            raise UsageError(f"{model} is a GGUF file, whose layers stream from host RAM only: the disk store "
                             f"(offload_dir / --offload-dir, or host_memory below the model's size) does not hold "
                             f"GGUF layers yet; drop those options or give more host memory")
        disk_store = layer_store(target_path, target_source, dt, target_quant, offload_dir, progress=progress,
                                 quiet=quiet)
    with progress_bar(targs.n_layers, "target", progress) as tick:
        target = build_model(target_source, dev, dt, residency, tick, quant=target_quant,
                             kernel=planned_kernel(guide, target_quant), disk_store=disk_store,
                             read_threads=read_threads or DEFAULT_READ_THREADS, beside=beside)
    draft_model = None
    if draft_ckpt is not None:
        everything = Residency(False, tuple(range(draft_ckpt.args.n_layers)), 0, None)
        with progress_bar(draft_ckpt.args.n_layers, "draft", progress) as tick:
            draft_model = build_model(draft_ckpt, dev, dt, everything, tick, quant=draft_quant,
                                      quant_cache=quant_cache_dir(draft_path) if cache_quantized and
                                      (draft_quantize or self_draft) else None,
                                      shared_globals=target.globals if self_draft else None)
    eos = set(targs.eos_token_ids) | set(defaults.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return cls(target, draft_model, tokenizer, max_seq_len=seq_len, batch_size=batch_size, trees=trees,
               method=spec_method, defaults=defaults, eos_ids=eos, name=model, max_chunk=max_chunk,
               residency=residency, plans=plans)
