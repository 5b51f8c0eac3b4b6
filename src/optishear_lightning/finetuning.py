"""Deprecated: :class:`SparseMasks` moved to :mod:`optishear_lightning.sparse_masks`.

It is framework-free, so it lives in the engine now. The old names resolve here for one more
release, each use with a ``DeprecationWarning``; import them from
``optishear_lightning.sparse_masks`` (or ``SparseMasks`` from the package root) instead.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__: list[str] = []  # nothing new is defined here; see optishear_lightning.sparse_masks

_MOVED = frozenset({"SparseMasks", "pack_bits", "unpack_bits"})


def __getattr__(name: str) -> Any:
    # Warn on use rather than on import: the warning then points at the code that uses the
    # old path, every time, not only the first importer of the process.
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"optishear_lightning.finetuning.{name} moved to optishear_lightning.sparse_masks."
        f"{name}; the old path will be removed in the next release.",
        DeprecationWarning,
        stacklevel=2,
    )
    from . import sparse_masks

    return getattr(sparse_masks, name)
