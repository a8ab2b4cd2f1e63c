"""A quantized layer's `weight` is a stand-in: shape, dtype and device of the float weight for
libraries that size things by it (PEFT), weight init a no-op (transformers' _init_weights),
and any computation with it a one-line QuantizedWeightError (never a silent merge)."""
import pytest
import torch
from torch import nn

from diffq.core.recipe import WeightSpec
from diffq.errors import QuantizedWeightError
from diffq.nn import QConv2d, QLinear


@pytest.mark.parametrize("layer", [QLinear(nn.Linear(8, 6), WeightSpec(), None),
                                   QConv2d(nn.Conv2d(4, 6, 3), WeightSpec(), None)])
def test_weight_reads_its_geometry_and_refuses_arithmetic(layer):
    w = layer.weight
    assert isinstance(layer, (nn.Linear, nn.Conv2d)) and w.shape == layer.weight_shape
    assert w.dtype == torch.float32 and w.device == layer.qweight.device and w.dim() == len(w.shape)
    assert "weight" not in layer.state_dict() and not any(n == "weight" for n, _ in layer.named_parameters())
    before = layer.qweight.clone()
    with torch.no_grad():
        nn.init.normal_(w, std=0.02)
        w.data.normal_()
    assert torch.equal(layer.qweight, before)
    for merge in (lambda: w.data.add_(1.0), lambda: w.data.clone(), lambda: w + 1, lambda: w.float().sum()):
        with pytest.raises(QuantizedWeightError, match="fuse_lora"):
            merge()


def test_conv2d_built_like_nn_conv2d_is_a_float_conv():
    conv = QConv2d(4, 2, (3, 3), (1, 1), (1, 1), bias=False)  # how PEFT builds adapter convs
    assert type(conv) is nn.Conv2d and conv.weight.shape == (2, 4, 3, 3)
