"""A quantized layer's prepacked weights, made by the op implementations on first use.

oneDNN's packed weights are MKLDNN tensors, which torch.compile cannot fake; passed to the
custom ops as tensors they broke the graph at every quantized layer. `Kernels` goes to the ops
as an opaque reference object instead: the compiled graph carries it through untouched and the
op implementation, running on real tensors, packs into it or reads from it.

Copies of a store are empty (`copy.deepcopy`, pickling): oneDNN's packs cannot be copied (their
tensors have no storage to copy), and every entry is rebuilt on demand from the weight.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch._library.opaque_object import register_opaque_type
from torch._opaque_base import OpaqueBase


class Kernels(OpaqueBase):
    """Prepacked forms of one layer's weight (oneDNN packs, a transposed or NHWC copy), keyed
    by what they were made from (the weight's storage address, channel segments)."""

    def __init__(self) -> None:
        self._store: dict[tuple, Any] = {}

    def __deepcopy__(self, memo) -> Kernels:
        return Kernels()

    def __getstate__(self) -> dict:
        return {"_store": {}}

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        if key not in self._store:
            self._store[key] = make()
        return self._store[key]

    def peek(self, key: tuple) -> Any:
        """The entry under `key`, or None (nothing is made)."""
        return self._store.get(key)

    def rekey(self, old: int, new: int) -> None:
        """Entries keyed by the weight address `old` now keyed by `new` (the weight's codes moved)."""
        self._store = {tuple(new if k == old else k for k in key): v for key, v in self._store.items()}

    def clear(self) -> None:
        self._store.clear()

    def __contains__(self, key: tuple) -> bool:
        return key in self._store

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)


register_opaque_type(Kernels, typ="reference")
