"""The one way diffq hooks a model: forward pre-hooks on named modules for the length of a
`with` block, removed on the way out whatever happens."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn


@contextlib.contextmanager
def input_hooks(modules: dict[str, nn.Module], make: Callable[[str, nn.Module], Callable],
                with_kwargs: bool = False) -> Iterator[None]:
    """`make(name, module)` returns the pre-hook for each module: `hook(module, args)`, or
    `hook(module, args, kwargs)` with `with_kwargs`."""
    handles = []
    try:
        for name, m in modules.items():
            handles.append(m.register_forward_pre_hook(make(name, m), with_kwargs=with_kwargs))
        yield
    finally:
        for h in handles:
            h.remove()
