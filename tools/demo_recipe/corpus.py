"""Fetch the training corpus from Debian's package archive and split it into train / held-out chapters.

The corpus is the King James Version of the Bible as shipped by Debian's `bible-kjv-text` (public domain
text; the package's copyright file says "Users may copy, modify or distribute this file at will").
The package stores the text in its own compressed format, so the recipe also downloads the matching
`bible-kjv` reader and asks it to print every verse. Neither package is installed: `apt-get download`
plus `dpkg-deb -x` into a work folder, so no root is needed.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# --- pinned source

PACKAGES: dict[str, str] = {"bible-kjv": "4.38", "bible-kjv-text": "4.38"}
# sha256 of the reader's full dump (`bible -f Gen1:1-Rev22:21`) from the pinned packages.
TEXT_SHA256 = "cd45f0c9cedab8e4439bd6486c8952c77cc8b0ecc5d1f6ae3513f2039f47229d"
LICENCE = (
    "King James Version text (1611): public domain; the package's copyright file: 'This file is provided "
    "for unrestricted use ... Users may copy, modify or distribute this file at will.' (the reader program "
    "is GPL-2+, but only its output text is used, never shipped)"
)
_VERSE_LINE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.+)$")


class CorpusUnavailable(RuntimeError):
    """The pinned Debian packages could not be fetched or read on this machine."""


@dataclass(frozen=True)
class Chapter:
    book: str
    number: int
    verses: tuple[str, ...]


@dataclass(frozen=True)
class Corpus:
    text: str  # the raw dump, one "Book1:1 verse" line per verse
    sha256: str
    chapters: tuple[Chapter, ...]


# --- fetching

def _run(cmd: list[str], cwd: Path, what: str) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise CorpusUnavailable(
            f"{what}: `{cmd[0]}` is not on this machine. The demo corpus comes from Debian's archive; run the "
            "recipe on a Debian or Ubuntu machine (apt-get and dpkg-deb are needed, root is not)."
        ) from err
    if done.returncode != 0:
        raise CorpusUnavailable(
            f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n{done.stderr.strip()}\n"
            f"Fix: run `apt-get update` so the package index knows {', '.join(f'{p}={v}' for p, v in PACKAGES.items())}; "
            "if that version left the archive, pin the available one in tools/demo_recipe/corpus.py and "
            "expect a different TEXT_SHA256 (check the dump, then update it)."
        )
    return done.stdout


def _download(work_dir: Path) -> list[Path]:
    debs = []
    for name, version in PACKAGES.items():
        found = sorted(work_dir.glob(f"{name}_{version}_*.deb"))
        if not found:
            _run(["apt-get", "download", f"{name}={version}"], work_dir, f"downloading {name}={version}")
            found = sorted(work_dir.glob(f"{name}_{version}_*.deb"))
        if not found:
            raise CorpusUnavailable(f"apt-get download {name}={version} reported success but left no .deb in {work_dir}")
        debs.append(found[0])
    return debs


def fetch_corpus(work_dir: Path) -> Corpus:
    """Download (once), unpack and dump the pinned KJV text into work_dir; verify its sha256."""
    work_dir.mkdir(parents=True, exist_ok=True)
    dump = work_dir / "kjv.txt"
    if not dump.exists():
        root = work_dir / "root"
        shutil.rmtree(root, ignore_errors=True)
        for deb in _download(work_dir):
            _run(["dpkg-deb", "-x", str(deb), str(root)], work_dir, f"unpacking {deb.name}")
        # -f turns pretty-printing off: one "Ge1:1 text" line per verse.
        text = _run([str(root / "usr/bin/bible"), "-f", "-p", str(root / "usr/lib"), "Gen1:1-Rev22:21"],
                    work_dir, "dumping the text with the bible-kjv reader")
        dump.write_text(text, encoding="ascii")
    text = dump.read_text(encoding="ascii")
    digest = hashlib.sha256(text.encode("ascii")).hexdigest()
    if digest != TEXT_SHA256:
        raise CorpusUnavailable(
            f"the dumped corpus {dump} has sha256 {digest}, the recipe pins {TEXT_SHA256}. Delete {work_dir} and "
            "rerun; if it persists, the archive serves a different text and the checkpoints would not be reproduced."
        )
    return Corpus(text=text, sha256=digest, chapters=parse_chapters(text))


# --- parsing and splitting

def parse_chapters(text: str) -> tuple[Chapter, ...]:
    chapters: list[Chapter] = []
    key: tuple[str, int] | None = None
    verses: list[str] = []
    for line in text.splitlines():
        match = _VERSE_LINE.match(line)
        assert match is not None, f"unexpected line in the KJV dump: {line[:80]!r}"
        book, chapter = match.group(1), int(match.group(2))
        if (book, chapter) != key:
            if key is not None:
                chapters.append(Chapter(key[0], key[1], tuple(verses)))
            key, verses = (book, chapter), []
        verses.append(match.group(4).strip())
    if key is not None:
        chapters.append(Chapter(key[0], key[1], tuple(verses)))
    return tuple(chapters)


def split_chapters(chapters: tuple[Chapter, ...], every: int) -> tuple[tuple[Chapter, ...], tuple[Chapter, ...]]:
    """Every `every`-th chapter (offset every//2) is held out whole, so no held-out verse is seen in training."""
    assert every >= 2
    held = tuple(c for i, c in enumerate(chapters) if i % every == every // 2)
    train = tuple(c for i, c in enumerate(chapters) if i % every != every // 2)
    return train, held
