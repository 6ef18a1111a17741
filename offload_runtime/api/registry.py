"""Model names: aliases for published checkpoints, their default drafts, their shapes, and the bundled demo pair.

A default draft is a published repo whose tokenizer is the target's own (the same token ids, even where the two
pad their embedding tables to different sizes, as Qwen2.5's 0.5B-3B and 7B-72B do), roughly a tenth of its
size or less. Where no smaller model shares the tokenizer there is no default draft: the DeepSeek-R1 distills
rename the special tokens of the Llama 3 and Qwen2.5 tokenizers they start from (Qwen2.5's <|im_start|> is
<｜User｜> at the same id, 151644), so only a smaller distill drafts for a larger one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..model.config import PRESETS, ModelArgs

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
AWQ_GROUP = 128  # inputs per scale and zero point in the published AWQ checkpoints


@dataclass(frozen=True)
class Alias:
    repo: str  # Hugging Face repo id
    draft: str | None  # default draft (repo id), None where no smaller model shares the tokenizer
    preset: str | None  # its shapes in model/config.py PRESETS (sizes, and planning before the download)


def _family(prefix: str, repo_of: dict[str, str], preset_of: str, draft: str | None,
            instruct_draft: str | None = None, instruct: str | None = "-Instruct") -> dict[str, Alias]:
    """`prefix-size` (and `prefix-size-instruct` when `instruct`) for each size; the smallest drafts for none."""
    out: dict[str, Alias] = {}
    for size, repo in repo_of.items():
        smallest = repo == next(iter(repo_of.values()))
        preset = preset_of.format(size=size)
        out[f"{prefix}-{size}"] = Alias(repo, None if smallest else draft, preset)
        if instruct is not None:
            out[f"{prefix}-{size}-instruct"] = Alias(repo + instruct, None if smallest else instruct_draft, preset)
    return out


ALIASES: dict[str, Alias] = {
    "llama-2-7b": Alias("meta-llama/Llama-2-7b-hf", "JackFram/llama-68m", "llama-2-7b"),
    "llama-2-7b-chat": Alias("meta-llama/Llama-2-7b-chat-hf", "JackFram/llama-68m", "llama-2-7b"),
    "llama-2-13b": Alias("meta-llama/Llama-2-13b-hf", "JackFram/llama-160m", "llama-2-13b"),
    "llama-2-13b-chat": Alias("meta-llama/Llama-2-13b-chat-hf", "JackFram/llama-160m", "llama-2-13b"),
    "llama-2-70b": Alias("meta-llama/Llama-2-70b-hf", "meta-llama/Llama-2-7b-hf", "llama-2-70b"),
    "llama-2-70b-chat": Alias("meta-llama/Llama-2-70b-chat-hf", "meta-llama/Llama-2-7b-chat-hf", "llama-2-70b"),
    "llama-3-8b": Alias("meta-llama/Meta-Llama-3-8B", "meta-llama/Llama-3.2-1B", "llama-3-8b"),
    "llama-3-8b-instruct": Alias("meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct",
                                 "llama-3-8b"),
    "llama-3-70b": Alias("meta-llama/Meta-Llama-3-70B", "meta-llama/Meta-Llama-3-8B", "llama-3-70b"),
    "llama-3-70b-instruct": Alias("meta-llama/Meta-Llama-3-70B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct",
                                  "llama-3-70b"),
    "llama-3.1-8b": Alias("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.2-1B", "llama-3.1-8b"),
    "llama-3.1-8b-instruct": Alias("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct",
                                   "llama-3.1-8b"),
    "llama-3.1-70b": Alias("meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-8B", "llama-3.1-70b"),
    "llama-3.1-70b-instruct": Alias("meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Llama-3.1-8B-Instruct",
                                    "llama-3.1-70b"),
    **_family("llama-3.2", {"1b": "meta-llama/Llama-3.2-1B", "3b": "meta-llama/Llama-3.2-3B"}, "llama-3.2-{size}",
              "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct"),
    "llama-3.3-70b-instruct": Alias("meta-llama/Llama-3.3-70B-Instruct", "meta-llama/Llama-3.2-1B-Instruct",
                                    "llama-3.3-70b"),
    "mistral-7b": Alias("mistralai/Mistral-7B-v0.1", "Locutusque/TinyMistral-248M", "mistral-7b-v0.1"),
    "mistral-7b-instruct": Alias("mistralai/Mistral-7B-Instruct-v0.2", "Locutusque/TinyMistral-248M", "mistral-7b"),
    "qwen2-7b": Alias("Qwen/Qwen2-7B", "Qwen/Qwen2-0.5B", "qwen2-7b"),
    "qwen2-7b-instruct": Alias("Qwen/Qwen2-7B-Instruct", "Qwen/Qwen2-0.5B-Instruct", "qwen2-7b"),
    **_family("qwen2.5", {s: f"Qwen/Qwen2.5-{s.upper()}" for s in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b")},
              "qwen2.5-{size}", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct"),
    # Qwen3's repos are the post-trained (thinking / non-thinking) models; the -Base repos are not aliased.
    **_family("qwen3", {s: f"Qwen/Qwen3-{s.upper()}" for s in ("0.6b", "1.7b", "4b", "8b", "14b", "32b")},
              "qwen3-{size}", "Qwen/Qwen3-0.6B", instruct=None),
    **_family("deepseek-r1-distill-llama", {s: f"deepseek-ai/DeepSeek-R1-Distill-Llama-{s.upper()}"
                                            for s in ("8b", "70b")},
              "deepseek-r1-distill-llama-{size}", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", instruct=None),
    **_family("deepseek-r1-distill-qwen", {s: f"deepseek-ai/DeepSeek-R1-Distill-Qwen-{s.upper()}"
                                           for s in ("1.5b", "7b", "14b", "32b")},
              "deepseek-r1-distill-qwen-{size}", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", instruct=None),
    # Published 4-bit AWQ checkpoints of the big ones; they load once the runtime reads quantized layers.
    # Their drafts are those of their fp16 originals (the tokenizers are the originals').
    "llama-3.1-70b-instruct-awq": Alias("hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4",
                                        "meta-llama/Llama-3.2-1B-Instruct", "llama-3.1-70b"),
    "llama-3.3-70b-instruct-awq": Alias("ibnzterrell/Meta-Llama-3.3-70B-Instruct-AWQ-INT4",
                                        "meta-llama/Llama-3.2-1B-Instruct", "llama-3.3-70b"),
    "qwen2.5-32b-instruct-awq": Alias("Qwen/Qwen2.5-32B-Instruct-AWQ", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-32b"),
    "qwen2.5-72b-instruct-awq": Alias("Qwen/Qwen2.5-72B-Instruct-AWQ", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-72b"),
    "qwen3-32b-awq": Alias("Qwen/Qwen3-32B-AWQ", "Qwen/Qwen3-0.6B", "qwen3-32b"),
    "deepseek-r1-distill-llama-70b-awq": Alias("casperhansen/deepseek-r1-distill-llama-70b-awq",
                                               "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
                                               "deepseek-r1-distill-llama-70b"),
}


def demo_paths() -> tuple[Path, Path]:
    return DEMO_DIR / "target", DEMO_DIR / "draft"


def resolve_name(name: str) -> str:
    """An alias becomes its repo id (or the demo directory); anything else is returned unchanged."""
    if name == "demo":
        return str(demo_paths()[0])
    if name == "demo-draft":
        return str(demo_paths()[1])
    if name in ALIASES:
        return ALIASES[name].repo
    return name


def _alias_of(name: str) -> Alias | None:
    """The alias entry of an alias or of its repo id."""
    if name in ALIASES:
        return ALIASES[name]
    return next((a for a in ALIASES.values() if a.repo == name), None)


def default_draft(name: str) -> str | None:
    """The draft a model gets when none is named: the same tokenizer, roughly a tenth of its size or less."""
    if name == "demo" or Path(name).resolve() == demo_paths()[0].resolve():
        return "demo-draft"
    alias = _alias_of(name)
    return None if alias is None else alias.draft


def preset_for(name: str) -> str | None:
    """The shape preset of a preset name, an alias (llama-2-70b-chat) or an alias's repo id."""
    if name in PRESETS:
        return name
    alias = _alias_of(name)
    return None if alias is None else alias.preset


# --- the listing behind `--list-models`


@dataclass(frozen=True)
class ModelListing:
    alias: str
    repo: str
    draft: str | None
    params: int  # as the shapes count them (tied embeddings once)
    fp16_bytes: int  # the 16-bit checkpoint's weights
    int4_bytes: int  # the same model as a group-128 AWQ checkpoint (see int4_bytes)


def int4_bytes(args: ModelArgs, group: int = AWQ_GROUP) -> int:
    """Weight bytes of the model as a 4-bit AWQ checkpoint stores it (zero point, `group` inputs per group).

    Every decoder-layer projection [out, in] keeps 4-bit weights (out*in/2 bytes) plus, per group of `group`
    inputs and per output, an fp16 scale and a 4-bit zero point (2.5 bytes): 0.5 + 2.5/128 = 0.52 bytes per
    weight. Embeddings, lm_head, norms and biases stay fp16, as AutoAWQ leaves them.
    """
    layer = 0
    for name, shape in args.layer_shapes().items():
        if name.endswith("_proj.weight"):
            out, inp = shape
            layer += out * inp // 2 + out * math.ceil(inp / group) * 5 // 2
        else:
            layer += 2 * math.prod(shape)
    return args.n_layers * layer + 2 * args.global_numel()


def list_models() -> list[ModelListing]:
    """Every alias with a shape preset: repo id, default draft, parameters and checkpoint sizes."""
    rows = []
    for name, alias in ALIASES.items():
        if alias.preset is None:
            continue
        args = ModelArgs.from_name(alias.preset)
        rows.append(ModelListing(name, alias.repo, alias.draft, args.n_params(), 2 * args.n_params(),
                                 int4_bytes(args)))
    return rows
