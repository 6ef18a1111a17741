"""Plan files: the runtime's configuration for one machine and model pair. The planner writes them
(`python -m planner plan`); the runtime reads them. Their schema and reading live here, on the runtime's side.

A plan is keyed by the machine (its fingerprint id), the model pair (each model's identity: a checkpoint
directory, a Hugging Face repo, or a shape preset), the device type, the dtype, the sampling settings and the
batch size. It also records each model's *fingerprint* (config.json and every shard's name, size, safetensors
header and first and last MiB of data: cheap, no full read), so a plan whose model files or machine changed
is recognised as stale and never used silently.

    find_plans(target, draft, device, dtype, batch_size) -> PlanLookup: every current plan of the pair, one per
                                                            sampling regime, and a one-line message
    find_plan(target, draft, device, dtype, temperature, top_p, batch_size) -> (Plan | None, message)
    load_plan(path, target=..., draft=..., device=..., dtype=...)          -> (Plan, message)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import MissingFileError, OffloadError
from ..model.tree import Tree
from ..spec.sampling import MAX_TEMPERATURE
from ..weights.checkpoint import find_local_dir
from ..weights.gguf import gguf_files, is_gguf
from . import registry
from .home import short_hash, store_dir, write_json
from .machine import machine_fingerprint
from .self_draft import is_self_draft, self_identity

PLAN_VERSION = 2  # 2: the tree policy (static or dynamic) and the dynamic budget; version 1 plans read as static
READABLE_VERSIONS = (1, 2)
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

    @property
    def is_self_draft(self) -> bool:
        return self.identity.startswith("self:")

    @property
    def loads_as(self) -> str | None:
        """What Engine.from_pretrained takes for this model: a self-draft's spelling, else the checkpoint directory."""
        return self.name if self.is_self_draft else self.path

    @classmethod
    def of_checkpoint(cls, name: str, path: str | os.PathLike) -> "ModelRef":
        return cls(str(name), model_identity(path), model_fingerprint(path), str(path))

    @classmethod
    def of_self_draft(cls, name: str, target: "ModelRef", quant_label: str) -> "ModelRef":
        """A self-draft (api/self_draft.py): the target's files, in another packed format. Its fingerprint and path
        are the target's, so it goes stale with them."""
        return cls(name, self_identity(target.identity, quant_label), target.fingerprint, target.path)


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
    """sha256 of config.json and, for each shard, its name, size, safetensors header and first/last MiB of data;
    for a GGUF model, of each of its files' name, size and first/last MiB (the first holds the header)."""
    path = Path(path)
    h = hashlib.sha256()
    if is_gguf(path):
        for part in gguf_files(path):
            size = part.stat().st_size
            h.update(f"\0{part.name}\0{size}\0".encode())
            with open(part, "rb") as f:
                h.update(f.read(_EDGE_BYTES))
                f.seek(max(0, size - _EDGE_BYTES))
                h.update(f.read(_EDGE_BYTES))
        return h.hexdigest()
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
    # Host budget and disk tier the plan was made for: host_memory, prefetch, read_threads, host_layers,
    # disk_layers, disk_Bps (empty: every streamed layer in host RAM).
    storage: dict[str, Any] = field(default_factory=dict)
    # Packed weight formats the plan was made for: target / draft labels (e.g. "int4-g128"; None: float) and the
    # planner flags that asked for them (empty: both models as their checkpoints hold them, unquantized).
    weights: dict[str, Any] = field(default_factory=dict)
    policy: str = "static"  # "static": every step uses `tree`; "dynamic": each step grows a tree (spec/growth.py)
    # The measured dynamic budget, even when static won: size, depth, width, acceptance (the calibration, or None),
    # measured (tokens per step and step times per size), reason (why this policy, in words). None: not measured.
    dynamic: dict[str, Any] | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    version: int = PLAN_VERSION
    path: Path | None = field(default=None, compare=False)  # where it was read from / written to

    # --- derived

    @property
    def n(self) -> int:
        return len(self.tree)

    @property
    def depth(self) -> int:
        return Tree(self.tree).max_depth

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def regime(self) -> str:
        """The sampling settings this plan was made for, in words."""
        return "greedy" if self.greedy else f"T={self.temperature:g} top-p {self.top_p:g}"

    @property
    def machine_id(self) -> str:
        return str(self.machine.get("id"))

    @property
    def formats(self) -> tuple[str | None, str | None]:
        """The target's and the draft's packed formats (None: float), as engines are matched to plans."""
        return self.weights.get("target"), self.weights.get("draft")

    def key(self) -> dict[str, Any]:
        key = {"machine": self.machine_id, "target": self.target.identity, "draft": self.draft.identity,
               "device": self.device, "dtype": self.dtype, "temperature": _round(self.temperature),
               "top_p": _round(self.top_p), "batch_size": self.batch_size}
        if self.formats != (None, None):
            key["formats"] = list(self.formats)
        return key

    def default_path(self) -> Path:
        return store_dir("plans") / f"{short_hash(self.key())}.json"

    def describe_tree(self) -> str:
        if self.policy == "dynamic":
            d = self.dynamic
            return f"dynamic trees of up to {d['size']} nodes, depth <= {d['depth']}"
        return f"{self.n} nodes, depth {self.depth}"

    def summary(self) -> str:
        pr = self.predicted
        disk = len(self.storage.get("disk_layers") or [])
        return (f"{self.describe_tree()}, {len(self.resident_layers)}/{self.n_layers} resident layers"
                f"{f', {disk} read from disk' if disk else ''}"
                f"{f', batch {self.batch_size}' if self.batch_size != 1 else ''}, predicted "
                f"{pr['s_per_token']:.3g} s/token ({pr['tokens_per_step']:.2f} tokens/step, "
                f"{pr['tokens_per_s']:.3g} tokens/s)")

    def rebuild_command(self) -> str:
        return plan_command(self.target.name, self.draft.name, self.device, self.temperature, self.top_p,
                            self.batch_size, dtype=self.dtype, gpu_memory=self.gpu_memory,
                            host_memory=self.storage.get("host_memory"), flags=self.weights.get("flags", ""))

    # --- JSON

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        return {"kind": "plan", "key": self.key(), **d, "n": self.n, "depth": self.depth,
                "level_widths": list(Tree(self.tree).internal_per_level)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> "Plan":
        if not isinstance(data, dict) or data.get("kind") != "plan":
            raise PlanError(f"{where} is not a planner plan; make one with `python -m planner plan`")
        if data.get("version") not in READABLE_VERSIONS:
            raise PlanError(f"{where} has plan format version {data.get('version')}, this runtime reads "
                            f"{', '.join(map(str, READABLE_VERSIONS))}; rebuild it with `python -m planner plan`")
        try:
            optional = {f.name for f in dataclasses.fields(cls)
                        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
            fields = {k: data[k] for k in cls.__dataclass_fields__ if k != "path" and (k in data or k not in optional)}
            fields["target"] = ModelRef(**data["target"])
            fields["draft"] = ModelRef(**data["draft"])
            plan = cls(**fields)
            Tree(plan.tree)  # a valid parent array
            for k in ("tokens_per_step", "s_per_token", "tokens_per_s"):
                float(plan.predicted[k])
            _check_kinds(plan)
            if plan.policy == "dynamic" and plan.dynamic is None:
                raise KeyError("dynamic")
        except KeyError as e:
            raise PlanError(f"{where} is not a complete plan (no {e.args[0]!r}); rebuild it with "
                            f"`python -m planner plan`") from None
        except (TypeError, ValueError) as e:
            raise PlanError(f"{where} is not a valid plan ({e}); rebuild it with `python -m planner plan`") from None
        return plan


def _check_kinds(plan: Plan) -> None:
    """Every field the runtime reads holds a value of its kind (TypeError / ValueError naming it otherwise): a plan
    file is read on every start, so a bad one must be refused here, not crash the engine later."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def whole(v: Any, lowest: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= lowest

    kinds: list[tuple[str, Any, bool]] = [
        ("temperature", plan.temperature, number(plan.temperature) and 0 <= plan.temperature <= MAX_TEMPERATURE),
        ("top_p", plan.top_p, number(plan.top_p) and 0 < plan.top_p <= 1),
        ("batch_size", plan.batch_size, whole(plan.batch_size, 1)),
        ("max_seq_len", plan.max_seq_len, whole(plan.max_seq_len, 1)),
        ("n_layers", plan.n_layers, whole(plan.n_layers, 1)),
        ("slots", plan.slots, whole(plan.slots, 1)),
        ("offload", plan.offload, isinstance(plan.offload, bool)),
        ("gpu_memory", plan.gpu_memory, plan.gpu_memory is None or whole(plan.gpu_memory, 0)),
        ("resident_layers", plan.resident_layers,
         isinstance(plan.resident_layers, list) and all(whole(i, 0) for i in plan.resident_layers)),
        ("created", plan.created, isinstance(plan.created, str)),
        ("device", plan.device, isinstance(plan.device, str)),
        ("dtype", plan.dtype, isinstance(plan.dtype, str)),
    ]
    kinds += [(name, getattr(plan, name), isinstance(getattr(plan, name), dict))
              for name in ("machine", "acceptance", "figures", "predicted")]
    d = plan.dynamic
    kinds += [("policy", plan.policy, plan.policy in ("static", "dynamic")),
              ("dynamic", d, d is None or (isinstance(d, dict) and whole(d.get("size"), 1) and whole(d.get("depth"), 1)))]
    for role, ref in (("target", plan.target), ("draft", plan.draft)):
        kinds += [(f"{role}.{k}", getattr(ref, k), isinstance(getattr(ref, k), str))
                  for k in ("name", "identity", "fingerprint")]
    for name, value, ok in kinds:
        if not ok:
            raise ValueError(f"{name} is {value!r}"[:120])


def _round(x: float) -> float:
    return round(float(x), 6)


def _formats_text(formats: Formats) -> str:
    return " / ".join(f or "float" for f in formats)


def plan_command(target: str, draft: str, device: str | None = None, temperature: float | None = None,
                 top_p: float | None = None, batch_size: int | None = None, *, dtype: str | None = None,
                 gpu_memory: int | None = None, host_memory: int | None = None, flags: str = "") -> str:
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
    if host_memory is not None:
        cmd += f" --host-memory {host_memory}"
    return f"{cmd} {flags}" if flags else cmd


# --- files


def save_plan(plan: Plan, path: str | os.PathLike | None = None) -> Path:
    """Write the plan (to the store by default); returns where it went. `plan.path` is left as it was."""
    target = Path(path) if path is not None else plan.default_path()
    write_json(target, plan.to_dict())
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
    except UnicodeDecodeError:
        raise PlanError(f"{path} is not a plan file (not text); give a plan made by `python -m planner plan`") \
            from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise PlanError(f"{path} is not a plan file (not JSON); give a plan made by `python -m planner plan`") \
            from None
    plan = Plan.from_dict(data, where=f"plan file {path}")
    plan.path = path
    return plan


def scan_plans() -> tuple[list[Plan], list[str]]:
    """Every readable plan in the store, and a line for each file that could not be read (which is skipped)."""
    plans, problems = [], []
    folder = store_dir("plans")
    if not folder.is_dir():
        return [], []
    for f in sorted(folder.glob("*.json")):
        try:
            plans.append(read_plan(f))
        except PlanError as e:
            problems.append(str(e))
    return plans, problems


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
    machine = machine or machine_fingerprint(plan.device)
    if machine.get("id") != plan.machine_id:
        reasons.append(_machine_change(plan.machine, machine))
    return reasons


# --- what the runtime calls


def local_ref(name: str | os.PathLike) -> ModelRef | None:
    """The reference of a model available locally (a directory, a GGUF file, an alias, a repo id in the hub
    cache)."""
    resolved = registry.resolve_name(str(name))
    path = gguf_files(resolved)[0] if is_gguf(resolved) else find_local_dir(resolved)
    return None if path is None else ModelRef.of_checkpoint(str(name), path)


def plan_draft_ref(draft: str | os.PathLike, target: ModelRef | None, draft_format: str | None) -> ModelRef | None:
    """The reference of a draft as plans know it: a self-draft's is derived from its target's and its format."""
    if is_self_draft(draft):
        return None if target is None or draft_format is None else ModelRef.of_self_draft(str(draft), target,
                                                                                        draft_format)
    return local_ref(draft)


@dataclass
class PlanLookup:
    plans: list[Plan]  # current plans of the pair, at most one per sampling regime
    message: str  # one line: what is used, or why nothing is


def _regime_key(p: Plan) -> tuple[float, float]:
    return (0.0, 1.0) if p.greedy else (_round(p.temperature), _round(p.top_p))


Formats = tuple[str | None, str | None]  # the target's and the draft's packed formats (None: float)


def _matching(tref: ModelRef, dref: ModelRef, device: torch.device, dtype: str, formats: Formats
              ) -> tuple[list[Plan], list[tuple[Plan, list[str]]], list[str]]:
    """(current plans, stale plans with their reasons, unreadable files) for this pair, device, dtype and weight
    formats (a plan made for the fp16 model says nothing about its int4 copy)."""
    plans, problems = scan_plans()
    machine = machine_fingerprint(device)
    fresh, stale = [], []
    for p in plans:
        if (p.target.identity, p.draft.identity, p.device, p.dtype, p.formats) != (
                tref.identity, dref.identity, device.type, dtype, tuple(formats)):
            continue
        reasons = stale_reasons(p, target_fp=tref.fingerprint, draft_fp=dref.fingerprint, machine=machine)
        (stale if reasons else fresh).append((p, reasons))
    return [p for p, _ in fresh], stale, problems


def _batch_rank(batch_size: int | None):
    # The asked batch size first, then batch 1, then the newest.
    return lambda p: (p.batch_size == batch_size, p.batch_size == 1, p.created)


def _skipped(problems: list[str], named: int = 3) -> str:
    if not problems:
        return ""
    more = f"; and {len(problems) - named} more" if len(problems) > named else ""
    return f" (skipped {len(problems)} unreadable plan file(s) of the store, which may be deleted: " \
           f"{'; '.join(problems[:named])}{more})"


def find_plans(target: str | os.PathLike, draft: str | os.PathLike, device: str | torch.device,
               dtype: torch.dtype | str, batch_size: int | None = None, formats: Formats = (None, None),
               flags: str = "") -> PlanLookup:
    """Every current plan of this machine, model pair, device and dtype: one per sampling regime (greedy, and each
    temperature / top-p), preferring the asked batch size. The message says which plan serves which regime, or
    why none is used (stale plans, unreadable files) and how to make one."""
    dev = torch.device(device)
    tref = local_ref(target)
    dref = plan_draft_ref(draft, tref, formats[1])
    if tref is None or dref is None:
        return PlanLookup([], "")
    fresh, stale, problems = _matching(tref, dref, dev, dtype_name(dtype), formats)
    by_regime: dict[tuple[float, float], Plan] = {}
    for p in sorted(fresh, key=_batch_rank(batch_size)):
        by_regime[_regime_key(p)] = p  # the best-ranked plan of each regime comes last
    chosen = sorted(by_regime.values(), key=lambda p: _regime_key(p))
    if chosen:
        parts = [f"{p.regime()}: {p.path} ({p.summary()})" for p in chosen]
        return PlanLookup(chosen, "using plans for " + "; ".join(parts) + _skipped(problems))
    if stale:
        plan, reasons = max(stale, key=lambda item: item[0].created)
        return PlanLookup([], f"plan {plan.path} is stale ({'; '.join(reasons)}); not using it, using the default "
                              f"tree; rebuild it with `{plan.rebuild_command()}`" + _skipped(problems))
    cmd = plan_command(str(target), str(draft), dev.type if dev.type == "cpu" else None, None, None, batch_size,
                       flags=flags)
    return PlanLookup([], f"no plan for this machine and model pair; using the default tree; run `{cmd}` to make "
                          f"one" + _skipped(problems))


def find_plan(target: str | os.PathLike, draft: str | os.PathLike, device: str | torch.device,
              dtype: torch.dtype | str, temperature: float | None = None, top_p: float | None = None,
              batch_size: int | None = None, *, target_ref: ModelRef | None = None,
              draft_ref: ModelRef | None = None, formats: Formats = (None, None),
              flags: str = "") -> tuple[Plan | None, str]:
    """The one saved plan for these settings (temperature / top_p / batch_size None match any; the newest wins),
    and a one-line message. Stale plans are not returned; the message says why and how to rebuild. The refs
    default to the local checkpoints of `target` and `draft` (the planner passes its shape presets)."""
    dev = torch.device(device)
    tref = target_ref or local_ref(target)
    dref = draft_ref or plan_draft_ref(draft, tref, formats[1])
    if tref is None or dref is None:
        missing = target if tref is None else draft
        raise MissingFileError(f"model {missing!r} not found locally; pass a checkpoint directory")
    fresh, stale, problems = _matching(tref, dref, dev, dtype_name(dtype), formats)

    def wanted(p: Plan) -> bool:
        return ((temperature is None or _round(p.temperature) == _round(temperature))
                and (top_p is None or _round(p.top_p) == _round(top_p)))

    fresh = [p for p in fresh if wanted(p)]
    stale = [(p, r) for p, r in stale if wanted(p)]
    if fresh:
        plan = max(fresh, key=_batch_rank(batch_size))
        note = "" if batch_size in (None, plan.batch_size) else f" (built for batch size {plan.batch_size})"
        return plan, f"using plan {plan.path}: {plan.summary()}{note}" + _skipped(problems)
    if stale:
        plan, reasons = max(stale, key=lambda item: item[0].created)
        return None, (f"plan {plan.path} is stale ({'; '.join(reasons)}); rebuild it with "
                      f"`{plan.rebuild_command()}`" + _skipped(problems))
    cmd = plan_command(str(target), str(draft), dev.type if dev.type == "cpu" else None, temperature,
                       top_p, batch_size, flags=flags)
    return None, f"no plan for this machine and model pair; run `{cmd}` to make one" + _skipped(problems)


def load_plan(path: str | os.PathLike, *, target: str | os.PathLike | None = None,
              draft: str | os.PathLike | None = None, device: str | torch.device | None = None,
              dtype: torch.dtype | str | None = None, formats: Formats | None = None) -> tuple[Plan, str]:
    """An explicitly named plan file (plan=PATH): used even when stale, with a warning in the message.

    Raises PlanError when the file cannot be read. target/draft/device/dtype, when given, are what the runtime
    loads: a plan built for something else is flagged in the message.
    """
    plan = read_plan(path)
    warnings: list[str] = []
    tref = dref = None
    if target is not None and draft is not None:
        tref = local_ref(target)
        dref = plan_draft_ref(draft, tref, (formats or plan.formats)[1])
        if tref is None or dref is None or (tref.identity, dref.identity) != (plan.target.identity,
                                                                              plan.draft.identity):
            warnings.append(f"it was built for {plan.target.name} with draft {plan.draft.name}")
    if device is not None and torch.device(device).type != plan.device:
        warnings.append(f"it was built for device {plan.device}")
    if dtype is not None and dtype_name(dtype) != plan.dtype:
        warnings.append(f"it was built for dtype {plan.dtype}")
    if formats is not None and tuple(formats) != plan.formats:
        warnings.append(f"it was built for weights {_formats_text(plan.formats)}, not {_formats_text(formats)}")
    same_models = tref is not None and dref is not None and \
        (tref.identity, dref.identity) == (plan.target.identity, plan.draft.identity)
    reasons = stale_reasons(plan, target_fp=tref.fingerprint if same_models else None,
                            draft_fp=dref.fingerprint if same_models else None)
    if reasons:
        warnings.append(f"it is stale ({'; '.join(reasons)}); rebuild it with `{plan.rebuild_command()}`")
    msg = f"using plan {plan.path}: {plan.summary()}"
    if warnings:
        msg += "; warning: " + "; ".join(warnings)
    return plan, msg
