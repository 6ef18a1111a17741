"""User-facing errors: each says what went wrong and what to do about it.

The command-line surfaces print `str(error)` as one line and exit with `exit_code`; internal invariants are
plain asserts and are never caught.
"""
from __future__ import annotations


class OffloadError(Exception):
    """A problem the user can fix; the message names it and says how."""

    exit_code = 1


class UsageError(OffloadError, ValueError):
    """A bad flag, argument or sampling value."""

    exit_code = 2


class ConfigError(OffloadError, ValueError):
    """A config.json the runtime cannot use."""


class CheckpointError(OffloadError):
    """A checkpoint that is missing, incomplete or corrupt."""


class MissingFileError(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs (a shard, config.json) is not there."""


class StoreError(OffloadError):
    """A store on disk (the runtime home, a layer store: --offload-dir) that cannot be written, read or used."""


class ResourceError(OffloadError, MemoryError):
    """Not enough host RAM or device memory for what was asked."""


class ContextLengthError(OffloadError, ValueError):
    """A prompt or conversation longer than the context window."""


class ModelOutputError(OffloadError):
    """A model whose forward produced something no distribution can come from (NaN logits)."""


class BusyError(OffloadError):
    """A file another running job holds (a batch job's output)."""
