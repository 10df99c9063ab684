"""Plain-text output shared by the commands and tools: markdown tables."""
from __future__ import annotations


def format_table(rows: list[dict], cols: list[str]) -> str:
    """A markdown table; floats to 4 decimals, ints with thousands separators."""
    def fmt(v) -> str:
        if isinstance(v, bool):
            return str(v)
        if isinstance(v, int):
            return f"{v:,}"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
