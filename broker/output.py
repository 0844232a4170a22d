"""What the commands print: messages, and tables drawn the way seed 002 draws the mapping table.

A command's answer goes to stdout; progress and diagnostics go to stderr, so that
``broker token issue P1 > token`` keeps only the token. The demo's narration is its answer.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime

__all__ = ["indent", "say", "table", "when"]


def say(message: str = "", *, stdout: bool = False) -> None:
    """One message, flushed at once: to stderr (progress, diagnostics), or with ``stdout`` to
    stdout (the demo's narration)."""
    print(message, file=sys.stdout if stdout else sys.stderr, flush=True)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table drawn the way seed 002 draws the mapping table."""
    widths = [max(len(str(v)) for v in column) for column in zip(header, *rows, strict=True)]

    def line(values: Sequence[str]) -> str:
        return (
            "| " + " | ".join(str(v).ljust(w) for v, w in zip(values, widths, strict=True)) + " |"
        )

    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    )


def indent(text: str, by: str = "    ") -> str:
    """``text`` with ``by`` before each of its lines."""
    return "\n".join(by + line for line in text.splitlines())


def when(moment: datetime | None, default: str) -> str:
    """A moment to the second, or ``default`` when there is none."""
    return moment.isoformat(timespec="seconds") if moment else default
