"""Model names: aliases for published checkpoints, their default drafts, and the bundled demo pair."""
from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"

# alias -> (Hugging Face repo id, default draft alias or repo id with the same vocabulary)
ALIASES: dict[str, tuple[str, str | None]] = {
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", "JackFram/llama-68m"),
    "llama-2-7b-chat": ("meta-llama/Llama-2-7b-chat-hf", "JackFram/llama-68m"),
    "llama-2-13b": ("meta-llama/Llama-2-13b-hf", "JackFram/llama-160m"),
    "llama-2-13b-chat": ("meta-llama/Llama-2-13b-chat-hf", "JackFram/llama-160m"),
    "llama-2-70b": ("meta-llama/Llama-2-70b-hf", "meta-llama/Llama-2-7b-hf"),
    "llama-2-70b-chat": ("meta-llama/Llama-2-70b-chat-hf", "meta-llama/Llama-2-7b-chat-hf"),
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", "meta-llama/Llama-3.2-1B"),
    "llama-3-8b-instruct": ("meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"),
    "llama-3-70b": ("meta-llama/Meta-Llama-3-70B", "meta-llama/Meta-Llama-3-8B"),
    "llama-3-70b-instruct": ("meta-llama/Meta-Llama-3-70B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct"),
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.2-1B"),
    "llama-3.1-8b-instruct": ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"),
    "llama-3.1-70b": ("meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-8B"),
    "llama-3.1-70b-instruct": ("meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
    "mistral-7b": ("mistralai/Mistral-7B-v0.1", "Locutusque/TinyMistral-248M"),
    "mistral-7b-instruct": ("mistralai/Mistral-7B-Instruct-v0.2", "Locutusque/TinyMistral-248M"),
    "qwen2-7b": ("Qwen/Qwen2-7B", "Qwen/Qwen2-0.5B"),
    "qwen2-7b-instruct": ("Qwen/Qwen2-7B-Instruct", "Qwen/Qwen2-0.5B-Instruct"),
}


def demo_paths() -> tuple[Path, Path]:
    return DEMO_DIR / "target", DEMO_DIR / "draft"


def resolve_name(name: str) -> str:
    """An alias becomes its repo id (or the demo directory); anything else is returned unchanged."""
    if name == "demo":
        return str(demo_paths()[0])
    if name == "demo-draft":
        return str(demo_paths()[1])
    if name in ALIASES:
        return ALIASES[name][0]
    return name


def default_draft(name: str) -> str | None:
    """The draft a model gets when none is named: same vocabulary, roughly a tenth of its size or less."""
    if name == "demo" or Path(name).resolve() == demo_paths()[0].resolve():
        return "demo-draft"
    if name in ALIASES:
        return ALIASES[name][1]
    for repo, draft in ALIASES.values():
        if name == repo:
            return draft
    return None
