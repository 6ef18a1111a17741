"""offload-runtime: layer-streamed offloading of Llama-family models, verified by Sequoia token trees.

    from offload_runtime import Engine
    engine = Engine.from_pretrained("llama-2-70b", gpu_memory="20GiB")

Layers, each depending only on the ones below it:
    api/      Engine, options, loading, text (detokenising, stop strings, chat sessions), plan files, registry
    decode/   requests, the three-phase speculative step, the scheduler, phase timing
    spec/     sampling, verification, methods (drawing paired with verifying), tree search, tree policy
    streaming.py, residency.py, memory.py: layer sources on the device, the device budget
    weights/  checkpoints, random weights, the packed layer layout, the host store, building a model
    model/    ModelArgs, the Transformer forward over weights handed in, the KV cache, Tree, forward inputs
The command lines (chat.py, batch.py, cli.py) sit on top; the planner package uses this one, never the reverse.
"""
from typing import Any

from .errors import OffloadError

__all__ = ["Engine", "GenerationResult", "OffloadError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Engine loads torch (seconds): a command line that stops at a bad flag or a busy output must not wait for it.
    if name in ("Engine", "GenerationResult"):
        from .api import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
