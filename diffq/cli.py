"""Command line: diffq calibrate | eval | compare | bench.

User errors (DiffqError) print one line and exit 2; no traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

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
    parsers = {}
    for name, help_ in commands.items():
        parsers[name] = sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=_not_yet(name))
    _add_eval(parsers["eval"])
    _add_calibrate(parsers["calibrate"])
    _add_compare(parsers["compare"])
    _add_bench(parsers["bench"])
    _add_llm(parsers["calibrate"], parsers["eval"])
    return p


def _add_llm(calibrate: argparse.ArgumentParser, eval_: argparse.ArgumentParser) -> None:
    """Options of the transformers (LLM / text encoder) path, chosen by a --model directory with
    a config.json naming `architectures`, or by --dataset."""
    from pathlib import Path

    for sp in (calibrate, eval_):
        sp.add_argument("--dataset", type=Path, help="transformers models: UTF-8 text file")
        sp.add_argument("--seq-len", type=int, help="transformers models: tokens per window (default 128)")
        sp.add_argument("--num-samples", type=int, help="transformers models: calibration windows "
                        "(default 32) / encoder eval sentences (default 64)")
    calibrate.add_argument("--low-memory", action="store_true",
                           help="transformers models: keep one decoder block's float weights in "
                           "memory at a time, loaded from the safetensors checkpoint when reached")
    eval_.add_argument("--stride", type=int, help="perplexity window stride (default 64)")
    eval_.add_argument("--decode-tokens", type=int, help="greedy tokens per decode run (default 32)")


def _llm_args(args: argparse.Namespace) -> bool:
    from diffq.integrations.llm import SOURCE_FILE, is_transformers_dir

    model, quantized = getattr(args, "model", None), getattr(args, "quantized", None)
    return (args.dataset is not None or (model is not None and is_transformers_dir(model))
            or (quantized is not None and (quantized / SOURCE_FILE).is_file()))


def _run_llm(args: argparse.Namespace) -> int:
    from diffq.integrations import llm

    if args.dataset is None:
        raise InputError("transformers models need --dataset (a UTF-8 text file)")
    if args.command == "calibrate":
        if args.model is None:
            raise InputError("--model (a transformers model directory) is required with --dataset")
        r = llm.run_llm_calibrate(_settings(llm.LLMCalibrateSettings, args, model=args.model,
                                            dataset=args.dataset), progress=not args.no_progress)
        print(f"{r['recipe']}: {len(r['layers'])} layers quantized, {len(r['skipped'])} kept float, "
              f"weight bytes {r['weight_bytes'] / r['weight_bytes_fp']:.3f}x bf16, {r['seconds']} s "
              f"-> {r['out']} (report.md)")
        for pattern in r["unmatched_patterns"]:
            print(f"note: recipe pattern {pattern!r} matched no layer of this model", file=sys.stderr)
        return 0
    if args.quantized is None:
        raise InputError("--quantized (a diffq calibrate output directory) is required")
    r = llm.run_llm_eval(_settings(llm.LLMEvalSettings, args, quantized=args.quantized,
                                   dataset=args.dataset, out=None))
    print(llm.summary_line(r))
    return 0


def _add_bench(sp: argparse.ArgumentParser) -> None:
    from pathlib import Path

    sp.add_argument("--model", help="pipeline directory, 'tiny-sd' (default) or 'sd15' "
                    "(SD1.5-architecture UNet with random weights)")
    sp.add_argument("--recipe", help="default w8a8")
    sp.add_argument("--batch", type=int, help="UNet batch (default 2: guidance doubles it)")
    sp.add_argument("--repeats", type=int, help="timed runs per measurement (median; default 5)")
    sp.add_argument("--warmup", type=int)
    sp.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    sp.add_argument("--layers", type=int, help="per-layer rows: the N largest layers (default 4)")
    sp.add_argument("--out", type=Path, help="write the result as JSON to this file")
    sp.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import json

    from diffq.integrations.bench import BenchSettings, format_bench, run_bench

    s = _settings(BenchSettings, args)
    r = run_bench(s)
    print(format_bench(r))
    if s.out is not None:
        s.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = s.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(r, indent=1))
        tmp.replace(s.out)
    return 0


def _add_compare(sp: argparse.ArgumentParser) -> None:
    from pathlib import Path

    _add_eval(sp)
    sp.add_argument("--schemes", type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
                    help="comma-separated: fp and recipe names/paths "
                         "(default: fp,q8_0,naive-w8a8,w8a8-static,w8a8)")
    sp.add_argument("--calib-prompts", type=Path, help="calibration prompts (default: shapes-calib.txt)")
    sp.add_argument("--num-prompts", type=int, help="calibration prompts to use (default: 128)")
    sp.set_defaults(func=_run_compare, out=None)


def _run_compare(args: argparse.Namespace) -> int:
    from diffq.integrations.compare import CompareSettings, format_table, run_compare

    s = _settings(CompareSettings, args)
    rows = run_compare(s, progress=not args.no_progress)
    print(format_table(rows, {"num_images": s.num_images, "steps": s.steps, "guidance": s.guidance,
                              "seeds": [s.seed, s.seed + s.num_images - 1], "features": "see compare.md"}))
    print(f"-> {s.out}/compare.md, grid.png")
    return 0


def _add_calibrate(sp: argparse.ArgumentParser) -> None:
    from pathlib import Path

    sp.add_argument("--model", type=Path, help="diffusers pipeline directory (default: samples/tiny-sd)")
    sp.add_argument("--prompts", type=Path,
                    help="UTF-8 prompt file (default: samples/prompts/shapes-calib.txt)")
    sp.add_argument("--recipe", help="built-in recipe name or YAML path (default: w8a8)")
    sp.add_argument("--num-prompts", type=int, help="use the first N prompts (default: 128)")
    sp.add_argument("--steps", type=int, help="denoising steps per prompt (default: 20)")
    sp.add_argument("--guidance", type=float)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--out", type=Path, help="output directory (default: out/tiny-sd-w8a8)")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    sp.add_argument("--resume", action="store_true", help="continue an interrupted calibration")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=_run_calibrate)


def _settings(cls, args: argparse.Namespace, **required):
    s = cls(**required)
    for key in vars(s):
        value = getattr(args, key, None)
        if value is not None and value is not False:
            setattr(s, key, value)
    return s


def _run_calibrate(args: argparse.Namespace) -> int:
    if _llm_args(args):
        return _run_llm(args)
    if args.low_memory:
        raise InputError("--low-memory is for transformers models (--model <dir> --dataset <text>)")
    from diffq.integrations.calibrate import CalibrateSettings, run_calibrate

    s = _settings(CalibrateSettings, args)
    r = run_calibrate(s, progress=not args.no_progress)
    print(f"{r['recipe']}: {len(r['layers'])} layers quantized, {len(r['skipped'])} kept float, "
          f"weight bytes {r['weight_bytes'] / r['weight_bytes_fp']:.3f}x bf16, {r['seconds']} s "
          f"-> {s.out} (report.md)")
    return 0


def _add_eval(sp: argparse.ArgumentParser) -> None:
    from pathlib import Path

    sp.add_argument("--model", type=Path, help="diffusers pipeline directory (default: samples/tiny-sd)")
    sp.add_argument("--quantized", type=Path, help="quantized directory (diffq calibrate / diffq.save); "
                    "omitted: the FP pipeline against itself")
    sp.add_argument("--prompts", type=Path, help="UTF-8 prompt file, one per line "
                    "(default: samples/prompts/shapes-eval.txt)")
    sp.add_argument("--num-images", type=int, help="default 64")
    sp.add_argument("--steps", type=int, help="default 20")
    sp.add_argument("--guidance", type=float, help="default 5.0")
    sp.add_argument("--seed", type=int, help="image i uses seed SEED + i (default 0)")
    sp.add_argument("--batch-size", type=int, help="default 16")
    sp.add_argument("--out", type=Path, help="output directory (default: out/eval, out/compare)")
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument("--evaluator", type=Path, help="shapes-domain evaluator (default: samples/tiny-clip)")
    sp.add_argument("--real-images", type=Path, help="directory of reference images for FID")
    sp.add_argument("--clip-model", type=Path, help="local transformers CLIP directory (real models)")
    sp.add_argument("--inception-weights", type=Path, help="local Inception FID weights (real models)")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    if _llm_args(args):
        return _run_llm(args)
    from diffq.integrations.evaluate import EvalSettings, run_eval

    s = _settings(EvalSettings, args)
    report = run_eval(s, progress=not args.no_progress)
    m = report["metrics"]
    print(f"{report['scheme']}: PSNR {m['psnr_db']:.2f} dB, SSIM {m['ssim']:.4f}, "
          f"CLIP {m['clip_score']:.2f} (FP {m['clip_score_fp']:.2f}), "
          f"FID {m['fid']:.3f} (FP {m['fid_fp']:.3f}), weight bytes "
          f"{report['weight_bytes'] / report['weight_bytes_fp']:.3f}x FP -> {s.out}")
    return 0


def _version() -> str:
    from diffq import __version__

    return __version__


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Keep diffusers/transformers to errors (no import-time notes) while the CLI runs.

    Restored afterwards, so a host process that calls main() in-process keeps its own settings.
    """
    keys = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")
    before = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.setdefault(k, "error")
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    with _quiet_libraries():
        return _run(argv)


def _run(argv: list[str] | None) -> int:
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
