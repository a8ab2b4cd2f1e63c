import pytest
import torch
import torch.nn.functional as F

from diffq.algos import hessian as hs


def _direct_conv_hessian(x, kernel, stride, padding, dilation):
    """H = (2/n) Σ p pᵀ over every output pixel's receptive-field patch p, gathered by explicit
    indexing of the zero-padded input (no unfold)."""
    b, c, hgt, wid = x.shape
    kh, kw = kernel
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    oh = (hgt + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wid + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    patches = []
    for n in range(b):
        for i in range(oh):
            for j in range(ow):
                r = [i * stride[0] + a * dilation[0] for a in range(kh)]
                s = [j * stride[1] + e * dilation[1] for e in range(kw)]
                patches.append(xp[n][:, r][:, :, s].reshape(-1))  # [C * kh * kw], c-major
    p = torch.stack(patches)
    return 2 * p.t() @ p / p.shape[0]


@pytest.mark.parametrize("geom", [((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 2), (2, 1), (1, 0), (1, 2)),
                                  ((1, 1), (1, 1), (0, 0), (1, 1))])
def test_conv_hessian_by_unfold_equals_direct(geom, gen):
    kernel, stride, padding, dilation = geom
    x = torch.randn(2, 3, 7, 6, generator=gen, dtype=torch.float64)
    h, n = hs.update_hessian(None, 0, hs.conv_rows(x, kernel, stride, padding, dilation), torch.float64)
    ref = _direct_conv_hessian(x, kernel, stride, padding, dilation)
    assert h.shape == (3 * kernel[0] * kernel[1],) * 2
    torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-12)
    # and the rows really are the conv's input: conv(x, W) == rows @ W^T
    w = torch.randn(5, 3, *kernel, generator=gen, dtype=torch.float64)
    y = F.conv2d(x, w, None, stride, padding, dilation)
    rows = hs.conv_rows(x, kernel, stride, padding, dilation)
    torch.testing.assert_close(rows @ w.reshape(5, -1).t(),
                               y.permute(0, 2, 3, 1).reshape(-1, 5), rtol=1e-12, atol=1e-12)
    assert n == rows.shape[0]


def test_running_mean_matches_one_shot_and_output_error(gen):
    x = torch.randn(3, 50, 16, generator=gen, dtype=torch.float64)
    rows = hs.linear_rows(x)
    h, n = None, 0
    for chunk in torch.split(rows, [7, 0, 60, 83]):
        h, n = hs.update_hessian(h, n, chunk, torch.float64)
    assert n == 150
    torch.testing.assert_close(h, 2 * rows.t() @ rows / 150, rtol=1e-12, atol=1e-12)
    # tr(dW H dW^T) is (2/n) * sum of squared output changes
    dw = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    direct = 2 * (rows @ dw.t()).pow(2).sum() / 150
    torch.testing.assert_close(hs.hessian_error(dw, h), direct, rtol=1e-12, atol=0)
    # rescaling: the Hessian of x / s
    s = torch.rand(16, generator=gen, dtype=torch.float64) + 0.5
    torch.testing.assert_close(hs.rescale_hessian(h, s), 2 * (rows / s).t() @ (rows / s) / 150)


def test_float32_hessian_stays_float32(gen):
    h, _ = hs.update_hessian(None, 0, torch.randn(10, 8, generator=gen, dtype=torch.bfloat16))
    assert h.dtype == torch.float32 and torch.allclose(h, h.t())


def test_channel_stats_running(gen):
    x = torch.randn(4, 6, 5, 5, generator=gen) * torch.arange(1, 7).reshape(1, 6, 1, 1)
    mean, mx, n = None, None, 0
    for part in x.split([1, 3]):
        mean, mx, n = hs.update_channel_stats(mean, mx, n, part, axis=1)
    a = x.abs().transpose(0, 1).reshape(6, -1).double()
    assert n == 100
    torch.testing.assert_close(mean, a.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mx, a.amax(1))
