"""Aligned text tables, as ``torchsam compare`` and the scripts of ``benchmarks/`` print them."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["aligned"]


def aligned(rows: Sequence[Sequence[str]]) -> str:
    """``rows`` (the first one the header) as left-aligned columns two spaces apart, the header
    underlined with dashes, trailing spaces stripped. Every row has the header's length."""
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    text = []
    for i, row in enumerate(rows):
        text.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)
