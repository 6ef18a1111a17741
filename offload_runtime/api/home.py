"""The runtime's home: where plans, profiles, acceptance measurements and caches are kept, and how files there are
written (atomically: a killed run never leaves half a file behind)."""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import suppress
from pathlib import Path
from typing import Any

from ..errors import StoreError

STORE_KINDS = ("profiles", "acceptance", "plans", "layer-stores", "quantized")


def runtime_home() -> Path:
    """$OFFLOAD_RUNTIME_HOME, else ~/.cache/offload_runtime."""
    env = os.environ.get("OFFLOAD_RUNTIME_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "offload_runtime"


def store_dir(kind: str) -> Path:
    assert kind in STORE_KINDS, kind
    return runtime_home() / kind


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:  # a home that is a file, read-only, or full: said in one line, not as a crash
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path} ({e.strerror or e}); point OFFLOAD_RUNTIME_HOME at a directory you "
                         f"can write, or free space there") from None
    return path


def short_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]
