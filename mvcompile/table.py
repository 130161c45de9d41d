"""Plain-text tables for the CLI's summaries (formatting only; the CLI does the printing)."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str] | None = None) -> str:
    """Left-aligned columns separated by two spaces, with a rule under the header."""
    cells = [[str(c) for c in row] for row in ([header] if header else []) + list(rows)]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
             for row in cells]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_count(n: float) -> str:
    """1272024 -> '1.27 M'; 407364096 -> '407.36 M'; 2.0e9 -> '2.00 G'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def human_bytes(n: int, decimals: int = 2) -> str:
    """5 -> '5 B', 2048 -> '2.00 KiB', up to TiB (with thousands separators beyond)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.{decimals}f} {unit}"
    return f"{n} B"
