"""A quantized layer's prepacked weights, made by the op implementations on first use.

oneDNN's packed weights are MKLDNN tensors, which torch.compile cannot fake; passed to the
custom ops as tensors they broke the graph at every quantized layer. `Kernels` goes to the ops
as an opaque reference object instead: the compiled graph carries it through untouched and the
op implementation, running on real tensors, packs into it or reads from it.
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

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        if key not in self._store:
            self._store[key] = make()
        return self._store[key]

    def clear(self) -> None:
        self._store.clear()

    def __contains__(self, key: tuple) -> bool:
        return key in self._store

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)


register_opaque_type(Kernels, typ="reference")
