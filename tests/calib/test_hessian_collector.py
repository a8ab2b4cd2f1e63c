import pytest
import torch
from torch import nn

from diffq.algos.hessian import conv_rows, update_channel_stats, update_hessian
from diffq.calib.collector import run_calibration
from diffq.calib.hessian import InputCollector
from diffq.errors import CalibrationError


class ConvLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.proj = nn.Linear(8, 16)

    def forward(self, x, scale=1.0):
        h = self.grouped(torch.relu(self.conv(x)))
        return self.proj(h.flatten(2).transpose(1, 2) * scale)


def test_collector_equals_direct_statistics(gen):
    torch.manual_seed(0)
    m = ConvLinear()
    items = [{"x": torch.randn(2, 3, 8, 8, generator=gen), "scale": s} for s in (0.5, 2.0, 1.0)]
    layers = {"conv": m.conv, "grouped": m.grouped, "proj": m.proj}
    collector = InputCollector(layers, hessian=["conv", "proj"], samples={"proj": 20})
    run_calibration(m, items, collector, progress=False)
    st = collector.stats()
    # the same statistics computed directly from the layer inputs
    h_conv = h_proj = mean = mx = None
    n_conv = n_proj = n_tok = 0
    for it in items:
        x = it["x"]
        h_conv, n_conv = update_hessian(h_conv, n_conv, conv_rows(x, (3, 3), (2, 2), (1, 1)))
        with torch.no_grad():
            p = m.grouped(torch.relu(m.conv(x))).flatten(2).transpose(1, 2) * it["scale"]
        h_proj, n_proj = update_hessian(h_proj, n_proj, p.reshape(-1, 8))
        mean, mx, n_tok = update_channel_stats(mean, mx, n_tok, p)
    torch.testing.assert_close(st["conv"].hessian, h_conv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st["proj"].hessian, h_proj, rtol=1e-5, atol=1e-6)
    assert st["conv"].rows == n_conv == 3 * 2 * 16 and st["proj"].rows == n_proj
    torch.testing.assert_close(st["proj"].mean_abs, mean)
    torch.testing.assert_close(st["proj"].max_abs, mx)
    assert st["grouped"].hessian is None and st["grouped"].mean_abs.shape == (8,)
    assert st["conv"].samples is None
    # 3 calls x 32 rows thinned to every 8th row of the stream: 12 rows, spanning all calls
    rows = torch.cat([(m.grouped(torch.relu(m.conv(it["x"]))).flatten(2).transpose(1, 2)
                       * it["scale"]).reshape(-1, 8) for it in items]).detach()
    torch.testing.assert_close(st["proj"].samples, rows[::8])
    assert not m.proj._forward_pre_hooks  # hooks are removed after the pass


def test_collector_refuses_grouped_hessian_and_reports_unreached_layers():
    m = ConvLinear()
    with pytest.raises(ValueError, match="grouped conv"):
        InputCollector({"grouped": m.grouped}, hessian=["grouped"])
    collector = InputCollector({"proj": m.proj, "unused": nn.Linear(2, 2)}, hessian=["proj"])
    run_calibration(m, [torch.randn(1, 3, 8, 8)], collector, progress=False)
    with pytest.raises(CalibrationError, match="never reached layer 'unused'"):
        collector.stats()
    bad = InputCollector({"proj": m.proj})
    with pytest.raises(CalibrationError, match="non-finite"):
        run_calibration(m, [torch.full((1, 3, 8, 8), float("nan"))], bad, progress=False)
