from pathlib import Path

import pytest

from diffq.eval.evaluator import TinyClip

TINY_CLIP = Path(__file__).resolve().parents[2] / "samples" / "tiny-clip"


@pytest.fixture(scope="session")
def evaluator() -> TinyClip:
    """The committed TinyClip evaluator."""
    return TinyClip.from_pretrained(TINY_CLIP)
