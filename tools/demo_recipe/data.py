"""Training documents (plain chapters and chat turns) and their packing into fixed-length token blocks."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from tokenizers import Tokenizer

from .corpus import Chapter
from .tokenizer import BOS_ID, END, END_ID, render_turn

# Short system prompts so that a chat front end sending one does not meet an unseen token pattern.
SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "Continue the passage.",
    "You continue passages in the style of the King James Bible.",
    "Answer in the style of the King James Bible.",
)


# --- documents

def chapter_text(chapter: Chapter) -> str:
    return " ".join(chapter.verses)


def encode_plain(tokenizer: Tokenizer, chapters: Sequence[Chapter]) -> list[list[int]]:
    """One document per chapter: BOS, the chapter as running prose, <|end|>."""
    encodings = tokenizer.encode_batch([chapter_text(c) for c in chapters], add_special_tokens=False)
    return [[BOS_ID, *e.ids, END_ID] for e in encodings]


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high] drawn from the explicit generator."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def chat_example(chapter: Chapter, generator: torch.Generator) -> str | None:
    """A conversation cut from one chapter: the user gives 1-2 verses, the assistant continues with the
    next 1-3 verses and ends its turn; a fifth of them go on for a second exchange, a third get a system
    prompt. Returns None where the chapter is too short."""
    verses = chapter.verses
    turns = 2 if _randint(0, 4, generator) == 0 else 1
    parts: list[str] = []
    if _randint(0, 2, generator) == 0:
        parts.append(render_turn("system", SYSTEM_PROMPTS[_randint(0, len(SYSTEM_PROMPTS) - 1, generator)]))
    if len(verses) < 2 * turns + 1:
        return None
    start = _randint(0, len(verses) - 2 * turns, generator)
    for _ in range(turns):
        n_user, n_reply = _randint(1, 2, generator), _randint(1, 3, generator)
        user, reply = verses[start:start + n_user], verses[start + n_user:start + n_user + n_reply]
        if not user or not reply:
            break
        parts += [render_turn("user", " ".join(user)), render_turn("assistant", " ".join(reply))]
        start += n_user + n_reply
    if not any(p.startswith("<|assistant|>") for p in parts):
        return None
    text = "".join(parts)
    assert text.endswith(f"{END}\n")
    return text


def encode_chat(tokenizer: Tokenizer, chapters: Sequence[Chapter], per_chapter: int,
                generator: torch.Generator) -> list[list[int]]:
    texts = [t for c in chapters for _ in range(per_chapter) if (t := chat_example(c, generator)) is not None]
    return [[BOS_ID, *e.ids] for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


# --- packing

def pack(documents: Sequence[Sequence[int]], block: int) -> torch.Tensor:
    """Concatenate documents and cut [n, block + 1] rows; row i+1 starts where row i's inputs end, so
    every token is a target exactly once. The tail shorter than a row is dropped."""
    stream = torch.tensor([t for d in documents for t in d], dtype=torch.long)
    n = (stream.numel() - 1) // block
    assert n >= 1, f"only {stream.numel()} tokens: not enough for one block of {block}"
    return torch.stack([stream[i * block:(i + 1) * block + 1] for i in range(n)])


def training_batches(tokenizer: Tokenizer, chapters: Sequence[Chapter], plain: list[list[int]],
                     chat_per_chapter: int, block: int, batch: int,
                     generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless [batch, block + 1] batches. Each epoch draws fresh chat examples and a fresh document
    order from `generator`, so a run is a pure function of its seed."""
    while True:
        docs = plain + encode_chat(tokenizer, chapters, chat_per_chapter, generator)
        order = torch.randperm(len(docs), generator=generator).tolist()
        rows = pack([docs[i] for i in order], block)
        for i in range(0, rows.shape[0] - batch + 1, batch):
            yield rows[i:i + batch]
