import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Plans, profiles and acceptance files of this test session stay out of the user's cache.
os.environ["OFFLOAD_RUNTIME_HOME"] = tempfile.mkdtemp(prefix="offload-runtime-home-")
# One thread: the tests run small ops, where thread wake-ups cost more than they save (and the
# machine may be shared).
torch.set_num_threads(1)

from helpers import CONFIGS, make_checkpoint, make_tokenizer, make_truncated_draft  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny random checkpoint per test config (float32 safetensors), built once per session."""
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_checkpoint(root / name, name, seed=i) for i, name in enumerate(CONFIGS)}


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A target and a smaller draft with the same tokenizer; the draft is a truncated, noised copy of the target
    (its first layer), so it agrees with the target often but not always."""
    root = tmp_path_factory.mktemp("pair")
    target = make_checkpoint(root / "target", "llama-mha", seed=11, num_hidden_layers=3)
    make_tokenizer(target, 128)
    draft = make_truncated_draft(target, root / "draft", "llama-mha", n_layers=1, noise=0.02, seed=5)
    make_tokenizer(draft, 128)
    return target, draft


def pytest_collection_modifyitems(config, items):
    """A gpu-marked test is skipped, with the reason, where CUDA is absent: tools/device_check.py runs them on a
    lent GPU (and in --small mode on the CPU, where they all report skipped)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA is not available (tools/device_check.py runs the gpu tests on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
