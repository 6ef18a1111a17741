"""The tools' one table type and its writers: aligned text for the terminal, Markdown for BENCHMARKS.md, and
the appender that adds a dated section to BENCHMARKS.md (never rewriting what is there).

A Table holds the measured values themselves (rows of {column key: value}), so callers and tests read
numbers, not text; each Column says how its values print. None and NaN print as "-".
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

BENCHMARKS_HEADER = """# Benchmarks

Sections are appended by the benchmark scripts in `tools/` (newest last); every figure below comes from a
script's own output, with the machine and the command that produced it. On the CPU, ratios against a baseline
run in the same process are the figures to quote: absolute CPU times are noise.
"""
CHECK, CROSS, PLUS_MINUS = "\u2713", "\u2717", "\u00b1"


def sig(x: float, digits: int = 3) -> str:
    """`digits` significant digits, never in e-notation for large figures."""
    return f"{x:.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"


def sig4(x: float) -> str:
    return sig(x, 4)


def times(x: float) -> str:
    return f"{x:.2f}x"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    fmt: str | Callable[[Any], str] = ""  # a format spec (".2f", "g") or a function of the value
    left: bool = False  # text is left-aligned; figures (the default) right-aligned; the first column is a label

    def cell(self, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return self.fmt(value) if callable(self.fmt) else format(value, self.fmt)


@dataclass
class Table:
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def column(self, key: str) -> list[Any]:
        return [r.get(key) for r in self.rows]

    def row(self, **match: Any) -> dict[str, Any]:
        """The one row whose values equal `match`."""
        found = [r for r in self.rows if all(r.get(k) == v for k, v in match.items())]
        assert len(found) == 1, (match, len(found))
        return found[0]

    def cells(self) -> list[list[str]]:
        return [[c.cell(r.get(c.key)) for c in self.columns] for r in self.rows]


def to_text(table: Table) -> str:
    cells = [[c.title for c in table.columns]] + table.cells()
    widths = [max(len(r[i]) for r in cells) for i in range(len(table.columns))]
    left = [i == 0 or c.left for i, c in enumerate(table.columns)]
    lines = ["  ".join(c.ljust(w) if lt else c.rjust(w) for c, w, lt in zip(r, widths, left)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([f"== {table.title}", *lines, *(f"   {n}" for n in table.notes)])


def to_markdown(table: Table) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"### {table.title}", "", "| " + " | ".join(esc(c.title) for c in table.columns) + " |",
             "|" + "|".join(":---" if i == 0 or c.left else "---:" for i, c in enumerate(table.columns)) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in table.cells()]
    if table.notes:
        lines += [""] + [f"- {n}" for n in table.notes]
    return "\n".join(lines)


def section(heading: str, *, machine: str, command: str, intro: Sequence[str] = (),
            blocks: Sequence[Table | str] = (), date: str | None = None) -> str:
    """A BENCHMARKS.md section: `## heading, date`, the machine, the command, intro bullets, then each block
    (a Table, or Markdown text such as a plot's link or a paragraph)."""
    parts = [f"## {heading}, {date or time.strftime('%Y-%m-%d %H:%M')}", "", f"Machine: {machine}", "",
             f"Command: {command}"]
    if intro:
        parts += [""] + [f"- {line}" for line in intro]
    for b in blocks:
        parts += ["", to_markdown(b) if isinstance(b, Table) else b]
    return "\n".join(parts) + "\n"


def append(path: Path, text: str) -> None:
    """Append a section; the file is created with a short header if missing."""
    old = path.read_text() if path.is_file() else BENCHMARKS_HEADER
    path.write_text(old + ("" if old.endswith("\n") else "\n") + "\n" + text)


def link(image: Path, md_path: Path, alt: str) -> str:
    return f"![{alt}]({Path(os.path.relpath(image, md_path.parent)).as_posix()})"
