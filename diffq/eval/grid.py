"""Labelled image grids for side-by-side comparisons."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageChops, ImageDraw

_LABEL_HEIGHT = 14
_LINE_HEIGHT = 11
_PAD = 2


def difference(a: Image.Image, b: Image.Image, gain: int = 4) -> Image.Image:
    """|a - b| per pixel, amplified `gain` times, so small quantization errors are visible."""
    return ImageChops.difference(a.convert("RGB"), b.convert("RGB")).point(lambda v: min(255, v * gain))


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None,
               scale: int = 1, captions: list[str] | None = None) -> Image.Image:
    """Paste rows of equally sized images into one RGB image; labels[i] is drawn above row i,
    captions[j] (wrapped to the cell width, e.g. the prompt) below column j.

    scale enlarges each cell by nearest-neighbour upsampling, so small images stay crisp.
    """
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one non-empty row")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"{len(labels)} labels for {len(rows)} rows")
    w, h = rows[0][0].size[0] * scale, rows[0][0].size[1] * scale
    label_h = _LABEL_HEIGHT if labels is not None else 0
    n_cols = max(len(r) for r in rows)
    wrapped = [textwrap.wrap(c, max(4, w // 6)) for c in (captions or [])]
    caption_h = max((len(lines) for lines in wrapped), default=0) * _LINE_HEIGHT
    body_h = len(rows) * (h + label_h + _PAD)
    grid = Image.new("RGB", (n_cols * (w + _PAD) + _PAD, body_h + caption_h + _PAD),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        y = _PAD + i * (h + label_h + _PAD)
        if labels is not None:
            draw.text((_PAD, y), labels[i], fill=(0, 0, 0))
        for j, img in enumerate(row):
            cell = img.convert("RGB").resize((w, h), Image.NEAREST) if scale != 1 else img.convert("RGB")
            grid.paste(cell, (_PAD + j * (w + _PAD), y + label_h))
    for j, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            draw.text((_PAD + j * (w + _PAD), body_h + k * _LINE_HEIGHT), line, fill=(0, 0, 0))
    return grid
