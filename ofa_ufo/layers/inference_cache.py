"""Per-module caches of inference-only tensors, kept beside the modules rather than in them.

A cache held in a module's `__dict__` travels with the module: `copy.deepcopy` (an EMA copy, a teacher)
and pickling copy it, and they fail outright on oneDNN's packed tensors, which have no storage to copy.
Here each module's cache lives in a table keyed weakly by the module, so it is never saved, moved, cast,
copied or pickled with it, and it goes when the module goes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["cache_of", "kept"]

_CACHES: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def cache_of(module: nn.Module) -> dict[str, Any]:
    """The cache dict of `module`, created empty on first use; a copy of the module starts with its own."""
    cache = _CACHES.get(module)
    if cache is None:
        cache = _CACHES[module] = {}
    return cache


def kept(module: nn.Module, name: str, sources: Sequence[torch.Tensor], build: Callable[[], Any],
         extra: Hashable = None) -> Any:
    """`build()`, kept in `module`'s cache under `name` while `sources` are the same tensors at the same versions
    (and `extra` is equal). Fused optimizers and BatchNorm's running statistics update tensors in place without
    a version bump, so callers also drop the entry (`cache_of(module).pop(name)`) at every forward that could
    precede such an update. The sources are held, so that no other tensor can reuse their addresses."""
    key = (tuple((t.data_ptr(), t._version) for t in sources), extra)
    cache = cache_of(module)
    entry = cache.get(name)
    if entry is None or entry[0] != key:
        entry = cache[name] = (key, tuple(t.detach() for t in sources), build())
    return entry[2]
