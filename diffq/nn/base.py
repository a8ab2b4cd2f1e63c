"""Shared storage and bookkeeping of quantized layers."""
from __future__ import annotations

import torch
from torch import nn

from diffq import ops
from diffq.core.config import to_dict
from diffq.core.recipe import ActivationSpec, WeightSpec
from diffq.core.weights import QuantizedWeight, is_released, quantize_weight, released_codes
from diffq.errors import QuantizedWeightError
from diffq.nn.activation import ActivationQuantizer
from diffq.ops import library, onednn
from diffq.ops.kernels import Kernels

# Buffers whose dtype is the storage format itself: model.to(dtype) must move, never cast them
# (input_scale stays float32: it must match the factor the stored weight was multiplied by).
_STORAGE = ("qweight", "weight_scale", "weight_zero_point", "input_scale")


class FloatWeightStandIn(torch.Tensor):
    """The shape, dtype and device of a quantized layer's float weight, with no values: weight
    init does nothing to it, and any other operation but reading those (merging a LoRA adapter
    into the layer, `fuse_lora`, or reading the weight's numbers) raises QuantizedWeightError
    in one line."""

    _layer = ""
    _READS = frozenset({torch.Tensor.dim, torch.Tensor.size, torch.Tensor.shape.__get__,
                        torch.Tensor.dtype.__get__, torch.Tensor.device.__get__, torch.Tensor.ndim.__get__,
                        torch.Tensor.numel, torch.Tensor.is_floating_point, torch.Tensor.__repr__})

    @staticmethod
    def of(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, layer: str) -> torch.Tensor:
        t = torch.zeros((), dtype=dtype, device=device).expand(shape)  # no storage of that size
        t = torch.Tensor._make_subclass(FloatWeightStandIn, t)
        t._layer = layer
        return t

    # weight init of a loaded model (transformers' _init_weights draws into every Linear's
    # weight before the checkpoint's tensors arrive) has nothing to initialize here
    # (matched by name: transformers swaps torch.nn.init's functions for its own while it inits)
    _INITS = frozenset({"normal_", "uniform_", "zero_", "zeros_", "ones_", "fill_", "constant_",
                        "trunc_normal_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
                        "kaiming_normal_", "orthogonal_"})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func == torch.Tensor.data.__get__ or getattr(func, "__name__", None) in cls._INITS:
            return args[0] if args else (kwargs or {}).get("tensor")
        if func in cls._READS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        layer = next((a._layer for a in args if isinstance(a, cls)), "quantized")
        raise QuantizedWeightError(
            f"a diffq {layer} layer stores its weight quantized: it has no float weight values to "
            "compute with, so merging a LoRA adapter into it (fuse_lora) is not supported; keep "
            "the adapter unfused (the default), or load it on the float model before quantizing")


class QuantizedLayer(nn.Module):
    """Holds a `QuantizedWeight` as buffers (qweight, weight_scale[, weight_zero_point]),
    a float bias, and an optional `input_quant` (ActivationQuantizer).

    Once oneDNN holds a W8A8 layer's int8 codes packed (after its first CPU call), the plain
    codes would only double its run-time weight bytes: the first call that ran on the packs
    drops them, after checking that the packs give every code back, and they are rebuilt from
    the packs whenever anything else needs them (a call on another path, `state_dict`, moving
    or copying the layer, `quantized_weight`). Subclasses call `_kernel_weight(x)` and
    `_after_call(x)` around their kernels."""

    feature_axis = -1
    _released_for = None
    _release_armed = True
    # transformers' weight init skips modules marked initialized; a quantized layer's tensors
    # come from quantization or its checkpoint, never from init (its float weight is a stand-in)
    _is_hf_initialized = True

    def _init_quantized(
        self,
        spec: WeightSpec,
        qw: QuantizedWeight,
        bias: torch.Tensor | None,
        act: ActivationSpec | None,
        segments: list[int],
        input_scale: torch.Tensor | None = None,
    ) -> None:
        self.weight_spec = spec  # the recipe's words, kept for describe(); storage is qw.layout
        self.weight_layout = qw.layout
        self.weight_shape = qw.shape
        self.backend = "auto"  # "reference" forces the dequantize-and-float path
        self.kernel_cache = Kernels()  # prepacked weights of fast backends; rebuilt on demand
        self.register_buffer("qweight", qw.data)
        self.register_buffer("weight_scale", qw.scale)
        if qw.zero_point is not None:
            self.register_buffer("weight_zero_point", qw.zero_point)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.input_quant = (
            None if act is None else ActivationQuantizer(act, self.feature_axis, segments)
        )
        if input_scale is not None:  # AWQ / SmoothQuant: x * input_scale before quantizing x
            self.register_buffer("input_scale", input_scale.detach().float().clone())
        self._compute_layout = qw.layout.storage.compute_layout(qw.layout)
        self._released_for = None  # the kind of call (`_call_key`) the codes were released for
        self._release_armed = True  # the next eligible call may release them (False: stay held)
        self._refresh_compute_codes()

    def storage_changed(self) -> None:
        """Called after the stored tensors were replaced or written to (loading): drops the
        prepacked weights and remakes the compute codes."""
        self.restore_codes()
        self.kernel_cache.clear()
        self._refresh_compute_codes()
        self._release_armed = True

    # --- plain codes released once packed (see the class docstring) ---

    def _codes_name(self) -> str:
        """The buffer the kernels pack: the stored codes, or the compute codes beside them."""
        return "qweight" if self._compute_layout is None else "qweight_compute"

    def _call_key(self, x: torch.Tensor) -> tuple:
        """What decides the path a call takes: calls alike run on the same packs."""
        spec = None if self.input_quant is None else self.input_quant.spec
        return x.device.type, x.dtype, self.backend, spec

    def _releasable(self, x: torch.Tensor) -> bool:
        return (self.input_quant is not None and self.backend == "auto" and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.bfloat16))

    def _kernel_weight(self, x: torch.Tensor) -> QuantizedWeight:
        """`compute_weight` for a call on x: released codes stay released for calls of the kind
        they were released for (which read only the packs) and come back for any other."""
        if (not torch.compiler.is_compiling() and self._released_for is not None  # no guard on it
                and self._released_for != self._call_key(x)):
            self.restore_codes(rearm=False)  # calls of two kinds: hold the codes from now on
        return self._compute_weight()

    def _after_call(self, x: torch.Tensor) -> None:
        """After the first eligible call: drop the plain codes if the packs hold all of them."""
        if torch.compiler.is_compiling() or not self._release_armed or not self._releasable(x):
            return
        self._release_armed = False
        name = self._codes_name()
        codes = self._buffers[name]
        if codes.numel() < 2:  # a stand-in of one element would not be told apart from codes
            return
        packed = self._packed_codes(codes)
        if packed is None or not torch.equal(packed, codes):
            return
        stand_in = released_codes(tuple(codes.shape))
        self.kernel_cache.rekey(codes.data_ptr(), stand_in.data_ptr())
        self._buffers[name] = stand_in
        self._released_for = self._call_key(x)

    def _packed_codes(self, codes: torch.Tensor) -> torch.Tensor | None:
        """The codes the packs of `codes` (or of their stand-in) hold, in their shape."""
        packed = library.packed_codes(codes.reshape(self.weight_shape), getattr(self, "groups", 1),
                                      self.kernel_cache)
        return None if packed is None else packed.reshape(codes.shape)

    def restore_codes(self, rearm: bool = True) -> None:
        """Put back plain codes a call released, rebuilt from the packs (exact: checked when
        they were released); the next eligible call releases them again if `rearm`."""
        if self._released_for is None:
            return
        self._released_for = None
        self._release_armed = rearm
        name = self._codes_name()
        stand_in = self._buffers[name]
        if not is_released(stand_in):  # replaced since (loading, new compute codes)
            return
        with torch.inference_mode(False):  # a tensor loading may later write to
            codes = self._packed_codes(stand_in)
        if codes is None:
            raise RuntimeError(f"{type(self).__name__}: released codes and no pack to rebuild them from")
        self.kernel_cache.rekey(stand_in.data_ptr(), codes.data_ptr())
        self._buffers[name] = codes

    def _refresh_compute_codes(self) -> None:
        """Formats stored apart from the codes their kernels multiply (int4_i8: nibbles and
        group multipliers, multiplied as int8 per channel) keep those codes beside the storage,
        made once, not in every call, and never saved."""
        if self._compute_layout is not None:
            self.register_buffer("qweight_compute", self.quantized_weight.codes(), persistent=False)
            self._compute_of = self._storage_key()

    def _storage_key(self) -> tuple:
        return (self.qweight.data_ptr(), self.qweight._version, self.qweight.device)

    @property
    def weight(self) -> torch.Tensor:
        """What libraries that wrap Linear / Conv2d layers read of the float weight (its shape,
        dtype and device: PEFT's LoRA sizes and places its adapter by it), holding nothing;
        computing with it raises `QuantizedWeightError` (see `FloatWeightStandIn`)."""
        dtype = torch.float32 if self.bias is None else self.bias.dtype
        return FloatWeightStandIn.of(tuple(self.weight_shape), dtype, self.qweight.device,
                                     type(self).__name__)

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """x times the per-input-channel `input_scale` (when the layer has one), in float32 so
        that half-precision inputs see the same factor the weight was multiplied by."""
        s = getattr(self, "input_scale", None)
        return x if s is None else ops.scale_input(x, s, self.feature_axis)

    @staticmethod
    def _quantize_or_shape(weight: torch.Tensor, spec: WeightSpec, empty: bool,
                           prepared: QuantizedWeight | None = None) -> QuantizedWeight:
        if prepared is not None:  # chosen by a calibration-driven method (GPTQ, AWQ)
            if prepared.shape != tuple(weight.shape):
                raise ValueError(f"prepared weight shape {prepared.shape} != layer {tuple(weight.shape)}")
            return prepared
        if empty:  # storage of the right shapes, filled by loading a state dict
            return QuantizedWeight.empty(spec.layout(), tuple(weight.shape))
        return quantize_weight(weight, spec)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        if self._compute_layout is None:
            self.restore_codes()
        return self._stored_weight()

    def _stored_weight(self) -> QuantizedWeight:
        return QuantizedWeight(
            self.qweight, self.weight_scale, getattr(self, "weight_zero_point", None),
            self.weight_layout, self.weight_shape,
        )

    @property
    def compute_weight(self) -> QuantizedWeight:
        """The weight as the kernels take it: the stored one, or its compute codes' view."""
        self.restore_codes()
        return self._compute_weight()

    def _compute_weight(self) -> QuantizedWeight:
        if self._compute_layout is None:
            return self._stored_weight()
        if not torch.compiler.is_compiling() and self._compute_of != self._storage_key():
            self.storage_changed()  # stored tensors assigned by code that did not say so
        return QuantizedWeight(self.qweight_compute, self.weight_scale, None, self._compute_layout,
                               self.weight_shape)

    def act_params(self):
        return None if self.input_quant is None else self.input_quant.params()

    @property
    def weight_nbytes(self) -> int:
        return self._stored_weight().nbytes  # a stand-in for released codes counts their bytes

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._compute_layout is None and is_released(self.qweight):  # the codes, not their stand-in
            with torch.inference_mode(False):
                destination[prefix + "qweight"] = self._packed_codes(self.qweight)

    def _load_from_state_dict(self, *args, **kwargs):
        self.restore_codes()  # loading writes into the codes' tensor
        out = super()._load_from_state_dict(*args, **kwargs)
        self.storage_changed()
        return out

    def __getstate__(self):
        self.restore_codes()  # copies (deepcopy, pickling) hold the codes; their packs are rebuilt
        return super().__getstate__()

    def _apply(self, fn, recurse=True):
        self.restore_codes()
        self.kernel_cache.clear()
        kept = {n: getattr(self, n) for n in _STORAGE if getattr(self, n, None) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        if self._compute_layout is not None:  # the compute codes moved with the storage
            self._compute_of = self._storage_key()
        return self

    def describe(self) -> dict:
        """JSON-able scheme of this layer, enough to rebuild it empty for loading."""
        q = self.input_quant
        return {
            "weights": to_dict(self.weight_spec),
            "activations": None if q is None else to_dict(q.spec),
            "segments": None if q is None else q.segments,
            "input_scale": hasattr(self, "input_scale"),
        }


def split_layers(model: nn.Module, kernels: dict[str, str]) -> list[str]:
    """Layers of `kernels` (`layer_kernels`) whose oneDNN int8 kernel runs their weight split
    in two halves on this CPU (no VNNI: `diffq.ops.onednn.needs_split`)."""
    return [n for n, k in kernels.items() if k.startswith("oneDNN int8")
            and onednn.needs_split(model.get_submodule(n).compute_weight.data)]


def layer_kernels(model: nn.Module) -> dict[str, str]:
    """Layer name -> the compute its calls take on CPU (see `diffq.ops.kernel_of`)."""
    return {n: ops.kernel_of(m.weight_layout, None if m.input_quant is None else m.input_quant.spec,
                             conv=m.feature_axis == 1,
                             pointwise=m.feature_axis == 1 and ops.pointwise(
                                 m.weight_shape, m.stride, m.padding, m.dilation, m.groups))
            for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}
