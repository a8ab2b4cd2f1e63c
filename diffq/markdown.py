"""The one Markdown writer behind every report diffq writes (calibrate, eval, compare, bench and
the LLM runs): blocks separated by blank lines, tables whose cells are formatted one way."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def cell(v) -> str:
    """A table cell: floats with 4 significant digits (inf as 'inf'), ints with separators."""
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "no", None: "-"}[v]
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v).replace("|", "\\|").replace("\n", " ")


class Markdown:
    def __init__(self, title: str | None = None) -> None:
        self.blocks: list[str] = []
        if title:
            self.heading(title)

    def heading(self, text: str, level: int = 1) -> Markdown:
        self.blocks.append(f"{'#' * level} {text}")
        return self

    def text(self, *lines: str) -> Markdown:
        """One paragraph (its lines joined by line breaks)."""
        if lines:
            self.blocks.append("\n".join(lines))
        return self

    def bullets(self, items: Iterable[str]) -> Markdown:
        items = list(items)
        if items:
            self.blocks.append("\n".join(f"- {i}" for i in items))
        return self

    def warnings(self, items: Iterable[str]) -> Markdown:
        for w in items:
            self.blocks.append(f"> warning: {w}")
        return self

    def table(self, header: Sequence[str], rows: Iterable[Sequence]) -> Markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
        self.blocks.append("\n".join(lines))
        return self

    def image(self, path: str, alt: str) -> Markdown:
        self.blocks.append(f"![{alt}]({path})")
        return self

    def __str__(self) -> str:
        return "\n\n".join(self.blocks) + "\n"
