"""Options shared by the API and the command lines, each checked in one place: device, dtype, sampling settings
and the defaults a checkpoint's generation_config.json gives them."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..decode.request import SamplingParams
from ..errors import CheckpointError, UsageError
from ..model.quantization import QuantSpec, cpu_int4_block
from ..spec.sampling import check_warp

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_SEED = 2**63 - 2  # the draft's generator takes seed + 1; torch generators take 64-bit seeds
DEFAULT_MAX_NEW_TOKENS = 256


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device, checkpoint_dtype: str | None,
                quant: QuantSpec | None = None) -> torch.dtype:
    """The compute dtype; "auto" (or None) is float32 on the CPU, except for int4 weights where torch's int4 kernel
    and native bf16 are both there, and the checkpoint's 16-bit dtype on a GPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise UsageError(f"dtype {dtype} is not supported; use one of float64, float32, bfloat16, float16")
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cpu":
            # 16-bit matmuls are slow on most CPUs. torch's int4 kernel is the exception where the CPU has native
            # bf16: with bf16 activations int4 decodes at ~4x float32 (bench-100m), with float32 ones at ~0.5x.
            int4_kernel = quant is not None and quant.bits == 4 and not quant.act_order and cpu_int4_block()
            return torch.bfloat16 if int4_kernel and cpu_has_native_bf16() else torch.float32
        return DTYPES.get(str(checkpoint_dtype), torch.float16) if checkpoint_dtype != "float32" else torch.float16
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of float64, float32, bfloat16, float16")
    return DTYPES[dtype]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), not by emulation."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)  # a torch without these checks: say no


def parse_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise UsageError(f"device type {dev.type!r} is not supported; use cpu or cuda")
    return dev


def check_max_new_tokens(max_new_tokens: Any) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    return max_new_tokens


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    return seed


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be true or false, got {value!r}")
    return value


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    """Every sampling setting at once."""
    check_warp(temperature, top_p)
    check_max_new_tokens(max_new_tokens)


def check_given(temperature: Any = None, top_p: Any = None, max_new_tokens: Any = None, seed: Any = None,
                ignore_eos: Any = None) -> None:
    """The settings a caller gave, each checked as a request checks it; None: not given (a default serves).
    What the command lines and batch records check before a model loads."""
    if temperature is not None or top_p is not None:
        check_warp(1.0 if temperature is None else temperature, 1.0 if top_p is None else top_p)
    if max_new_tokens is not None:
        check_max_new_tokens(max_new_tokens)
    if seed is not None:
        check_seed(seed)
    if ignore_eos is not None:
        check_flag("ignore_eos", ignore_eos)


@dataclass(frozen=True)
class GenerationDefaults:
    """What a request that names no sampling settings gets: the checkpoint's generation_config.json when it
    samples (do_sample), else greedy; 256 new tokens unless the file says otherwise."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_dir(cls, path: str | os.PathLike | None) -> "GenerationDefaults":
        if path is None:
            return cls()
        f = Path(path) / "generation_config.json"
        if not f.is_file():
            return cls()
        try:
            cfg = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{f} is not valid JSON; fix or delete it") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{f} is not a JSON object; fix or delete it")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        try:
            sampled = bool(cfg.get("do_sample"))
            defaults = cls(temperature=float(cfg.get("temperature", 1.0)) if sampled else 0.0,
                           top_p=float(cfg.get("top_p", 1.0)) if sampled else 1.0,
                           max_new_tokens=int(cfg.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                           eos_token_ids=tuple(int(t) for t in eos_ids))
        except (TypeError, ValueError):
            raise CheckpointError(f"{f} has a temperature, top_p, max_new_tokens or eos_token_id that is not a "
                                  f"number; fix or delete it") from None
        try:  # checked here, where the file can be named: a request would blame settings nobody passed
            check_sampling(defaults.temperature, defaults.top_p, defaults.max_new_tokens)
        except UsageError as e:
            raise CheckpointError(f"{f}: {e}; fix or delete it") from None
        return defaults

    def sampling(self, temperature: float | None = None, top_p: float | None = None,
                 max_new_tokens: int | None = None, ignore_eos: bool = False,
                 seed: int | None = None) -> SamplingParams:
        """A request's settings: what it names, these defaults for the rest; every value checked."""
        temperature = self.temperature if temperature is None else temperature
        top_p = self.top_p if top_p is None else top_p
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        check_sampling(temperature, top_p, max_new_tokens)
        check_flag("ignore_eos", ignore_eos)
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else check_seed(seed)
        return SamplingParams(float(temperature), float(top_p), int(max_new_tokens), bool(ignore_eos), int(seed))
