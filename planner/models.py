"""The models a plan is for: a local checkpoint, or (when none is here) the published shape of a preset, so a
machine can be planned for a model it has not downloaded yet."""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from offload_runtime.api import registry
from offload_runtime.api.home import short_hash
from offload_runtime.api.plans import ModelRef, local_ref
from offload_runtime.errors import MissingFileError
from offload_runtime.model.config import PRESETS, ModelArgs
from offload_runtime.weights.gguf import model_args


def shape_dict(args: ModelArgs) -> dict[str, Any]:
    return {k: v for k, v in asdict(args).items() if k != "extra"}


def resolve_model(name: str | os.PathLike, *, allow_preset: bool = True) -> tuple[ModelRef, ModelArgs, str | None]:
    """A model's reference and shape, from a local checkpoint when there is one, else from a shape preset.

    Returns (ref, args, notice); the notice says when a preset stood in for a checkpoint not found locally.
    """
    name = str(name)
    ref = local_ref(name)
    if ref is not None:
        return ref, model_args(ref.path), None
    preset = registry.preset_for(name) if allow_preset else None
    if preset is not None:
        args = ModelArgs.from_name(preset)
        ref = ModelRef(name, f"preset:{preset}", "shape:" + short_hash(shape_dict(args), 32), None)
        notice = None if name == preset and registry.resolve_name(name) == name else (
            f"{name} is not available locally; using the published shapes of {preset} with random weights")
        return ref, args, notice
    path = Path(name).expanduser()
    if path.is_absolute() or name.startswith((".", "~")):  # meant as a path (not owner/name): say what is there
        what = ("is not a checkpoint directory or a GGUF file" if path.exists() else
                "not found: no such file or directory")
        raise MissingFileError(f"model {name} {what}; pass a checkpoint directory, a GGUF file, a Hugging Face repo "
                               f"id already in the cache, or a shape preset")
    presets = ", ".join(sorted(p for p in PRESETS if p != "tiny"))
    raise MissingFileError(
        f"model {name!r} not found locally (nothing is downloaded here): pass a checkpoint directory, a Hugging Face "
        f"repo id already in the cache, or a shape preset ({presets})"
    )
