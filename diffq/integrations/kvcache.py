"""An int8 key/value cache for transformers' causal LMs (`Cache` API of transformers >= 5):
pass `Int8KVCache()` as `cache` to `model(...)` or `model.generate(...)`. Each layer keeps
int8 codes and per-(batch, head, token) scales (`diffq.nn.kvcache`) and hands attention the
dequantized keys and values: half the bytes of a bf16 cache (plus 4 / head_dim for scales)."""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from diffq.core.recipe import KVCacheSpec
from diffq.nn.kvcache import Int8KV, cat_kv, dequantize_kv, quantize_kv


class Int8KVLayer(DynamicLayer):
    """One attention layer's cache. `keys` / `values` stay empty placeholders (transformers
    reads their dtype / device); the states live in `qkeys` / `qvalues`."""

    def __init__(self, scale_dtype: str = "float32", **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale_dtype = scale_dtype
        self.qkeys: Int8KV | None = None
        self.qvalues: Int8KV | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.qkeys = cat_kv(self.qkeys, quantize_kv(key_states, self.scale_dtype))
        self.qvalues = cat_kv(self.qvalues, quantize_kv(value_states, self.scale_dtype))
        # attention sees exactly what is stored, prefill included; the incoming dtype, since
        # transformers >= 5.2x no longer keeps a layer `dtype`
        dtype = key_states.dtype
        return dequantize_kv(self.qkeys, dtype), dequantize_kv(self.qvalues, dtype)

    def get_seq_length(self) -> int:
        return 0 if self.qkeys is None else self.qkeys.codes.shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(q.nbytes for q in (self.qkeys, self.qvalues) if q is not None)

    def reset(self) -> None:
        super().reset()
        self.qkeys = self.qvalues = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove == 0 or self.qkeys is None:
            return
        keep = slice(None, tokens_to_remove)
        self.qkeys = Int8KV(self.qkeys.codes[..., keep, :], self.qkeys.scale[..., keep, :])
        self.qvalues = Int8KV(self.qvalues.codes[..., keep, :], self.qvalues.scale[..., keep, :])

    def _select(self, fn) -> None:
        if self.qkeys is not None:
            self.qkeys = Int8KV(fn(self.qkeys.codes), fn(self.qkeys.scale))
            self.qvalues = Int8KV(fn(self.qvalues.codes), fn(self.qvalues.scale))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._select(lambda t: t.to("cpu"))

    def prefetch(self) -> None:
        self._select(lambda t: t.to(self.device))


class Int8KVCache(Cache):
    """A `Cache` whose layers are `Int8KVLayer`s, created as the model first uses them."""

    def __init__(self, spec: KVCacheSpec | None = None) -> None:
        spec = spec or KVCacheSpec()
        scale_dtype = spec.scale_dtype

        class _Layer(Int8KVLayer):
            def __init__(self, **kwargs) -> None:
                super().__init__(scale_dtype, **kwargs)

        super().__init__(layer_class_to_replicate=_Layer)

    @property
    def nbytes(self) -> int:
        """Bytes of stored codes and scales, all layers."""
        return sum(layer.nbytes for layer in self.layers)
