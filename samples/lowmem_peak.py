"""Peak memory of `diffq calibrate` on a transformers causal LM, whole model in memory vs
`--low-memory` (one decoder block's float weights at a time), one run each.

Builds a random-weight Llama (default hidden 1024, 8 layers: 0.42 GB of fp32 weights) with
tiny-llm's tokenizer in a temporary folder, then runs each calibration in its own process and
reads that process's peak resident memory.

    python samples/lowmem_peak.py [--hidden 1024] [--layers 8] [--recipe llm-w4a16-gptq]
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_llm_decode import build

HERE = Path(__file__).parent


# Runs the CLI in a fresh process and prints that process's VmHWM (peak RSS of its own address
# space; getrusage's maxrss would also count the parent's pages from before exec).
CHILD = ("import sys; from diffq.cli import main; rc = main(sys.argv[1:]); "
         "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]); "
         "sys.exit(rc)")


def peak_mb(args: list[str]) -> float:
    """Peak resident memory (MB) of `diffq <args>` in its own process."""
    out = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True,
                         text=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--recipe", default="llm-w4a16-gptq")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model"
        model = build(a.hidden, a.layers, vocab=4096)
        fp32_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
        model.save_pretrained(src)
        del model
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(HERE / "tiny-llm" / f, src / f)
        base = ["calibrate", "--model", str(src), "--dataset",
                str(HERE / "tiny-llm" / "corpus-calib.txt"), "--recipe", a.recipe,
                "--num-samples", "16", "--no-progress", "--overwrite"]
        low = peak_mb(base + ["--out", str(Path(tmp) / "low"), "--low-memory"])
        full = peak_mb(base + ["--out", str(Path(tmp) / "full")])
    print(f"Llama hidden {a.hidden}, {a.layers} layers: fp32 weights {fp32_mb:.0f} MB; "
          f"{a.recipe} peak RSS: whole model {full:.0f} MB, --low-memory {low:.0f} MB "
          f"({full - low:.0f} MB less)")


if __name__ == "__main__":
    main()
