"""Markdown tables for the bench modules' reports: one header, a separator, one line per row."""
from __future__ import annotations


def markdown_table(header: list, rows: list) -> list[str]:
    """The table's lines; cells are written with str(), so format numbers before.

    >>> markdown_table(["a", "b"], [[1, "x"]])
    ['| a | b |', '|---|---|', '| 1 | x |']
    """
    def line(cells):
        return "| " + " | ".join(str(c) for c in cells) + " |"
    return [line(header), "|" + "---|" * len(header), *map(line, rows)]
