"""Tables drawn the way seed 002 draws the mapping table, for the CLI and the demo."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["table"]


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
