"""optishear-lightning: adaptive post-training pruning of LLMs (OptiShear) for Lightning."""

__version__ = "0.1.0.dev0"

from .models import load_model, load_tokenizer
from .pruning import PruneResult, prune, save_pruned_model

__all__ = [
    "PruneResult",
    "__version__",
    "load_model",
    "load_tokenizer",
    "prune",
    "save_pruned_model",
]
