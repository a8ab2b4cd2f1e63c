"""The CPU op-level numbers behind diffq's int8 kernel choices, one run, medians, same inputs:

1. the int8 GEMM for dynamic per-token activations: oneDNN's packed kernel (what diffq runs)
   vs torch._int_mm vs bf16 / fp32 F.linear;
2. activation quantization: `reference.quantize_act` (eager ops) vs `diffq.ops.fused` (one
   Inductor-generated pass), same codes;
3. GELU after a feed-forward GEMM: fused as oneDNN's post-op vs PyTorch's bf16 F.gelu after it
   (and vs a compiled fp32 pass, which diffq tried and dropped: no faster);
4. attention: bf16 SDPA (PyTorch's CPU flash attention) vs an int8 QK^T path built from the
   int8 GEMMs there are (torch._int_mm per head on SageAttention's codes, scores materialized,
   fp32 softmax, bf16 PV), at SD1.5's and SD3-medium's largest attention shapes;
5. the per-call cost of a small W8A8 layer (dynamic, 8 x 384 x 384 bf16): the module, the op
   through torch.library's dispatcher, its implementation called directly (what eager CPU calls
   run), against bf16 nn.Linear;
6. the other low-bit GEMMs torch has on CPU, which W4A8 with float group scales and fp8
   activations would need: fp8 x fp8 `torch._scaled_mm` and dynamic int8 x int4 per-group
   `aten._dyn_quant_matmul_4bit` (its x86 build has no KleidiAI), against bf16 and against
   oneDNN int8 on int4_i8 codes (what diffq's W4A8 runs), at 64 x 1024 x 1024.

    python samples/bench_cpu_ops.py [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from diffq.ops import fused, onednn, reference

GEMMS = [(2048, 384, 1152), (2048, 1536, 384), (2714, 1536, 1536), (2714, 1536, 6144), (1, 2048, 5632)]
ROWS = [(2048, 384), (2048, 1536), (2714, 1536)]


def ms(fn, n: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def gemms(g: torch.Generator) -> None:
    print("| M x K x N | fp32 ms | bf16 ms | torch._int_mm ms | oneDNN int8 ms | oneDNN vs bf16 |")
    print("|---|---|---|---|---|---|")
    for m, k, n in GEMMS:
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        xb, wb = x.bfloat16(), w.bfloat16()
        qw = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        qx = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        wt, u8, packed = qw.t().contiguous(), qx.view(torch.uint8) ^ 0x80, onednn.pack_linear(qw, False)
        scale, zeros = torch.rand(n, generator=g) * 0.01, torch.zeros(n, dtype=torch.int32)
        t = {"fp32": ms(lambda: F.linear(x, w)), "bf16": ms(lambda: F.linear(xb, wb)),
             "int_mm": ms(lambda: torch._int_mm(qx, wt)),
             "onednn": ms(lambda: torch.ops.onednn.qlinear_pointwise(
                 u8, 1.0, 128, packed, scale, zeros, None, 1.0, 0, torch.bfloat16, "none", [], ""))}
        print(f"| {m} x {k} x {n} | {t['fp32']:.3f} | {t['bf16']:.3f} | {t['int_mm']:.3f} | "
              f"{t['onednn']:.3f} | {t['bf16'] / t['onednn']:.2f}x |")


def quantize(g: torch.Generator) -> None:
    print("\n| rows x K (bf16) | reference.quantize_act ms | fused.u8_dynamic ms | same codes |")
    print("|---|---|---|---|")
    for m, k in ROWS:
        x = torch.randn(m, k, generator=g).bfloat16()
        ref, fast = ms(lambda: reference.quantize_act(x, None, [k])), ms(lambda: fused.u8_dynamic(x))
        same = torch.equal(fused.u8_dynamic(x)[0].to(torch.int16) - 128,
                           reference.quantize_act(x, None, [k])[0].to(torch.int16))
        print(f"| {m} x {k} | {ref:.3f} | {fast:.3f} | {same} |")


def gelu(g: torch.Generator) -> None:
    m, k, n = 2714, 1536, 6144  # an SD3-medium feed-forward input projection, batch 2
    qw = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    u8 = torch.randint(0, 256, (m, k), generator=g, dtype=torch.uint8)
    packed, scale = onednn.pack_linear(qw, False), torch.rand(n, generator=g) * 0.01
    zeros, b = torch.zeros(n, dtype=torch.int32), torch.randn(n, generator=g)

    def gemm(post: str, algo: str):
        return torch.ops.onednn.qlinear_pointwise(u8, 0.02, 128, packed, scale, zeros, b, 1.0, 0,
                                                  torch.bfloat16, post, [], algo)
    y = gemm("none", "")
    compiled = torch.compile(lambda v: F.gelu(v.float(), approximate="tanh").to(v.dtype), dynamic=True)
    print(f"\n{m} x {k} x {n} int8 GEMM, bf16 out: alone {ms(lambda: gemm('none', '')):.2f} ms, "
          f"with tanh-GELU post-op {ms(lambda: gemm('gelu', 'tanh')):.2f} ms; after it, bf16 "
          f"F.gelu(tanh) {ms(lambda: F.gelu(y, approximate='tanh')):.2f} ms, "
          f"compiled fp32 {ms(lambda: compiled(y)):.2f} ms")


ATTENTION = [("SD1.5 64x64 self-attention, 1 of 16 batch x heads", 4096, 4096, 40),
             ("SD3-medium joint attention, 1 of 48 batch x heads", 4429, 4429, 64)]


def attention(g: torch.Generator) -> None:
    print("\n| shape (one head) | bf16 SDPA ms | int8 QK^T + fp32 softmax + bf16 PV ms | of which QK^T ms |")
    print("|---|---|---|---|")
    for label, lq, lk, d in ATTENTION:
        q, k, v = (torch.randn(1, 1, n, d, generator=g).bfloat16() for n in (lq, lk, lk))
        qi = torch.randint(-127, 128, (lq, d), generator=g, dtype=torch.int8)
        kt = torch.randint(-127, 128, (d, lk), generator=g, dtype=torch.int8)

        def int8_path():
            scores = torch._int_mm(qi, kt).float() * 1e-4
            return scores.softmax(-1).bfloat16() @ v[0, 0]
        sdpa = ms(lambda: F.scaled_dot_product_attention(q, k, v), n=10)
        print(f"| {label}: {lq} x {lk} x {d} | {sdpa:.2f} | {ms(int8_path, n=10):.2f} | "
              f"{ms(lambda: torch._int_mm(qi, kt), n=10):.2f} |")


def small_layer(g: torch.Generator) -> None:
    from torch import nn

    from diffq.core.recipe import ActivationSpec, WeightSpec
    from diffq.nn import QLinear
    from diffq.ops import library

    lin = nn.Linear(384, 384)
    q = QLinear(lin, WeightSpec("int8", "per_channel"),
                ActivationSpec(mode="dynamic", granularity="per_token")).bfloat16()
    b, x = lin.bfloat16(), torch.randn(8, 384, generator=g).bfloat16()
    args = (x, q.qweight, q.weight_scale.reshape(-1).float(), q.bias, q.kernel_cache, True, "")
    us = {"QLinear": ms(lambda: q(x), n=500),
          "op, dispatched": ms(lambda: library.w8a8_dynamic_linear(*args), n=500),
          "op, direct": ms(lambda: library.call("w8a8_dynamic_linear", *args), n=500),
          "bf16 nn.Linear": ms(lambda: b(x), n=500)}
    print("\n8 x 384 x 384 dynamic W8A8 layer, us a call: " +
          ", ".join(f"{k} {v * 1e3:.0f}" for k, v in us.items()))


def low_bit_gemms(g: torch.Generator) -> None:
    m, k, n, group = 64, 1024, 1024, 32
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    xb, wb = x.bfloat16(), w.bfloat16()
    one = torch.tensor(1.0)
    x8, w8t = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn).t()
    nibbles = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    packed4 = torch.ops.aten._dyn_quant_pack_4bit_weight(
        (nibbles[:, 1::2] << 4 | nibbles[:, ::2]).contiguous(), torch.rand(n, k // group, generator=g),
        None, group, k, n)
    qw = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8) * 16
    u8 = torch.randint(0, 256, (m, k), generator=g, dtype=torch.uint8)
    packed, scale = onednn.pack_linear(qw, False), torch.rand(n, generator=g)
    zeros = torch.zeros(n, dtype=torch.int32)
    t = {"bf16 F.linear": ms(lambda: F.linear(xb, wb)),
         "oneDNN int8 on int4_i8 codes": ms(lambda: torch.ops.onednn.qlinear_pointwise(
             u8, 1.0, 128, packed, scale, zeros, None, 1.0, 0, torch.bfloat16, "none", [], "")),
         "aten._dyn_quant_matmul_4bit (int8 x int4 g32)": ms(
             lambda: torch.ops.aten._dyn_quant_matmul_4bit(x, packed4, group, k, n), n=5),
         "torch._scaled_mm fp8 e4m3": ms(lambda: torch._scaled_mm(
             x8, w8t, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), n=1)}
    print(f"\n{m} x {k} x {n} low-bit GEMMs, ms: " + ", ".join(f"{a} {v:.2f}" for a, v in t.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    torch.set_num_threads(p.parse_args().threads)
    if not onednn.available():
        raise SystemExit("this torch build has no oneDNN int8 kernels")
    if onednn.saturates():
        print("This CPU saturates u8 x s8 pairs (no VNNI): oneDNN times are for unsplit packs, as "
              "weights on the int7 grid run; int8 weights run split, at about twice the time.\n")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        gemms(g)
        quantize(g)
        gelu(g)
        attention(g)
        small_layer(g)
        low_bit_gemms(g)


if __name__ == "__main__":
    main()
