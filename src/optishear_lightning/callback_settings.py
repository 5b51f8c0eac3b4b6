"""The callback's settings and checkpoint state, checked once, where they enter.

:class:`~optishear_lightning.callback.OptiShearCallback` calls these in ``__init__`` (every
argument, before a Trainer exists) and when it restores a checkpoint (the saved config and
masks). Each raises ``ValueError`` with a message that says what to change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from .masks import validate_sparsity
from .metrics import METHODS, PruningMethod
from .models import named_prunable_linears
from .reconstruction import check_reconstruction
from .search.config import SearchConfig
from .sparse_masks import SparseMasks

__all__ = [
    "check_calibration",
    "check_globs",
    "check_hub",
    "check_method",
    "check_resumed_masks",
    "check_schedule",
    "check_search",
    "check_sparsity",
    "checked_config",
    "same_sparsity",
]


def checked_config(config: Any) -> dict[str, Any]:
    """The checkpoint's callback config, or a clear error naming what is wrong with it."""
    fix = "resume from another checkpoint, or start a new run (without ckpt_path)"
    if not isinstance(config, dict) or not {"method", "sparsity", "pattern"} <= set(config):
        raise ValueError(f"The checkpoint's OptiShearCallback state has no valid config; {fix}.")
    try:
        value = config["sparsity"]
        is_list = isinstance(value, (list, tuple))
        sparsity = [float(v) for v in value] if is_list else float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"The checkpoint's OptiShearCallback config has sparsity {config['sparsity']!r}, "
            f"not a number; {fix}."
        ) from None
    return dict(config) | {"sparsity": sparsity}


def check_resumed_masks(
    masks: SparseMasks,
    model: nn.Module,
    prefix: str,
    state: dict[str, Any],
    select: Callable[[str], bool] | None = None,
) -> None:
    """Refuse masks that do not match what was saved: a missing layer (of those ``select``
    picks), flipped bits, or weights that are not zero where a mask prunes (while masks were
    being kept)."""
    expected = {
        f"{prefix}{name}.weight"
        for name in named_prunable_linears(model)
        if select is None or select(name)
    }
    missing = sorted(expected - set(masks.names))
    fix = "the checkpoint is corrupted; resume from another one or start a new run"
    if missing:
        raise ValueError(
            f"The checkpoint has no mask for {missing[:3]}{' ...' if len(missing) > 3 else ''}; "
            f"that layer would train dense while the run reports it pruned: {fix}."
        )
    saved = state.get("layer_sparsity")
    if isinstance(saved, dict):
        for name, value in masks.layer_sparsity().items():
            if name in saved and abs(value - float(saved[name])) > 1e-6:
                raise ValueError(
                    f"The mask of {name} prunes {value:.4f} of its weights, the checkpoint "
                    f"recorded {float(saved[name]):.4f}: {fix}."
                )
    if state.get("keep_masks", True):
        violations = masks.violations()
        if violations:
            raise ValueError(
                f"{violations} weights that the checkpoint's masks prune are not zero: the "
                f"masks do not belong to these weights; {fix}."
            )


def check_method(method: Any) -> str | PruningMethod:
    """A method name (lower case) or a ``PruningMethod`` object, or a clear error."""
    if isinstance(method, PruningMethod):
        return method
    if not isinstance(method, str):
        raise ValueError(
            f"method must be a name ('optishear', {sorted(METHODS)}) or a PruningMethod such "
            f"as a MetaMetric, not {type(method).__name__}."
        )
    method = method.lower()
    if method != "optishear" and method not in METHODS:
        raise ValueError(
            f"Unknown pruning method {method!r}; choose 'optishear' or one of "
            f"{sorted(METHODS)}, or pass a PruningMethod (a MetaMetric)."
        )
    return method


def check_sparsity(
    sparsity: Any, pat: Any, method: str | PruningMethod, search_result: str | None
) -> float | list[float]:
    """One ratio, or one per block (a ``{block: ratio}`` mapping becomes a list)."""
    per_block = isinstance(sparsity, (list, tuple, Mapping))
    if pat.is_nm:
        if per_block or (sparsity is not None and abs(float(sparsity) - pat.sparsity) > 1e-9):
            raise ValueError(
                f"The {pat} pattern fixes sparsity at {pat.sparsity:g}; set sparsity to "
                "null/None (or to that value)."
            )
        return pat.sparsity
    if sparsity is None:
        raise ValueError("Unstructured pruning needs a sparsity, e.g. sparsity: 0.5.")
    if not per_block:
        return validate_sparsity(sparsity, "sparsity")
    if method == "optishear" or search_result is not None:
        raise ValueError(
            "Per-block sparsities are for engine methods; the OptiShear search (and a saved "
            "search) chooses the per-block ratios itself: give one target, e.g. sparsity: 0.5."
        )
    if isinstance(sparsity, Mapping):
        keys = sorted(_block_key(k) for k in sparsity)
        if keys != list(range(len(keys))):
            raise ValueError(
                f"A {{block: ratio}} sparsity must name blocks 0, 1, 2... without gaps (every "
                f"block of the model); got blocks {keys}."
            )
        sparsity = [sparsity[k] for k in sorted(sparsity, key=_block_key)]
    if not sparsity:
        raise ValueError("sparsity is an empty list; give one ratio per decoder block.")
    return [validate_sparsity(v, f"sparsity of block {i}") for i, v in enumerate(sparsity)]


def _block_key(key: Any) -> int:
    text = str(key).strip()
    if isinstance(key, bool) or not text.isdigit():
        raise ValueError(f"Per-block sparsity keys are block indices 0, 1, ...; got {key!r}.")
    return int(text)


def check_search(
    search: SearchConfig | Mapping | None, reconstruct: Any, permute: bool, pat: Any
) -> SearchConfig:
    """The search settings with the callback's ``reconstruct`` and ``permute`` (set once)."""
    search = search if search is not None else SearchConfig()
    if isinstance(search, Mapping):  # a mapping from Python or an older YAML loader
        search = SearchConfig(**search)
    reconstruct = check_reconstruction(reconstruct)
    if search.reconstruct is not None and search.reconstruct != reconstruct:
        raise ValueError(
            f"reconstruct is set on the search ({search.reconstruct!r}) and on the callback "
            f"({reconstruct!r}); set it once, as the callback's reconstruct."
        )
    if permute and not pat.is_nm:
        raise ValueError(
            "permute arranges input channels for N:M groups; with an unstructured pattern "
            "it has nothing to do: set pattern to '2:4' (or another N:M) or permute to false."
        )
    if search.permute and not permute:
        raise ValueError("permute is set on the search; set it once, as the callback's permute.")
    return search.replace(reconstruct=reconstruct, permute=bool(permute))


def check_globs(name: str, globs: Any) -> list[str] | None:
    if globs is None:
        return None
    if isinstance(globs, str):
        globs = [globs]
    globs = list(globs)
    if not globs or not all(isinstance(g, str) and g.strip() for g in globs):
        raise ValueError(
            f"{name} must be a list of module-name patterns such as ['*.mlp.*'], got {globs!r}."
        )
    return globs


def check_schedule(prune_on: str, prune_at: Any, verbose: Any) -> None:
    if prune_on not in ("fit_start", "epoch", "step"):
        raise ValueError(f"prune_on must be 'fit_start', 'epoch' or 'step', got {prune_on!r}.")
    if isinstance(prune_at, bool) or not isinstance(prune_at, int) or prune_at < 0:
        raise ValueError(f"prune_at must be an integer >= 0, got {prune_at!r}.")
    if prune_on == "fit_start" and prune_at:
        raise ValueError(
            f"prune_at={prune_at} needs prune_on='epoch' or 'step' (fit_start prunes before "
            "the first step)."
        )
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}.")


def check_calibration(samples: int | None, seq_len: int, batch_size: int) -> None:
    for name, value, low in (
        ("calibration_seq_len", seq_len, 2),
        ("calibration_batch_size", batch_size, 1),
    ):
        if int(value) < low:
            raise ValueError(f"{name} must be >= {low}, got {value}.")
    if samples is not None and samples < 1:
        raise ValueError("calibration_samples must be None (all) or >= 1.")


def check_hub(repo_id: str | None, export_dir: str | None) -> None:
    if repo_id is None:
        return
    if export_dir is None:
        raise ValueError(
            "push_to_hub uploads the export: set export_dir too (the folder to write and upload)."
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(
            f"push_to_hub={repo_id!r} is not a Hub repo id (user/name): {err}"
        ) from None
    if "/" not in repo_id:
        raise ValueError(f"push_to_hub={repo_id!r}: give the repo id as 'user/name'.")


def same_sparsity(a: float | Sequence[float], b: float | Sequence[float]) -> bool:
    """Whether two sparsity settings ask for the same ratios (a scalar matches a list of it)."""
    a_list = list(a) if isinstance(a, (list, tuple)) else None
    b_list = list(b) if isinstance(b, (list, tuple)) else None
    if a_list is None and b_list is None:
        return math.isclose(float(a), float(b), abs_tol=1e-9)
    a_list = a_list if a_list is not None else [float(a)] * len(b_list)
    b_list = b_list if b_list is not None else [float(b)] * len(a_list)
    return len(a_list) == len(b_list) and all(
        math.isclose(float(x), float(y), abs_tol=1e-9) for x, y in zip(a_list, b_list, strict=True)
    )
