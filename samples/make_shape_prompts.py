"""Write the shapes prompt sets: samples/prompts/shapes-{calib,eval}.txt.

    python samples/make_shape_prompts.py

Prompts are captions of distinct scenes of the calib / eval splits (seed 0), disjoint from
each other and from every train caption by construction (see diffq.eval.shapes.split_of).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffq.eval.shapes import split_prompts

PROMPT_SETS = {"calib": 256, "eval": 512}
SEED = 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "prompts"))
    args = p.parse_args()
    for split, n in PROMPT_SETS.items():
        path = Path(args.out_dir) / f"shapes-{split}.txt"
        path.write_text("\n".join(split_prompts(split, n, SEED)) + "\n")
        print(f"wrote {n} prompts to {path}")


if __name__ == "__main__":
    main()
