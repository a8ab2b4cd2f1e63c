"""Command line: diffq calibrate | eval | compare | bench.

User errors (DiffqError) print one line and exit 2; no traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from diffq.errors import DiffqError, InputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffq", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"diffq {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    commands = {
        "calibrate": "calibrate and quantize a model (default: the embedded tiny-sd, w8a8)",
        "eval": "compare a quantized pipeline with its full-precision model (PSNR/SSIM/CLIP/FID)",
        "compare": "run several schemes on the same prompts and seeds; one table and a grid",
        "bench": "time fp32, bf16 and quantized models (denoisers, encoders, LLM decode); one table",
    }
    parsers = {}
    for name, help_ in commands.items():
        parsers[name] = sub.add_parser(name, help=help_, description=help_)
    _add_eval(parsers["eval"])
    _add_calibrate(parsers["calibrate"])
    _add_compare(parsers["compare"])
    _add_bench(parsers["bench"])
    _add_llm(parsers["calibrate"], parsers["eval"])
    return p


def _option(sp: argparse.ArgumentParser, flag: str, settings, help_: str, **kw) -> None:
    """An option whose help ends with its default, read from the command's settings dataclass
    (the one place defaults live); argparse itself keeps None so unset options stay unset."""
    name = flag.removeprefix("--").replace("-", "_")
    field = {f.name: f for f in dataclasses.fields(settings)}.get(name)
    default = None
    if field is not None:
        default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
    if isinstance(default, list):
        default = ",".join(map(str, default))
    shown = "" if default is None or default is dataclasses.MISSING else f" (default: {default})"
    sp.add_argument(flag, help=help_ + shown, **kw)


def _add_llm(calibrate: argparse.ArgumentParser, eval_: argparse.ArgumentParser) -> None:
    """Options of the transformers (LLM / text encoder) path, chosen by a --model directory with
    a config.json naming `architectures`, or by --dataset."""
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
    from diffq.commands import llm

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
    from diffq.commands.bench import BenchSettings as S
    from diffq.commands.bench_models import WORKLOADS

    _option(sp, "--model", S, f"bench rows, comma-separated ({', '.join(WORKLOADS)}), 'all', "
            "or one pipeline folder (UNet or DiT)")
    _option(sp, "--schemes", S, "recipes to time, comma-separated (unset: each row's own)")
    _option(sp, "--batch", S, "batch (unset: 2 for denoisers, prompts x 2 for guidance; 32 for "
            "bert; 1 for llm-decode)", type=int)
    _option(sp, "--repeats", S, "timed rounds, one call of every variant each (median)", type=int)
    _option(sp, "--warmup", S, "untimed calls of each variant first", type=int)
    _option(sp, "--threads", S, "torch threads (unset: torch's choice)", type=int)
    sp.add_argument("--compile", action="store_true",
                    help="also time every variant (fp32 and bf16 too) under torch.compile")
    _option(sp, "--lora", S, "a diffusers LoRA folder loaded on every variant (denoiser rows)",
            type=Path)
    _option(sp, "--layers", S, "one denoiser row: also time its N largest layers alone", type=int)
    sp.add_argument("--no-memory", action="store_true", help="skip the peak-memory column (one "
                    "process per eager variant, each building its row again)")
    _option(sp, "--out", S, "write the result as JSON to this file", type=Path)
    sp.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import json

    from diffq.commands.bench import BenchSettings, format_bench, run_bench

    s = _settings(BenchSettings, args, memory=not args.no_memory)
    r = run_bench(s)
    print(format_bench(r))
    if s.out is not None:
        s.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = s.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(r, indent=1))
        tmp.replace(s.out)
    return 0


def _add_compare(sp: argparse.ArgumentParser) -> None:
    from diffq.commands.compare import CompareSettings as S

    _add_eval(sp, S)
    _option(sp, "--schemes", S, "comma-separated: fp and recipe names/paths",
            type=lambda v: [x.strip() for x in v.split(",") if x.strip()])
    _option(sp, "--calib-prompts", S, "calibration prompts", type=Path)
    _option(sp, "--num-prompts", S, "calibration prompts to use", type=int)
    sp.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from diffq.commands.compare import CompareSettings, format_table, run_compare

    s = _settings(CompareSettings, args)
    rows = run_compare(s, progress=not args.no_progress)
    print(format_table(rows, {"num_images": s.num_images, "steps": s.steps, "guidance": s.guidance,
                              "seeds": [s.seed, s.seed + s.num_images - 1], "features": "see compare.md"}))
    print(f"-> {s.out}/compare.md, grid.png")
    return 0


def _add_sampling(sp: argparse.ArgumentParser, S) -> None:
    """The options every pipeline command shares: model, prompts, sampling, output."""
    _option(sp, "--model", S, "diffusers pipeline directory", type=Path)
    _option(sp, "--prompts", S, "UTF-8 prompt file, one prompt per line", type=Path)
    _option(sp, "--steps", S, "denoising steps", type=int)
    _option(sp, "--guidance", S, "classifier-free guidance scale", type=float)
    _option(sp, "--seed", S, "prompt (or image) i samples with seed SEED + i", type=int)
    _option(sp, "--batch-size", S, "prompts per pipeline call", type=int)
    _option(sp, "--height", S, "image height in pixels (default: the pipeline's)", type=int)
    _option(sp, "--width", S, "image width in pixels (default: the pipeline's)", type=int)
    _option(sp, "--out", S, "output directory", type=Path)
    sp.add_argument("--overwrite", action="store_true",
                    help="replace an existing output directory that diffq wrote")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_calibrate(sp: argparse.ArgumentParser) -> None:
    from diffq.commands.calibrate import CalibrateSettings as S

    _add_sampling(sp, S)
    _option(sp, "--recipe", S, "built-in recipe name or YAML path")
    _option(sp, "--num-prompts", S, "use the first N prompts", type=int)
    sp.add_argument("--resume", action="store_true", help="continue an interrupted calibration "
                    "from its cache (.<out>.calib-cache beside the output; saved after each batch)")
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
    from diffq.commands.calibrate import CalibrateSettings, run_calibrate

    s = _settings(CalibrateSettings, args)
    r = run_calibrate(s, progress=not args.no_progress)
    print(f"{r['recipe']}: {len(r['layers'])} layers quantized, {len(r['skipped'])} kept float, "
          f"weight bytes {r['weight_bytes'] / r['weight_bytes_fp']:.3f}x bf16, {r['seconds']} s "
          f"-> {s.out} (report.md)")
    from diffq.core.recipe import builtin_recipes

    # built-in recipes name several architectures' layers on purpose; a user's recipe should not
    for component, patterns in ({} if s.recipe in builtin_recipes() else r["unmatched_patterns"]).items():
        for pattern in patterns:
            print(f"note: recipe pattern {pattern!r} matched no layer of the {component}", file=sys.stderr)
    for w in r["warnings"]:
        print(f"diffq calibrate: warning: {w}", file=sys.stderr)
    return 0


def _add_eval(sp: argparse.ArgumentParser, S=None) -> None:
    if S is None:
        from diffq.commands.evaluate import EvalSettings as S
        sp.set_defaults(func=_run_eval)
    _add_sampling(sp, S)
    sp.add_argument("--quantized", type=Path, help="quantized directory (diffq calibrate / "
                    "diffq.save); omitted: the FP pipeline against itself")
    _option(sp, "--num-images", S, "images (prompts cycle when fewer)", type=int)
    sp.add_argument("--no-verify", action="store_true", help="skip the check of every quantized "
                    "tensor against the digest recorded at save time (faster on large models)")
    _option(sp, "--evaluator", S, "shapes-domain evaluator", type=Path)
    sp.add_argument("--real-images", type=Path, help="directory of reference images for FID")
    sp.add_argument("--clip-model", type=Path, help="local transformers CLIP directory (real models)")
    sp.add_argument("--inception-weights", type=Path, help="local Inception FID weights (real models)")


def _run_eval(args: argparse.Namespace) -> int:
    if _llm_args(args):
        return _run_llm(args)
    from diffq.commands.evaluate import EvalSettings, run_eval

    s = _settings(EvalSettings, args)
    report = run_eval(s, progress=not args.no_progress)
    m = report["metrics"]
    print(f"{report['scheme']}: PSNR {m['psnr_db']:.2f} dB, SSIM {m['ssim']:.4f}, "
          f"CLIP {m['clip_score']:.2f} (FP {m['clip_score_fp']:.2f}), "
          f"FID {m['fid']:.3f} (FP {m['fid_fp']:.3f}), weight bytes "
          f"{report['weight_bytes'] / report['weight_bytes_fp']:.3f}x FP -> {s.out}")
    return 0


def _version() -> str:
    from diffq._version import __version__

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


def foreign_diffq() -> str | None:
    """One line when `import diffq` finds a package other than diffq-toolkit, else None."""
    import diffq

    if getattr(diffq, "__distribution__", None) == "diffq-toolkit":
        return None
    where = getattr(diffq, "__file__", None) or "an unknown location"
    return (f"'import diffq' loads a package that is not diffq-toolkit ({where}); the PyPI package "
            "'diffq' is another project with the same import name: pip uninstall -y diffq && "
            "pip install --force-reinstall diffq-toolkit")


def _run(argv: list[str] | None) -> int:
    foreign = foreign_diffq()
    if foreign is not None:
        print(f"diffq: error: {foreign}", file=sys.stderr)
        return 2
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
        hint = _resume_hint(args)
        if hint:
            print(f"diffq {args.command}: {hint}", file=sys.stderr)
        return 130


def _resume_hint(args: argparse.Namespace) -> str | None:
    if args.command != "calibrate" or _llm_args(args):
        return None
    from diffq.commands.calibrate import CalibrateSettings, resume_hint

    return resume_hint(args.out or CalibrateSettings().out)


if __name__ == "__main__":
    sys.exit(main())
