"""Plain-text output for the terminal (standard library only: the light CLI path prints with it)."""

from __future__ import annotations


def format_table(cols: list[str], rows: list[tuple], max_width: int | None = 60) -> str:
    """A plain-text table for the terminal; cells over ``max_width`` characters are cut (None: never)."""
    def cell(v) -> str:
        s = "NULL" if v is None else (v.hex()[:16] + "…" if isinstance(v, (bytes, bytearray)) else str(v))
        return s if max_width is None or len(s) <= max_width else s[: max_width - 1] + "…"

    body = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(cols)]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)), line]
    out += [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in body]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)
