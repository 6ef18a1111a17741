"""Find a checkpoint and read its safetensors shards lazily, tensor by tensor.

The reader parses the safetensors header itself and reads each tensor with `readinto` straight into the
buffer that will hold it (a pinned layer buffer, a device staging tensor, ...). No mmap: mapped pages count
towards the process's resident memory, so mmap-then-copy would hold the model twice.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import CheckpointError, MissingFileError
from ..model.config import ModelArgs
from .quantized import expected_checkpoint_tensors

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    # Quantized checkpoints: AWQ / GPTQ pack integers into I32 words; other tools use the narrower ones.
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


# --- finding a model


HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"]


def _is_repo_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def _cached_snapshot(repo_id: str) -> Path | None:
    """The repo's snapshot in the Hugging Face cache, if it is there; never contacts the hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def find_local_dir(name_or_path: str | os.PathLike) -> Path | None:
    """A local directory as given, or a repo id's snapshot already in the hub cache; None otherwise."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    return _cached_snapshot(str(name_or_path)) if _is_repo_id(str(name_or_path)) else None


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory as given, or a Hugging Face repo id resolved through the hub cache (downloaded if missing).

    Aliases (`llama-2-70b`, `demo`) are resolved by `api/registry.py` before this is called.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint's directory (the one holding config.json)")
    if not _is_repo_id(name):
        raise MissingFileError(
            f"model {name!r} not found: pass a checkpoint directory, a Hugging Face repo id (owner/name) or an alias"
        )
    return _from_hub(name)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cached = _cached_snapshot(repo_id)
    if cached is not None:
        return cached
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise MissingFileError(
            f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it on a "
            f"connected machine with `huggingface-cli download {repo_id}` (or unset HF_HUB_OFFLINE)"
        )
    # snapshot_download asks the hub for the repo's revision with no timeout at all (huggingface_hub 0.2x-2.x),
    # so a network that accepts connections but never answers would hang here without a word. Ask first, with
    # the hub's own metadata timeout (HF_HUB_ETAG_TIMEOUT, 10 s by default); file downloads then go by
    # HF_HUB_DOWNLOAD_TIMEOUT, which the library applies itself.
    wait = constants.HF_HUB_ETAG_TIMEOUT
    print(f"{repo_id} is not in the Hugging Face cache: asking {constants.ENDPOINT} for it (up to {wait:g} s; "
          f"HF_HUB_OFFLINE=1 never contacts the hub)", file=sys.stderr, flush=True)
    try:
        revision = HfApi().model_info(repo_id, timeout=wait).sha
    except HfHubHTTPError as e:  # it answered: no such repo, gated, or the hub's own failure
        first = (str(e).splitlines() or [""])[0][:160]
        raise MissingFileError(
            f"the Hugging Face hub refused {repo_id} ({type(e).__name__}: {first}); check the name, and "
            f"`huggingface-cli login` for gated models, or pass a local directory"
        ) from None
    except Exception as e:  # noqa: BLE001 - a timeout or a network error, whose class depends on the HTTP library
        raise MissingFileError(
            f"the Hugging Face hub at {constants.ENDPOINT} could not be reached or did not answer within {wait:g} s "
            f"({type(e).__name__}); download {repo_id} beforehand (`huggingface-cli download {repo_id}`) and run "
            f"with HF_HUB_OFFLINE=1, or pass a local directory (HF_HUB_ETAG_TIMEOUT sets the wait)"
        ) from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise MissingFileError(
            f"could not get {repo_id} from the Hugging Face hub ({type(e).__name__}); check the name, your "
            f"network and `huggingface-cli login` for gated models, or pass a local directory"
        ) from None


# --- safetensors headers


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse one shard's header; every tensor's byte range is checked against the file's size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file} is truncated (no safetensors header); re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{file} is truncated or not a safetensors file; re-download it")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise MissingFileError(f"shard {file.name} not found in {file.parent}; re-download the checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{file} has a corrupt safetensors header; re-download it") from None
    base = 8 + n
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a safetensors header that is not a JSON object; the file is corrupt, "
                              f"re-download it")
    infos: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        problem = _header_entry_problem(meta)
        if problem:
            raise CheckpointError(f"tensor {name} in {file}: its header entry {problem}; the file is corrupt, "
                                  f"re-download it")
        dtype = SAFETENSORS_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise CheckpointError(
                f"tensor {name} in {file.name} has dtype {meta.get('dtype')}, which the runtime cannot use "
                f"(it reads {', '.join(SAFETENSORS_DTYPES)}); use a 16/32-bit, AWQ or GPTQ checkpoint"
            )
        shape = tuple(int(s) for s in meta["shape"])
        start, end = (int(x) for x in meta["data_offsets"])
        nbytes = dtype.itemsize * math.prod(shape)
        if end - start != nbytes or base + end > size:
            raise CheckpointError(
                f"tensor {name} in {file.name} lies outside the file or has the wrong size: {file} is "
                f"truncated or corrupt; re-download it"
            )
        infos[name] = TensorInfo(name, file, dtype, shape, base + start, nbytes)
    return infos


def _header_entry_problem(meta: Any) -> str | None:
    """What is wrong with one tensor's header entry ({dtype, shape, data_offsets}); None when nothing is."""
    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(meta, dict):
        return "is not an object"
    for key in ("dtype", "shape", "data_offsets"):
        if key not in meta:
            return f"lacks {key!r}"
    if not isinstance(meta["shape"], list) or not all(whole(d) for d in meta["shape"]):
        return f"has shape {meta['shape']!r}, not a list of sizes"
    offsets = meta["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(whole(o) for o in offsets):
        return f"has data_offsets {offsets!r}, not [begin, end]"
    return None


# --- a checkpoint


class Checkpoint:
    """A checkpoint directory: config, shard index, and tensor reads into caller-provided memory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.label = self.path.name
        self.args = ModelArgs.from_file(self.path)
        self.tensors = self._index()
        self._check_dtypes()

    def _check_dtypes(self) -> None:
        """Integers only where a quantized checkpoint packs them; a float tensor stored as integers is refused."""
        packed = (".qweight", ".qzeros", ".g_idx") if self.args.quantization is not None else ()
        names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
        for name, info in self.tensors.items():
            if not packed and name.endswith(".qweight"):
                raise CheckpointError(
                    f"{self.path} holds quantized linears ({name}, ...) but its config.json has no "
                    f"quantization_config saying how they are packed; restore the checkpoint's own config.json")
            if not info.dtype.is_floating_point and not name.endswith(packed):
                raise CheckpointError(
                    f"tensor {name} in {info.file.name} has dtype {names[info.dtype]}, which the runtime cannot "
                    f"use for it (floats: F64, F32, F16, BF16; integers only in AWQ / GPTQ packed tensors); use a "
                    f"16/32-bit, AWQ or GPTQ checkpoint"
                )

    def _index(self) -> dict[str, TensorInfo]:
        index_file = self.path / INDEX_NAME
        if index_file.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise CheckpointError(f"{index_file} is corrupt (no weight_map); re-download it") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_file} is corrupt (its weight_map is not tensor -> file names); "
                                      f"re-download it")
            shard_names = sorted(set(weight_map.values()))
            # Names are checked before any is opened: a shard lives inside the checkpoint directory.
            outside = [s for s in shard_names if not s or Path(s).is_absolute() or ".." in Path(s).parts]
            if outside:
                raise CheckpointError(f"{index_file} names shard {outside[0]!r}, which lies outside "
                                      f"{self.path}; the index is corrupt or not from this checkpoint")
            missing = [s for s in shard_names if not (self.path / s).is_file()]
            if missing:
                raise MissingFileError(
                    f"shard file(s) {', '.join(missing)} named in {INDEX_NAME} are missing from {self.path}; "
                    f"re-download the checkpoint"
                )
        elif (self.path / SINGLE_NAME).is_file():
            weight_map, shard_names = {}, [SINGLE_NAME]
        else:
            raise MissingFileError(
                f"{self.path} has neither {SINGLE_NAME} nor {INDEX_NAME}; is this a safetensors checkpoint?"
            )
        tensors: dict[str, TensorInfo] = {}
        for shard in shard_names:
            tensors.update(read_safetensors_header(self.path / shard))
        for name, shard in weight_map.items():
            if name in tensors and tensors[name].file.name != shard:
                raise CheckpointError(f"{INDEX_NAME} puts {name} in {shard} but it is in {tensors[name].file.name}")
            if name not in tensors:
                raise CheckpointError(
                    f"tensor {name} is listed in {INDEX_NAME} for {shard} but {shard} does not contain it; "
                    f"the shard is corrupt or from another checkpoint"
                )
        return tensors

    def validate(self) -> None:
        """Every expected tensor present with the expected shape, and nothing unexpected; before any compute."""
        expected, optional = expected_checkpoint_tensors(self.args)
        missing = sorted(set(expected) - set(self.tensors) - optional)
        # Checkpoints with tied embeddings sometimes also store lm_head; rotary caches are derived, not weights.
        ignorable = {"lm_head.weight"} if self.args.tie_word_embeddings else set()
        unexpected = sorted(
            n for n in set(self.tensors) - set(expected) if n not in ignorable and not n.endswith("rotary_emb.inv_freq")
        )
        misshapen = sorted(
            f"{n} {tuple(self.tensors[n].shape)} (expected {expected[n]})"
            for n in set(expected) & set(self.tensors)
            if tuple(self.tensors[n].shape) != tuple(expected[n])
        )
        # Packed integers must be int32 words; reading them as floats would be garbage, not an error.
        mistyped = sorted(f"{n} {str(self.tensors[n].dtype).removeprefix('torch.')} (expected int32)"
                          for n in set(expected) & set(self.tensors)
                          if n.endswith((".qweight", ".qzeros", ".g_idx")) and self.tensors[n].dtype != torch.int32)
        plain = [n for n in unexpected
                 if n.endswith("_proj.weight") and n.removesuffix(".weight") + ".qweight" in missing]
        if plain:  # config.json declares a quantization (else no .qweight is expected) that the weights lack
            raise CheckpointError(
                f"{self.path}'s config.json declares {self.args.quantization.method.upper()} quantization, but the "
                f"checkpoint holds unquantized linears ({_listing(plain)}); remove quantization_config from "
                f"config.json to load the weights as they are (--quantize int4 quantizes them on load)")
        problems = []
        if mistyped:
            problems.append(f"wrong dtypes: {_listing(mistyped)}")
        if missing:
            problems.append(f"missing tensors: {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors: {_listing(unexpected)}")
        if misshapen:
            problems.append(f"wrong shapes: {_listing(misshapen)}")
        if problems:
            raise CheckpointError(
                f"checkpoint {self.path} does not match its config.json ({'; '.join(problems)}); "
                f"re-download it or check that config.json belongs to these weights"
            )

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor `name` into `out` (CPU, contiguous, right shape), converting dtype if they differ."""
        return read_tensor_into(self.tensors[name], out)

    def load(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        info = self.tensors[name]
        return self.read_into(name, torch.empty(info.shape, dtype=dtype or info.dtype))


def read_tensor_into(info: TensorInfo, out: torch.Tensor) -> torch.Tensor:
    """Read one tensor of a safetensors file straight into `out` (readinto, no mmap), converting dtype."""
    name = info.name
    assert out.is_contiguous() and out.device.type == "cpu" and tuple(out.shape) == info.shape, name
    target = out if out.dtype == info.dtype else torch.empty(info.shape, dtype=info.dtype)
    view = memoryview(target.view(torch.uint8).reshape(-1).numpy()) if info.nbytes else memoryview(b"")
    try:
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.offset)
            got = 0
            while got < info.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
    except FileNotFoundError:
        raise MissingFileError(f"shard {info.file.name} disappeared from {info.file.parent}") from None
    if got != info.nbytes:
        raise CheckpointError(f"{info.file} ended inside tensor {name}: the file is truncated; re-download it")
    if target is not out:
        out.copy_(target)
    return out



def _listing(names: Iterable[str], limit: int = 6) -> str:
    names = list(names)
    head = ", ".join(names[:limit])
    return head + (f" and {len(names) - limit} more" if len(names) > limit else "")
