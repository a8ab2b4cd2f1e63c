"""Command line: diffq calibrate | eval | compare | bench.

User errors (DiffqError) print one line and exit 2; no traceback.
"""
from __future__ import annotations

import argparse
import sys

from diffq.errors import DiffqError, InputError


def _not_yet(name: str):
    def run(_args: argparse.Namespace) -> int:
        raise InputError(f"'diffq {name}' is not available yet in this version")

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffq", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"diffq {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    commands = {
        "calibrate": "calibrate and quantize a model (default: the embedded tiny-sd, w8a8)",
        "eval": "compare a quantized pipeline with its full-precision model (PSNR/SSIM/CLIP/FID)",
        "compare": "run several schemes on the same prompts and seeds; one table and a grid",
        "bench": "time FP32, bf16 and quantized layers and UNet steps; ratios table",
    }
    for name, help_ in commands.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=_not_yet(name))
    return p


def _version() -> str:
    from diffq import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except DiffqError as e:
        print(f"diffq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffq {args.command}: interrupted; no partial output was published", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
