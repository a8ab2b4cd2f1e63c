import torch

from diffq.algos.awq import rtn
from diffq.algos.hessian import hessian_error, update_hessian
from diffq.algos.outliers import decomposed_linear, outlier_channels, sparse_outliers
from diffq.algos.smoothquant import w8a8_output
from diffq.core.recipe import WeightSpec
from tests.algos.conftest import outlier_inputs


def test_outlier_channels_and_decomposition(gen):
    channels = torch.tensor([3, 40, 77])
    x = outlier_inputs(gen, 64, 128, channels, factor=40.0)
    x[:, channels] += 8.0 * torch.sign(x[:, channels])  # every outlier channel reaches >= 8
    idx = outlier_channels(x.abs().amax(0), threshold=6.0)
    assert torch.equal(idx, channels)  # a N(0, 1) entry reaches 6 with probability 2e-9
    w = torch.randn(32, 128, generator=gen) * 0.1
    spec = WeightSpec("int8", "per_channel")
    ref = x @ w.t()
    e_plain = (w8a8_output(x, w, spec) - ref).pow(2).sum()
    e_split = (decomposed_linear(x, w, idx, spec) - ref).pow(2).sum()
    assert e_split < 0.2 * e_plain
    # no outlier channels at all: the decomposition is plain W8A8
    torch.testing.assert_close(decomposed_linear(x, w, torch.zeros(0, dtype=torch.long), spec),
                               w8a8_output(x, w, spec))


def test_sparse_outliers_pick_the_most_salient_weights(gen):
    spec = WeightSpec("int4", "per_channel")
    w = torch.randn(16, 64, generator=gen)
    w[2, 5] = 12.0  # one huge weight: stretches its row's scale and is salient itself
    x = torch.randn(400, 64, generator=gen) * (torch.rand(64, generator=gen) * 3 + 0.1)
    h = update_hessian(None, 0, x, torch.float64)[0]
    idx, values = sparse_outliers(w, h, spec, fraction=0.02)
    assert len(idx) == round(0.02 * w.numel()) and torch.all(idx[1:] > idx[:-1])
    assert torch.equal(values, w.reshape(-1)[idx])
    # keeping them in float lowers the layer error, and by more than keeping the same number
    # of largest-magnitude weights (measured on 300 draws: error ratio to that choice median
    # 0.52, max 0.68; the magnitude choice itself is sometimes no better than RTN)
    wq = rtn(w, spec)

    def kept(index):
        out = wq.clone().reshape(-1)
        out[index] = w.reshape(-1)[index]
        return out.reshape(w.shape)

    by_magnitude = torch.argsort(w.abs().reshape(-1), descending=True)[:len(idx)]
    e_rtn = hessian_error(wq - w, h)
    e_salient = hessian_error(kept(idx) - w, h)
    e_magnitude = hessian_error(kept(by_magnitude) - w, h)
    assert e_salient < 0.8 * min(e_magnitude, e_rtn)
