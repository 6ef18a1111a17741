"""Self-drafts: the target's own checkpoint, quantized on load and held whole on the device, drafts for it.

A low-bit copy of the target agrees with it far more often than a separately trained small model (SubSpec,
arXiv 2509.18344, drafts with a 4-bit copy of the offloaded target), needs no second checkpoint and always
shares its vocabulary. Spellings (`draft=` / `--draft`):

- "self-int4", "self-int8": the target's weights quantized round-to-nearest group-wise on load (the
  quantized-weights machinery, weights/quantized.py), group size from group_size / --group-size or 128.
  From an AWQ / GPTQ checkpoint the copy is the checkpoint's own integers (nothing to re-quantize).
- "self": the same packed weights the target is held in (its --quantize format, or a quantized checkpoint's
  own): a resident copy of exactly the weights that stream, so under greedy decoding every draft token is
  accepted until the depth limit. A float target has no lower-bit form to copy, so "self" needs one.

A self-draft is never of more bits than a quantized target (an int8 draft of an int4 target is a different model
from the target, and a larger one). The embedding, final norm and head are the target's own tensors (shared on
the device, so they are counted once): quantizing on load never touches them, so sharing changes no result.
Plans and acceptance files are keyed by the draft's packed format (`self_identity`), so self-int4 and self-int8
and an external draft each have their own.
"""
from __future__ import annotations

import os

from ..errors import ResourceError, UsageError
from ..memory import fmt_bytes
from ..model.config import ModelArgs
from ..model.quantization import QuantSpec
from ..weights.quantized import quant_spec_for

SELF_DRAFTS = ("self-int4", "self-int8", "self")


def is_self_draft(name: str | os.PathLike | None) -> bool:
    """Whether a draft name is a self-draft spelling (a directory of that name needs a path: ./self-int4)."""
    return isinstance(name, str) and name in SELF_DRAFTS


def self_draft_quant(name: str, target_args: ModelArgs, target_quant: QuantSpec | None, group_size: int | None,
                     draft_quantize: str | None, target_name: str) -> QuantSpec:
    """The packed format of the self-draft `name` of a target held in `target_quant` (None: float)."""
    assert is_self_draft(name), name
    if target_args.ggml_types is not None:
        # Its layers are the file's GGML blocks, not floats to quantize or one QuantSpec to copy.
        raise UsageError(f"--draft {name} is not supported for a GGUF file ({target_name}) yet; give a draft with "
                         f"the same tokenizer (--draft PATH: a checkpoint or GGUF file) or --no-draft")
    if draft_quantize is not None:
        raise UsageError(f"--draft {name} already says how the draft is quantized; drop --draft-quantize / "
                         f"draft_quantize=")
    if name == "self":
        if target_quant is None:
            raise UsageError(f"--draft self holds the target's own packed weights, but {target_name} is loaded as "
                             f"floats; add --quantize int4|int8, or use --draft self-int4 / self-int8")
        return target_quant
    bits = int(name.removeprefix("self-int"))
    if target_quant is not None and bits > target_quant.bits:
        raise UsageError(f"--draft {name} would hold more bits than the target itself ({target_quant.label}); "
                         f"use --draft self (the same {target_quant.label} weights) or a lower bit width")
    if target_quant is not None and bits == target_quant.bits:
        return target_quant  # one group size serves both: quantizing again would give the integers that stream
    if target_args.quantization is not None:
        raise UsageError(f"{target_name} is a {target_quant.label} checkpoint; its self-draft is its own weights "
                         f"(--draft self); lower bit widths of it are not supported")
    return quant_spec_for(target_args, f"int{bits}", group_size, f"the {name} draft of {target_name}")


def self_identity(target_identity: str, quant_label: str) -> str:
    """What plans and acceptance files know a self-draft by: its packed format and the target it copies."""
    return f"self:{quant_label}:{target_identity}"


def check_self_draft_fits(name: str, fixed: dict[str, int], budget_bytes: int | None, quant: QuantSpec,
                          target_args: ModelArgs) -> None:
    """Refuse, in one line, a self-draft whose low-bit copy leaves no room on the device: with the target's KV
    cache, activations and staging slots (`fixed`, residency.fixed_device_bytes) it must fit the budget."""
    if budget_bytes is None:
        return
    need = sum(fixed.values())
    if need <= budget_bytes:
        return
    lower = "self-int4" if quant.bits > 4 else None
    advice = (f"use --draft {lower} (fewer bits), an external draft (--draft NAME)" if lower
              else "use an external draft (--draft NAME)") + " or no draft (--no-draft)"
    raise ResourceError(
        f"the {name} draft ({target_args.n_layers} layers at {quant.label}: {fmt_bytes(fixed['draft'])}) does not "
        f"fit the device budget {fmt_bytes(budget_bytes)} with the rest the target needs there "
        f"({fmt_bytes(need - fixed['draft'])}); {advice}")
