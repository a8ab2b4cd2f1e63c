import pytest
import torch

from diffq.algos.gptq import gptq
from diffq.algos.hessian import hessian_error, update_hessian
from diffq.core.recipe import WeightSpec
from diffq.core.weights import quantize_weight
from tests.algos.naive_obq import naive_obq


def correlated_layer(g: torch.Generator, o: int, k: int, n: int, dtype=torch.float32):
    """A weight and a Hessian of correlated inputs: shared latent factors plus channel noise,
    with channel magnitudes that vary (as in real activations)."""
    w = torch.randn(o, k, generator=g, dtype=dtype)
    z = torch.randn(n, max(2, k // 16), generator=g, dtype=dtype) @ torch.randn(max(2, k // 16), k,
                                                                             generator=g, dtype=dtype)
    x = (z + 0.3 * torch.randn(n, k, generator=g, dtype=dtype)) * (torch.rand(k, generator=g) + 0.2)
    return w, update_hessian(None, 0, x, dtype)[0]


SPECS = {
    "int4_channel": WeightSpec("int4", "per_channel"),
    "int4_g16": WeightSpec("int4", "per_group", group_size=16),
    "int4_g16_asym_mse": WeightSpec("int4", "per_group", group_size=16, symmetric=False, clip="mse"),
    "int8_channel": WeightSpec("int8", "per_channel"),
    "nf4_g16": WeightSpec("nf4", "per_group", group_size=16),
}


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("static_groups", [False, True])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_blocked_gptq_equals_naive_obq(name, act_order, static_groups, gen):
    """Cholesky + lazy blocks (block 24: groups of 16 straddle blocks) == explicit OBS updates."""
    spec = SPECS[name]
    w, h = correlated_layer(gen, 12, 64, 200, torch.float64)
    h[5, :] = h[:, 5] = 0  # a dead input channel
    wq = gptq(w, h, spec, block_size=24, act_order=act_order, static_groups=static_groups)
    ref = naive_obq(w, h, spec, act_order=act_order, static_groups=static_groups)
    got = wq.dequantize(torch.float64)
    assert (got - ref).norm() <= 1e-6 * ref.norm()
    assert torch.all(got[:, 5] == ref[:, 5])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_storage_is_diffq_layout_and_diagonal_hessian_gives_rtn(name, gen):
    """With uncorrelated inputs (diagonal H) no error can be moved, so GPTQ must return RTN's
    codes and scales bit for bit, in the same storage dtypes and shapes."""
    spec = SPECS[name]
    w = torch.randn(16, 64, generator=gen)
    h = torch.diag(torch.rand(64, generator=gen) + 0.1)
    got, ref = gptq(w, h, spec, block_size=32), quantize_weight(w, spec)
    assert got.data.dtype == ref.data.dtype and torch.equal(got.data, ref.data)
    assert got.scale.shape == ref.scale.shape and torch.equal(got.scale, ref.scale)
    assert (got.zero_point is None) == (ref.zero_point is None)
    if ref.zero_point is not None:
        assert torch.equal(got.zero_point, ref.zero_point)


def test_conv_weight_shape_round_trips(gen):
    w = torch.randn(8, 4, 3, 3, generator=gen)
    x = torch.randn(100, 36, generator=gen)
    q = gptq(w, update_hessian(None, 0, x)[0], WeightSpec("int4", "per_group", group_size=12))
    assert q.shape == (8, 4, 3, 3) and q.dequantize().shape == w.shape and q.data.shape == (8, 18)


# Measured on seeds 0..29 (64 x 256 layers, rank-16 correlated inputs): GPTQ / RTN output error
# ratio median 0.04 (max 0.064) in order, 0.009 (max 0.011) with act_order; 30 / 30 wins for
# int4 g64, int4 per channel, int8 and nf4.
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", [WeightSpec("int4", "per_group", group_size=64, clip="mse"),
                                  WeightSpec("int4", "per_channel"),
                                  WeightSpec("nf4", "per_group", group_size=64)],
                         ids=["int4_g64_mse", "int4_channel", "nf4_g64"])
def test_gptq_beats_rtn_on_correlated_inputs(spec, act_order):
    wins, ratios = 0, []
    for seed in range(10):
        w, h = correlated_layer(torch.Generator().manual_seed(seed), 64, 256, 1024)
        e_gptq = hessian_error(gptq(w, h, spec, act_order=act_order).dequantize() - w, h)
        e_rtn = hessian_error(quantize_weight(w, spec).dequantize() - w, h)
        wins += int(e_gptq < e_rtn)
        ratios.append(float(e_gptq / e_rtn))
    assert wins == 10
    assert max(ratios) < 0.2


def test_gptq_is_near_the_exhaustive_optimum():
    """K = 4 inputs, int4 codes with GPTQ's per-row scale: all 16^4 code vectors of every row are
    enumerated for the exact minimum of e H eᵀ. Measured on these 40 layers (16 rows each):
    summed GPTQ error / optimum 1.33 (1.18 with act_order), RTN 1.83; worst layer 5.7 (GPTQ is
    greedy: one badly conditioned H can cost it)."""
    spec = WeightSpec("int4", "per_channel")
    grid = torch.cartesian_prod(*[torch.arange(-8, 8, dtype=torch.float64)] * 4)  # [65536, 4]
    totals = {"gptq": 0.0, "act_order": 0.0, "rtn": 0.0, "opt": 0.0}
    worst = 0.0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(16, 4, generator=g, dtype=torch.float64)
        x = torch.randn(64, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 4, generator=g,
                                                                               dtype=torch.float64)
        h = update_hessian(None, 0, x, torch.float64)[0]
        q = gptq(w, h, spec)
        cand = grid[None] * q.scale.double()[:, None, :] - w[:, None, :]  # [16, 65536, 4]
        opt = float(torch.einsum("onk,kl,onl->on", cand, h, cand).amin(1).sum())
        e = float(hessian_error(q.dequantize(torch.float64) - w, h))
        assert e >= opt * (1 - 1e-9)  # nothing beats the exhaustive optimum on the same grid
        worst = max(worst, e / opt)
        totals["gptq"] += e
        totals["act_order"] += float(hessian_error(gptq(w, h, spec, act_order=True).dequantize(torch.float64)
                                                   - w, h))
        totals["rtn"] += float(hessian_error(quantize_weight(w, spec).dequantize(torch.float64) - w, h))
        totals["opt"] += opt
    assert totals["gptq"] <= 1.5 * totals["opt"]
    assert totals["act_order"] <= 1.35 * totals["opt"]
    assert totals["gptq"] < totals["rtn"] and totals["act_order"] < totals["rtn"]
    assert worst <= 8.0


def test_bad_arguments():
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="block_size"):
        gptq(w, h, WeightSpec("int8"), block_size=0)
    with pytest.raises(ValueError, match="does not divide"):
        gptq(w, h, WeightSpec("int4", "per_group", group_size=6))
