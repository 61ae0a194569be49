"""Shared by the bench_* scripts: host facts and their sections of docs/benchmarks.md."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
DOC_HEADER = (
    "# Benchmarks\n\n"
    "Each section below is written by the script it names; re-run that script to update it.\n"
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_line() -> str:
    today = datetime.date.today().isoformat()
    return f"{today}, {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_section(name: str, section: str) -> None:
    """Replace the ``name`` section of docs/benchmarks.md (between its markers)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    body = f"{start}\n{section.strip()}\n{end}\n"
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else DOC_HEADER
    if start in text and end in text.split(start, 1)[1]:
        before, rest = text.split(start, 1)
        text = before + body.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + body
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text, encoding="utf-8")


def markdown_tables(tables: list[tuple]) -> list[str]:
    """``(title, header, rows)`` tables as Markdown lines, each under its title."""
    lines: list[str] = []
    for title, header, rows in tables:
        lines += ["", f"{title}:", "", "| " + " | ".join(header) + " |"]
        lines += ["|" + "---|" * len(header), *["| " + " | ".join(row) + " |" for row in rows]]
    return lines


@contextlib.contextmanager
def progress_notes(console, started: float):
    """A ``note(message)`` that shows "[  12 s] message" (seconds since ``started``): on a
    terminal as the console's status line, otherwise printed one per line."""
    with console.status("starting") as status:

        def note(message: str) -> None:
            line = f"[{time.perf_counter() - started:4.0f} s] {message}"
            if console.is_terminal:
                status.update(line)
            else:
                console.print(line, markup=False)

        yield note
