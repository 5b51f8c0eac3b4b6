"""optishear-lightning: adaptive post-training pruning of LLMs (OptiShear) for Lightning."""

from __future__ import annotations

from typing import Any

from ._version import __version__
from .models import load_model, load_tokenizer
from .pruning import PruneResult, prune, save_pruned_model
from .sparse_masks import SparseMasks

__all__ = [
    "CausalLMModule",
    "OptiShearCallback",
    "PruneResult",
    "SparseMasks",
    "TextDataModule",
    "__version__",
    "load_model",
    "load_tokenizer",
    "prune",
    "save_pruned_model",
]

# The Lightning glue is imported on first use, so the framework-free engine stays importable
# without paying for `import lightning`.
_LAZY = {
    "OptiShearCallback": ".callback",
    "CausalLMModule": ".module",
    "TextDataModule": ".datamodule",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
