"""Deprecated re-exports: names that moved out of :mod:`optishear_lightning.kernels`.

The engine's dispatch (which kernel or PyTorch path runs, NaN reporting, the methods' fused
recipes) moved to :mod:`optishear_lightning.dispatch`, and the model-level 2:4 export to
:mod:`optishear_lightning.export`, so that the kernels import nothing from the rest of the
package. Their old paths keep working for one release with a ``DeprecationWarning``.

This module is a shim: the import-graph test (``tests/test_architecture.py``) exempts it, and
it imports the engine only inside :func:`moved_attribute`, on first use of an old path, so
loading the kernels never loads the engine.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = [
    "MOVED_FROM_FUSED",
    "MOVED_FROM_PACKAGE",
    "MOVED_FROM_SEMI_STRUCTURED",
    "moved_attribute",
]

#: Old names of :mod:`optishear_lightning.kernels.fused`, now in ``optishear_lightning.dispatch``.
MOVED_FROM_FUSED = frozenset(
    {
        "deferred_nan_checks",
        "dispatch_keep_mask",
        "fused_keep_mask",
        "fused_score",
        "keep_mask",
        "reference_keep_mask",
        "triton_prune",
        "try_fused_prune_",
        "try_select_prune_",
    }
)
#: Old names of :mod:`optishear_lightning.kernels.semi_structured`, now in
#: ``optishear_lightning.export``.
MOVED_FROM_SEMI_STRUCTURED = frozenset({"SemiStructuredExport", "export_semi_structured"})
#: Old names of the :mod:`optishear_lightning.kernels` package.
MOVED_FROM_PACKAGE = MOVED_FROM_FUSED | MOVED_FROM_SEMI_STRUCTURED


def moved_attribute(module: str, name: str, moved: frozenset[str]) -> Any:
    """``name`` from its new home, with a ``DeprecationWarning`` (a module ``__getattr__``).

    Args:
        module: the old module's name (for the messages).
        name: the attribute asked for.
        moved: the names that moved out of ``module``.

    Raises:
        AttributeError: ``name`` never was in ``module``.
    """
    if name not in moved:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    # Imported here, not at the top: the kernels must load without the engine (no cycle).
    if name in MOVED_FROM_SEMI_STRUCTURED:
        from .. import export as home
    else:
        from .. import dispatch as home
    warnings.warn(
        f"{module}.{name} moved to {home.__name__}.{name}; the old path will be removed in the "
        "next release.",
        DeprecationWarning,
        stacklevel=3,  # the code that used the old name (past moved_attribute and __getattr__)
    )
    return getattr(home, name)
