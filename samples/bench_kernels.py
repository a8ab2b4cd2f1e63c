"""GPU benchmark of diffq's Triton kernels against the 16-bit PyTorch ops a user would run:

- W8A8 GEMM (int8 codes in, and the whole linear with activation quantization) vs cuBLAS bf16;
- int8 NHWC conv (with activation quantization) vs cuDNN bf16 channels-last, SD UNet shapes;
- int8 (SageAttention-style) attention vs F.scaled_dot_product_attention (bf16);
- W4A16 (packed int4, group 128) vs bf16 F.linear at decode sizes.

Median of timed runs (torch.cuda.Event) after warm-up; prints a table and writes JSON. Needs a
CUDA GPU and triton; without one it exits with code 2.

    python samples/bench_kernels.py [--repeats 30] [--out out/bench_kernels.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

GEMM_M = (1, 256, 4096, 16384)
GEMM_NK = ((1280, 1280), (10240, 1280), (1280, 5120), (640, 640))  # SD1.5 attn / GEGLU / FF-out
CONV = ((320, 64), (640, 32), (1280, 16))  # channels, latent side; batch 2, 3x3, padding 1
ATTN_TOKENS = (1024, 4096, 16384)
W4_NK = ((4096, 4096), (11008, 4096), (4096, 11008))


def median_ms(fn, warmup: int, repeats: int) -> float:
    """Median wall time of fn() on the GPU in ms, timed with CUDA events after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def _int8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, device="cuda") / k ** 0.5
    scale = w.abs().amax(dim=1) / 127
    return w, torch.round(w / scale[:, None]).to(torch.int8), scale


def bench_gemm(timeit, quick: bool) -> list[dict]:
    from diffq.kernels import act_quant, w8a8_gemm

    rows = []
    for n, k in GEMM_NK[:2] if quick else GEMM_NK:
        w, qw, ws = _int8_weight(n, k)
        wb = w.bfloat16()
        for m in GEMM_M[:3] if quick else GEMM_M:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xs = (x.float().abs().amax() / 127).reshape(1)
            qx = act_quant.quantize_static(x, xs)
            ref = x @ wb.T
            y = w8a8_gemm.w8a8_linear(x, qw, ws, None, xs)
            rows.append(dict(
                kind="w8a8_gemm", shape=f"{m}x{n}x{k}", baseline_ms=timeit(lambda: torch.mm(x, wb.T)),
                kernel_ms=timeit(lambda: w8a8_gemm.w8a8_matmul(qx, qw, xs, ws, None, "none", torch.bfloat16)),
                with_quant_ms=timeit(lambda: w8a8_gemm.w8a8_linear(x, qw, ws, None, xs)),
                rel_err=rel_err(y, ref)))
    return rows


def bench_conv(timeit, quick: bool) -> list[dict]:
    from diffq.kernels import act_quant, int8_conv

    rows = []
    for c, side in CONV[1:] if quick else CONV:
        x = torch.randn(2, c, side, side, device="cuda", dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, c, 3, 3, device="cuda") / (9 * c) ** 0.5
        ws = w.abs().amax(dim=(1, 2, 3)) / 127
        qw = torch.round(w / ws[:, None, None, None]).to(torch.int8)
        w_ohwi = qw.permute(0, 2, 3, 1).contiguous()
        wb = w.bfloat16().contiguous(memory_format=torch.channels_last)
        xs = (x.float().abs().amax() / 127).reshape(1)
        qx = act_quant.quantize_static(x.permute(0, 2, 3, 1), xs)
        ref = F.conv2d(x, wb, padding=1)
        def full():
            return int8_conv.w8a8_conv2d(x, w_ohwi, ws, None, xs, None, (1, 1), (1, 1))

        y = full()
        rows.append(dict(
            kind="int8_conv3x3", shape=f"2x{c}x{side}x{side}",
            baseline_ms=timeit(lambda: F.conv2d(x, wb, padding=1)),
            kernel_ms=timeit(lambda: int8_conv.int8_conv2d(qx, w_ohwi, xs, [c], ws, None, (1, 1), (1, 1),
                                                           out_dtype=torch.bfloat16)),
            with_quant_ms=timeit(full),
            rel_err=rel_err(y, ref)))
    return rows


def bench_attention(timeit, quick: bool) -> list[dict]:
    from diffq.kernels.int8_attention import int8_attention

    rows = []
    for tokens in ATTN_TOKENS[:2] if quick else ATTN_TOKENS:
        q, k, v = (torch.randn(2, 8, tokens, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = F.scaled_dot_product_attention(q, k, v)
        rows.append(dict(
            kind="int8_attention", shape=f"2x8x{tokens}x64",
            baseline_ms=timeit(lambda: F.scaled_dot_product_attention(q, k, v)),
            kernel_ms=timeit(lambda: int8_attention(q, k, v)), with_quant_ms=None,
            rel_err=rel_err(int8_attention(q, k, v), ref)))
    return rows


def bench_w4a16(timeit, quick: bool) -> list[dict]:
    from diffq.core.recipe import WeightSpec
    from diffq.core.weights import quantize_weight
    from diffq.kernels.w4a16_gemm import w4a16_matmul

    rows = []
    for n, k in W4_NK[:1] if quick else W4_NK:
        w = torch.randn(n, k, device="cuda") / k ** 0.5
        qw = quantize_weight(w, WeightSpec("int4", "per_group", 128, False, scale_dtype="float16"))
        wb = w.bfloat16()
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            xb = x.bfloat16()
            ref = F.linear(x.float(), qw.dequantize(torch.float32))
            rows.append(dict(
                kind="w4a16", shape=f"{m}x{n}x{k}", baseline_ms=timeit(lambda: F.linear(xb, wb)),
                kernel_ms=timeit(lambda: w4a16_matmul(x, qw.data, qw.scale, qw.zero_point, None, 128)),
                with_quant_ms=None,
                rel_err=rel_err(w4a16_matmul(x, qw.data, qw.scale, qw.zero_point, None, 128), ref)))
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'kernel':16} {'shape':20} {'16-bit ms':>10} {'kernel ms':>10} {'+quant ms':>10} "
          f"{'speedup':>8} {'rel err':>8}")
    for r in rows:
        wq = "-" if r["with_quant_ms"] is None else f"{r['with_quant_ms']:.4f}"
        print(f"{r['kind']:16} {r['shape']:20} {r['baseline_ms']:10.4f} {r['kernel_ms']:10.4f} {wq:>10} "
              f"{r['baseline_ms'] / r['kernel_ms']:7.2f}x {r['rel_err']:8.4f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("out/bench_kernels.json"))
    ap.add_argument("--quick", action="store_true", help="a subset of the shapes")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    torch.manual_seed(0)

    def timeit(fn):
        return median_ms(fn, a.warmup, a.repeats)

    rows = []
    with torch.inference_mode():
        for bench in (bench_gemm, bench_conv, bench_attention, bench_w4a16):
            rows += bench(timeit, a.quick)
    print_table(rows)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                     repeats=a.repeats, rows=rows), indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
