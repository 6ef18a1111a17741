"""offload-runtime: layer-streamed offloading of Llama-family models, verified by Sequoia token trees.

    from offload_runtime import Engine
    engine = Engine.from_pretrained("llama-2-70b", gpu_memory="20GiB")
"""
from .engine import Engine, GenerationResult
from .errors import OffloadError

__all__ = ["Engine", "GenerationResult", "OffloadError"]
__version__ = "0.1.0"
