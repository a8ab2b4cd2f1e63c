"""What every pipeline command shares, in one place: the model, how it samples, the output."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffq.assets import shipped


@dataclass
class SamplingSettings:
    """The embedded tiny-sd by default; prompt (or image) i samples with seed `seed + i`."""

    model: Path = field(default_factory=lambda: shipped("tiny-sd"))
    steps: int = 20
    guidance: float = 5.0
    seed: int = 0
    batch_size: int = 16
    overwrite: bool = False
