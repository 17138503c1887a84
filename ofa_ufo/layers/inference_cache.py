"""Per-module caches of inference-only tensors, kept beside the modules rather than in them.

A cache held in a module's `__dict__` travels with the module: `copy.deepcopy` (an EMA copy, a teacher)
and pickling copy it, and they fail outright on oneDNN's packed tensors, which have no storage to copy.
Here each module's cache lives in a table keyed weakly by the module, so it is never saved, moved, cast,
copied or pickled with it, and it goes when the module goes.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

__all__ = ["cache_of"]

_CACHES: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def cache_of(module: nn.Module) -> dict[str, Any]:
    """The cache dict of `module`, created empty on first use; a copy of the module starts with its own."""
    cache = _CACHES.get(module)
    if cache is None:
        cache = _CACHES[module] = {}
    return cache
