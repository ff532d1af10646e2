"""Plain-text tables for the terminal and Markdown reports."""

from __future__ import annotations

# the parts whose harmonic mean is the Score, by data set kind
SCORE_PARTS = {"counterfact": ("es", "ps", "ns"), "requests": ("es", "ps", "ns"), "zsre": ("ea", "pa", "na")}
KIND_COLUMNS = {kind: ["n", *parts, "score"] for kind, parts in SCORE_PARTS.items()}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def format_table(rows: list[dict], columns: list[str] | None = None, markdown: bool = False) -> str:
    """Rows of dicts as an aligned table (or a Markdown table)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*columns), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in cells]
    return "\n".join(lines)
