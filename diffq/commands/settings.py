"""What every pipeline command shares, in one place: the model, how it samples, the output."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffq.assets import shipped
from diffq.io import check_at_least, check_finite


@dataclass
class SamplingSettings:
    """The embedded tiny-sd by default; prompt (or image) i samples with seed `seed + i`."""

    model: Path = field(default_factory=lambda: shipped("tiny-sd"))
    steps: int = 20
    guidance: float = 5.0
    seed: int = 0
    batch_size: int = 16
    height: int | None = None  # image size in pixels (None: the pipeline's default)
    width: int | None = None
    overwrite: bool = False

    def check_sampling(self) -> None:
        """The shared options, each refused in one line when out of range."""
        check_at_least("--steps", self.steps)
        check_at_least("--batch-size", self.batch_size)
        check_finite("--guidance", self.guidance)
        for option, value in (("--height", self.height), ("--width", self.width)):
            if value is not None:
                check_at_least(option, value)

    @property
    def size(self) -> dict:
        """The pipeline call's height / width where set (see `load_pipeline(..., call=)`)."""
        return {k: v for k, v in (("height", self.height), ("width", self.width)) if v is not None}
