"""Plans: what the planner chose for one machine and model pair, saved as JSON, found again by the runtime.

A plan is keyed by the machine (its fingerprint id), the model pair (each model's identity: a checkpoint
directory, a Hugging Face repo, or a shape preset), the device type, the dtype, the sampling settings and the
batch size. It also records each model's *fingerprint* (config.json and every shard's name, size, safetensors
header and first and last MiB of data: cheap, no full read), so a plan whose model files or machine changed
is recognised as stale and never used silently.

For the runtime:
    find_plan(target, draft, device, dtype, temperature, top_p, batch_size) -> (Plan | None, one-line message)
    load_plan(path, target=..., draft=..., device=..., dtype=...)          -> (Plan, one-line message)
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from offload_runtime import registry
from offload_runtime.config import PRESETS, ModelArgs
from offload_runtime.errors import MissingFileError, OffloadError

from . import hardware

PLAN_VERSION = 1
_EDGE_BYTES = 1 << 20  # data bytes hashed at each end of a shard


class PlanError(OffloadError):
    """A plan file that cannot be read or used."""


# --- models: identity and fingerprint


@dataclass(frozen=True)
class ModelRef:
    name: str  # as the user gave it: an alias, a path, a repo id or a preset name
    identity: str  # what plans are keyed by: an absolute path, hf:owner/name, or preset:name
    fingerprint: str  # of the files (checkpoints) or of the shape (presets)
    path: str | None  # the checkpoint directory; None for a shape preset

    @property
    def is_preset(self) -> bool:
        return self.path is None


def _hf_identity(path: Path) -> str | None:
    """hf:owner/name for a directory inside the Hugging Face cache (.../models--owner--name/snapshots/<rev>)."""
    parts = path.resolve().parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return "hf:" + parts[i][len("models--"):].replace("--", "/", 1)
    return None


def model_identity(path: str | os.PathLike) -> str:
    path = Path(path)
    return _hf_identity(path) or str(path.resolve())


def model_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of config.json and, for each shard, its name, size, safetensors header and first/last MiB of data."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        h.update(b"config.json\0" + (path / "config.json").read_bytes())
    except OSError:
        raise MissingFileError(f"{path / 'config.json'} not found: is {path} a checkpoint directory?") from None
    for shard in sorted(path.glob("*.safetensors")):
        size = shard.stat().st_size
        h.update(f"\0{shard.name}\0{size}\0".encode())
        with open(shard, "rb") as f:
            head = f.read(8)
            h.update(head)
            if len(head) < 8:
                continue
            (n,) = struct.unpack("<Q", head)
            n = min(n, max(0, size - 8))
            h.update(f.read(n))
            start = 8 + n
            h.update(f.read(min(_EDGE_BYTES, size - start)))
            if size - start > 2 * _EDGE_BYTES:
                f.seek(size - _EDGE_BYTES)
                h.update(f.read(_EDGE_BYTES))
    return h.hexdigest()


def _local_dir(name: str) -> Path | None:
    """A local checkpoint directory for `name` (path, alias, or repo id already in the HF cache); never downloads."""
    resolved = registry.resolve_name(name)
    path = Path(resolved).expanduser()
    if path.is_dir():
        return path
    if resolved.count("/") == 1 and not resolved.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import LocalEntryNotFoundError
        except ImportError:  # pragma: no cover - a dependency
            return None
        try:
            return Path(snapshot_download(resolved, allow_patterns=["*.json", "*.safetensors"], local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            return None
    return None


def _preset_for(name: str) -> str | None:
    """The shape preset of a preset name, an alias (llama-2-70b-chat) or an alias's repo id."""
    if name in PRESETS:
        return name
    for alias, (repo, _) in registry.ALIASES.items():
        if name == repo:
            name = alias
            break
    if name in PRESETS:
        return name
    for suffix in ("-chat", "-instruct"):
        if name.endswith(suffix) and name[: -len(suffix)] in PRESETS:
            return name[: -len(suffix)]
    return None


def resolve_model(name: str | os.PathLike, *, allow_preset: bool = True) -> tuple[ModelRef, ModelArgs, str | None]:
    """A model's reference and shape, from a local checkpoint when there is one, else from a shape preset.

    Returns (ref, args, notice); the notice says when a preset stood in for a checkpoint not found locally.
    """
    name = str(name)
    path = _local_dir(name)
    if path is not None:
        if not (path / "config.json").is_file():
            raise MissingFileError(f"{path} has no config.json; pass a checkpoint directory")
        args = ModelArgs.from_file(path)
        return ModelRef(name, model_identity(path), model_fingerprint(path), str(path)), args, None
    preset = _preset_for(name) if allow_preset else None
    if preset is not None:
        args = ModelArgs.from_name(preset)
        ref = ModelRef(name, f"preset:{preset}", "shape:" + hardware.short_hash(asdict_args(args), 32), None)
        notice = None if name == preset and registry.resolve_name(name) == name else (
            f"{name} is not available locally; using the published shapes of {preset} with random weights")
        return ref, args, notice
    presets = ", ".join(sorted(p for p in PRESETS if p != "tiny"))
    raise MissingFileError(
        f"model {name!r} not found locally (nothing is downloaded here): pass a checkpoint directory, a Hugging Face "
        f"repo id already in the cache, or a shape preset ({presets})"
    )


def asdict_args(args: ModelArgs) -> dict[str, Any]:
    return {k: v for k, v in asdict(args).items() if k != "extra"}


# --- sampling defaults


def default_sampling(target_path: str | os.PathLike | None) -> tuple[float, float]:
    """(temperature, top_p) the engine uses when a request names none: generation_config.json's when it samples,
    else greedy."""
    cfg: dict[str, Any] = {}
    if target_path is not None:
        f = Path(target_path) / "generation_config.json"
        if f.is_file():
            try:
                cfg = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                cfg = {}
    if not cfg.get("do_sample"):
        return 0.0, 1.0
    return float(cfg.get("temperature", 1.0)), float(cfg.get("top_p", 1.0))


def dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).replace("torch.", "")


# --- the plan


@dataclass
class Plan:
    target: ModelRef
    draft: ModelRef
    device: str  # "cuda" or "cpu"
    dtype: str
    temperature: float
    top_p: float
    batch_size: int
    machine: dict[str, Any]  # the fingerprint; machine["id"] is the key
    tree: list[int]  # parent array, BFS order
    resident_layers: list[int]
    n_layers: int
    offload: bool
    gpu_memory: int | None  # the device budget the residency was chosen for (None: free memory / no budget)
    max_seq_len: int
    slots: int
    acceptance: dict[str, Any]  # p, se, steps, source, file, width
    figures: dict[str, Any]  # the profile figures the prediction used
    predicted: dict[str, float]  # tokens_per_step, step_s, draft_s, verify_s, host_s, s_per_token, tokens_per_s
    candidates: list[dict[str, Any]] = field(default_factory=list)
    search: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    version: int = PLAN_VERSION
    path: Path | None = field(default=None, compare=False)  # where it was read from / written to

    # --- derived

    @property
    def n(self) -> int:
        return len(self.tree)

    @property
    def depth(self) -> int:
        from .optimizer import internal_per_level

        return len(internal_per_level(self.tree))

    @property
    def machine_id(self) -> str:
        return str(self.machine.get("id"))

    def key(self) -> dict[str, Any]:
        return {"machine": self.machine_id, "target": self.target.identity, "draft": self.draft.identity,
                "device": self.device, "dtype": self.dtype, "temperature": _round(self.temperature),
                "top_p": _round(self.top_p), "batch_size": self.batch_size}

    def default_path(self) -> Path:
        return hardware.store_dir("plans") / f"{hardware.short_hash(self.key())}.json"

    def summary(self) -> str:
        pr = self.predicted
        return (f"{self.n} nodes, depth {self.depth}, {len(self.resident_layers)}/{self.n_layers} resident layers"
                f"{f', batch {self.batch_size}' if self.batch_size != 1 else ''}, predicted "
                f"{pr['s_per_token']:.3g} s/token ({pr['tokens_per_step']:.2f} tokens/step, "
                f"{pr['tokens_per_s']:.3g} tokens/s)")

    def rebuild_command(self) -> str:
        return plan_command(self.target.name, self.draft.name, self.device, self.temperature, self.top_p,
                            self.batch_size, dtype=self.dtype, gpu_memory=self.gpu_memory)

    # --- JSON

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        from .optimizer import internal_per_level

        return {"kind": "plan", "key": self.key(), **d, "n": self.n, "depth": self.depth,
                "level_widths": internal_per_level(self.tree)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> "Plan":
        if not isinstance(data, dict) or data.get("kind") != "plan":
            raise PlanError(f"{where} is not a planner plan; make one with `python -m planner plan`")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"{where} has plan format version {data.get('version')}, this runtime reads "
                            f"{PLAN_VERSION}; rebuild it with `python -m planner plan`")
        try:
            fields = {k: data[k] for k in cls.__dataclass_fields__ if k != "path"}
            fields["target"] = ModelRef(**data["target"])
            fields["draft"] = ModelRef(**data["draft"])
            plan = cls(**fields)
            from offload_runtime.tree import Tree

            Tree(plan.tree)  # a valid parent array
            for k in ("tokens_per_step", "s_per_token", "tokens_per_s"):
                float(plan.predicted[k])
        except KeyError as e:
            raise PlanError(f"{where} is not a complete plan (no {e.args[0]!r}); rebuild it with "
                            f"`python -m planner plan`") from None
        except (TypeError, ValueError) as e:
            raise PlanError(f"{where} is not a valid plan ({e}); rebuild it with `python -m planner plan`") from None
        return plan


def _round(x: float) -> float:
    return round(float(x), 6)


def plan_command(target: str, draft: str, device: str | None = None, temperature: float | None = None,
                 top_p: float | None = None, batch_size: int | None = None, *, dtype: str | None = None,
                 gpu_memory: int | None = None) -> str:
    cmd = f"python -m planner plan --model {target} --draft {draft}"
    if device is not None:
        cmd += f" --device {device}"
    if dtype is not None:
        cmd += f" --dtype {dtype}"
    if temperature is not None:
        cmd += f" --temperature {temperature:g}"
    if top_p is not None and top_p != 1.0:
        cmd += f" --top-p {top_p:g}"
    if batch_size not in (None, 1):
        cmd += f" --batch-size {batch_size}"
    if gpu_memory is not None:
        cmd += f" --gpu-memory {gpu_memory}"
    return cmd


# --- files


def save_plan(plan: Plan, path: str | os.PathLike | None = None) -> Path:
    """Write the plan (to the store by default); returns where it went. `plan.path` is left as it was."""
    target = Path(path) if path is not None else plan.default_path()
    hardware.write_json(target, plan.to_dict())
    return target


def read_plan(path: str | os.PathLike) -> Plan:
    """A plan file as written; PlanError (one line, with the fix) when it is missing or not a plan."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlanError(f"plan file {path} not found; make one with `python -m planner plan`") from None
    except OSError as e:
        raise PlanError(f"cannot read plan file {path}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PlanError(f"plan file {path} is not valid JSON; delete it and rebuild with `python -m planner plan`") \
            from None
    plan = Plan.from_dict(data, where=f"plan file {path}")
    plan.path = path
    return plan


def all_plans() -> list[Plan]:
    """Every readable plan in the planner's home (unreadable files are skipped: the search must not fail)."""
    plans = []
    folder = hardware.store_dir("plans")
    if not folder.is_dir():
        return []
    for f in sorted(folder.glob("*.json")):
        try:
            plans.append(read_plan(f))
        except PlanError:
            continue
    return plans


# --- staleness


def _machine_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two machine fingerprints, in words."""
    labels = {"gpu_name": "GPU", "gpu_driver": "GPU driver", "gpu_memory_total": "GPU memory",
              "pcie_max_gen": "PCIe generation", "pcie_max_width": "PCIe width", "cpu_model": "CPU",
              "cpu_count": "CPU count", "ram_total_gib": "RAM (GiB)", "device_type": "device"}
    diffs = [f"{label} {old.get(k)} -> {new.get(k)}" for k, label in labels.items() if old.get(k) != new.get(k)]
    return "the machine changed (" + ", ".join(diffs or ["fingerprint"]) + ")"


def stale_reasons(plan: Plan, *, target_fp: str | None = None, draft_fp: str | None = None,
                  machine: dict[str, Any] | None = None) -> list[str]:
    """Why this plan no longer describes the models and machine at hand (empty: it is current).

    Fingerprints not given are computed from the plan's own checkpoint paths and the current machine.
    """
    reasons = []
    for role, ref, fp in (("target", plan.target, target_fp), ("draft", plan.draft, draft_fp)):
        if ref.is_preset:
            continue
        if fp is None:
            try:
                fp = model_fingerprint(ref.path)
            except (MissingFileError, OSError):
                reasons.append(f"the {role}'s files are gone from {ref.path}")
                continue
        if fp != ref.fingerprint:
            reasons.append(f"the {role}'s model files changed")
    machine = machine or hardware.machine_fingerprint(plan.device)
    if machine.get("id") != plan.machine_id:
        reasons.append(_machine_change(plan.machine, machine))
    return reasons


# --- what the runtime calls


def _current(target: str | os.PathLike, draft: str | os.PathLike) -> tuple[ModelRef, ModelRef]:
    t, _, _ = resolve_model(target)
    d, _, _ = resolve_model(draft)
    return t, d


def find_plan(target: str | os.PathLike, draft: str | os.PathLike, device: str | torch.device,
              dtype: torch.dtype | str, temperature: float | None = None, top_p: float | None = None,
              batch_size: int | None = None) -> tuple[Plan | None, str]:
    """The saved plan for this machine, model pair, device, dtype and sampling settings, and a one-line message.

    temperature / top_p / batch_size None match any plan (the newest wins). A plan for the same pair and settings
    whose model files or machine changed is stale: it is not returned, and the message says why and how to
    rebuild it. With no plan the message says how to make one.
    """
    dev = torch.device(device)
    dt = dtype_name(dtype)
    tref, dref = _current(target, draft)
    machine = hardware.machine_fingerprint(dev)
    matching = [p for p in all_plans()
                if p.target.identity == tref.identity and p.draft.identity == dref.identity
                and p.device == dev.type and p.dtype == dt
                and (temperature is None or _round(p.temperature) == _round(temperature))
                and (top_p is None or _round(p.top_p) == _round(top_p))]
    fresh, stale = [], []
    for p in matching:
        reasons = stale_reasons(p, target_fp=tref.fingerprint, draft_fp=dref.fingerprint, machine=machine)
        (stale if reasons else fresh).append((p, reasons))
    if fresh:
        # The asked batch size first, then batch 1, then the newest.
        def rank(item: tuple[Plan, list[str]]) -> tuple[bool, bool, str]:
            p = item[0]
            return (p.batch_size == batch_size, p.batch_size == 1, p.created)

        plan = max(fresh, key=rank)[0]
        note = "" if batch_size in (None, plan.batch_size) else f" (built for batch size {plan.batch_size})"
        return plan, f"using plan {plan.path}: {plan.summary()}{note}"
    if stale:
        plan, reasons = max(stale, key=lambda item: item[0].created)
        return None, (f"plan {plan.path} is stale ({'; '.join(reasons)}); not using it, using the default tree; "
                      f"rebuild it with `{plan.rebuild_command()}`")
    cmd = plan_command(str(target), str(draft), dev.type if dev.type == "cpu" else None, temperature,
                       top_p, batch_size)
    return None, f"no plan for this machine and model pair; using the default tree; run `{cmd}` to make one"


def load_plan(path: str | os.PathLike, *, target: str | os.PathLike | None = None,
              draft: str | os.PathLike | None = None, device: str | torch.device | None = None,
              dtype: torch.dtype | str | None = None) -> tuple[Plan, str]:
    """An explicitly named plan file (plan=PATH): used even when stale, with a warning in the message.

    Raises PlanError when the file cannot be read. target/draft/device/dtype, when given, are what the runtime
    loads: a plan built for something else is flagged in the message.
    """
    plan = read_plan(path)
    warnings: list[str] = []
    tref = dref = None
    if target is not None and draft is not None:
        tref, dref = _current(target, draft)
        if (tref.identity, dref.identity) != (plan.target.identity, plan.draft.identity):
            warnings.append(f"it was built for {plan.target.name} with draft {plan.draft.name}")
    if device is not None and torch.device(device).type != plan.device:
        warnings.append(f"it was built for device {plan.device}")
    if dtype is not None and dtype_name(dtype) != plan.dtype:
        warnings.append(f"it was built for dtype {plan.dtype}")
    same_models = tref is not None and (tref.identity, dref.identity) == (plan.target.identity, plan.draft.identity)
    reasons = stale_reasons(plan, target_fp=tref.fingerprint if same_models else None,
                            draft_fp=dref.fingerprint if same_models else None)
    if reasons:
        warnings.append(f"it is stale ({'; '.join(reasons)}); rebuild it with `{plan.rebuild_command()}`")
    msg = f"using plan {plan.path}: {plan.summary()}"
    if warnings:
        msg += "; warning: " + "; ".join(warnings)
    return plan, msg
