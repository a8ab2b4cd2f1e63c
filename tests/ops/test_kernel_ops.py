"""The diffq::w4a16_linear / int8_attention / quantize_act ops: schema and fake checks, their
pure-torch defaults against independent math, and the CUDA (Triton) kernels being registered
for every op without importing triton."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from diffq.core.recipe import WeightSpec
from diffq.core.weights import quantize_weight
from diffq.ops import library

OPS = ("w8a8_linear", "w8a8_conv2d", "w4a16_linear", "int8_attention", "quantize_act")


def test_cuda_kernels_are_registered_without_importing_triton():
    code = ("import sys, torch, diffq.ops; print([torch._C._dispatch_has_kernel_for_dispatch_key("
            f"'diffq::' + n, 'CUDA') for n in {OPS!r}], 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"{[True] * len(OPS)} False"


def _w4_args(gen, symmetric):
    qw = quantize_weight(torch.randn(24, 128, generator=gen),
                         WeightSpec("int4", "per_group", 32, symmetric, scale_dtype="float16"))
    x = torch.randn(3, 5, 128, generator=gen)
    return qw, (x, qw.data, qw.scale, qw.zero_point, torch.randn(24, generator=gen), 32)


@pytest.mark.parametrize("symmetric", [True, False])
def test_w4a16_default_is_the_dequantized_linear(gen, symmetric):
    qw, args = _w4_args(gen, symmetric)
    torch.library.opcheck(torch.ops.diffq.w4a16_linear.default, args)
    y = library.w4a16_linear(*args)
    assert torch.equal(y, F.linear(args[0], qw.dequantize(torch.float32), args[4]))


def test_quantize_act_static_segments_and_dynamic(gen):
    x = torch.randn(2, 6, 24, generator=gen) * 3
    scale = torch.tensor([0.02, 0.05])
    torch.library.opcheck(torch.ops.diffq.quantize_act.default, (x, scale, [16, 8]))
    torch.library.opcheck(torch.ops.diffq.quantize_act.default, (x, None, [24]))
    q, s = library.quantize_act(x, scale, [16, 8])
    expect = torch.cat([torch.full((16,), 0.02), torch.full((8,), 0.05)])
    assert torch.equal(s, expect)
    assert torch.equal(q, torch.round(x / expect).clamp(-128, 127).to(torch.int8))
    q, s = library.quantize_act(x, None, [24])
    assert s.shape == (2, 6, 1) and torch.equal(s, x.abs().amax(-1, keepdim=True) / 127)
    assert (q.float() * s - x).abs().max() <= s.max() / 2 + 1e-6  # within half a step


def test_int8_attention_default_is_close_to_float_attention(gen):
    q, k, v = (torch.randn(1, 2, 70, 32, generator=gen) for _ in range(3))
    k = k + 3 * torch.randn(1, 2, 1, 32, generator=gen)  # a shared offset: smoothing removes it
    torch.library.opcheck(torch.ops.diffq.int8_attention.default, (q, k, v, None, 32, 32))
    out = library.int8_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert float(F.cosine_similarity(out.flatten(), ref.flatten(), dim=0)) > 0.999


def test_kernel_of_names_the_real_kernels_and_the_simulated_schemes():
    from diffq.core.recipe import ActivationSpec, WeightSpec
    from diffq.ops import kernel_of, onednn

    w8 = WeightSpec("int8", "per_channel").layout()
    w4 = WeightSpec("int4", "per_group", group_size=64).layout()
    static, dynamic = ActivationSpec(), ActivationSpec(mode="dynamic", granularity="per_token")
    assert kernel_of(w8, static, conv=True) == ("oneDNN int8" if onednn.available()
                                                else "reference (int8 activations simulated)")
    assert kernel_of(w8, static, conv=False, device="cuda") == "Triton int8"
    assert kernel_of(w8, dynamic, conv=False) == ("oneDNN int8 (dynamic)" if onednn.available()
                                                  else "int8 GEMM (torch._int_mm)")
    assert kernel_of(w8, dynamic, conv=True) == ("oneDNN int8 (dynamic, per image)" if onednn.available()
                                                 else "reference (int8 activations simulated)")
    assert kernel_of(w8, dynamic, conv=True, device="cuda") == "reference (int8 activations simulated)"
    assert kernel_of(w8, dynamic, conv=False, device="cuda") == "int8 GEMM (torch._int_mm)"
    assert kernel_of(w4, static, conv=False) == "reference (int8 activations simulated)"
    assert kernel_of(w4, None, conv=False) == "weight-only: dequantize + float"
    assert kernel_of(w4, None, conv=False, device="cuda") == "Triton w4a16"


def test_cuda_kernels_take_every_argument_of_their_op():
    """A CUDA kernel is called with the op's full argument list: a schema change that a kernel
    misses would only fail on a GPU."""
    import inspect

    from diffq.ops import cuda

    pairs = {"w8a8_linear": cuda._w8a8_linear_cuda, "w8a8_conv2d": cuda._w8a8_conv2d_cuda,
             "w4a16_linear": cuda._w4a16_linear_cuda, "int8_attention": cuda._int8_attention_cuda,
             "quantize_act": cuda._quantize_act_cuda}
    for op, kernel in pairs.items():
        schema = getattr(torch.ops.diffq, op).default._schema
        assert list(inspect.signature(kernel).parameters) == [a.name for a in schema.arguments], op


def test_every_shipped_scheme_with_int8_activations_runs_a_real_cpu_kernel():
    """Each built-in recipe's weight layouts (mixed-precision candidates included) with its
    activations: no layer that says int8 activations is simulated on this CPU. What stays
    simulated is named: fp8 activations (no fp8 GEMM on x86, see bench_cpu_ops section 6)."""
    from diffq.core.recipe import builtin_recipes, load_recipe
    from diffq.ops import kernel_of, onednn

    if not onednn.available():
        pytest.skip("no oneDNN int8 kernels")
    simulated = {}
    for name in builtin_recipes():
        r = load_recipe(name)
        if r.activations is None:
            continue
        specs = [r.weights] + (list(r.mixed.candidates) if r.mixed else [])
        for spec in specs:
            for conv in (False, True):
                k = kernel_of(spec.layout(), r.activations, conv=conv)
                if "simulated" in k:
                    simulated.setdefault(name, set()).add(k)
    assert simulated == {"fp8": {"reference (fp8_e4m3 activations simulated)"}}, simulated
