"""Pruning methods: a score per weight (plus, for SparseGPT, a weight update).

A *score metric* is a pure function ``score(weight, stats) -> scores`` (higher = keep); adding
one is a single decorated function::

    @register_metric("my_metric")
    def my_metric(weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        return weight.abs() * stats.act_sq_mean.sqrt()

The mask is then chosen by :func:`~optishear_lightning.masks.keep_mask_from_scores`. Methods
that change the surviving weights (SparseGPT) implement :class:`PruningMethod` directly.

A metric that the fused Triton kernel can compute says how with a
:class:`~optishear_lightning.dispatch.FusedRecipe` (``register_metric(..., fused=recipe)``, or
``fused_recipe()`` on a :class:`PruningMethod`); the recipe's functions are the metric's own
PyTorch code, so the kernel's masks are the reference's. Nothing else changes to fuse a metric.

Activation statistics use ``x_j``, the mean squared input activation of input channel ``j``
(:attr:`LayerStats.act_sq_mean`). Wanda's ``||X_j||_2`` and RIA's ``||X_j||_2 ** 0.5`` differ
from ``sqrt(x_j)`` and ``x_j ** 0.25`` by a factor that is constant over the layer, which no
comparison group can see, so the masks are identical.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .calibration import LayerStats
from .dispatch import FusedRecipe, try_fused_prune_, try_select_prune_
from .masks import SparsityPattern, apply_keep_mask, keep_mask_from_scores
from .sparsegpt import sparsegpt_prune

__all__ = [
    "METHODS",
    "RIA_EXPONENT",
    "PruningMethod",
    "ScoreMethod",
    "SparseGPTMethod",
    "get_method",
    "magnitude_score",
    "prune_by_scores_",
    "register_metric",
    "ria_score",
    "wanda_score",
]

ScoreFn = Callable[[torch.Tensor, "LayerStats | None"], torch.Tensor]


class PruningMethod:
    """Interface of a pruning method.

    Attributes:
        name: registry name.
        needs_activations: whether calibration forward passes are needed at all.
        needs_gram: whether the input Gram matrix ``X^T X`` must be collected.
    """

    name: str = ""
    needs_activations: bool = True
    needs_gram: bool = False

    @property
    def formula(self) -> str | None:
        """The score as a formula, for reports and model cards (``None``: the name says it)."""
        return None

    def prune_(
        self,
        weight: torch.Tensor,
        stats: LayerStats | None,
        sparsity: float | None,
        pattern: SparsityPattern,
        group: str = "row",
    ) -> torch.Tensor:
        """Prune ``weight`` in place and return its keep mask."""
        raise NotImplementedError

    def fused_recipe(self) -> FusedRecipe | None:
        """What the fused Triton kernel needs to score like this method (``None``: it cannot).

        See :class:`~optishear_lightning.dispatch.FusedRecipe`.
        """
        return None

    def channel_scores(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        """Importance of each weight, used to arrange input channels before N:M selection
        (:mod:`.permutation`). Methods without a score of their own use Wanda's."""
        return wanda_score(weight.detach().float(), stats)


class ScoreMethod(PruningMethod):
    """A method that only scores weights; the mask layout does the rest.

    Args:
        name: registry name.
        score: the score function, ``score(weight, stats) -> scores``.
        needs_activations: whether calibration forward passes are needed at all.
        fused: how the fused kernel computes ``score`` (``None``: PyTorch scores, then the
            select-only kernel).
    """

    def __init__(
        self,
        name: str,
        score: ScoreFn,
        needs_activations: bool = True,
        fused: FusedRecipe | None = None,
    ):
        self.name = name
        self.score = score
        self.needs_activations = needs_activations
        self._fused = fused

    def __repr__(self) -> str:
        return f"ScoreMethod({self.name!r})"

    def fused_recipe(self) -> FusedRecipe | None:
        """The recipe given at registration (see :func:`register_metric`)."""
        return self._fused

    def channel_scores(self, weight, stats):
        return self.score(weight.detach().float(), stats)

    def prune_(self, weight, stats, sparsity, pattern, group="row"):
        # On CUDA the fused Triton kernel scores, selects and masks in one pass (same masks).
        keep = try_fused_prune_(weight, self, stats, sparsity, pattern, group)
        if keep is not None:
            return keep
        scores = self.score(weight.detach().float(), stats)
        return prune_by_scores_(weight, scores, sparsity, pattern, group)


def prune_by_scores_(
    weight: torch.Tensor,
    scores: torch.Tensor,
    sparsity: float | None,
    pattern: SparsityPattern,
    group: str = "row",
) -> torch.Tensor:
    """Zero the lowest-scoring weights of each comparison group in place; return the keep mask.

    On CUDA (see :mod:`optishear_lightning.kernels.backend`) one Triton kernel selects and
    masks; otherwise, and for what the kernels do not cover, PyTorch does.
    """
    keep = try_select_prune_(weight, scores, sparsity, pattern, group)
    if keep is None:
        keep = keep_mask_from_scores(scores, sparsity, pattern, group)
        apply_keep_mask(weight.data, keep)
    return keep


class SparseGPTMethod(PruningMethod):
    """SparseGPT with 128-column blocks and 1% dampening (see :mod:`.sparsegpt`)."""

    name = "sparsegpt"
    needs_gram = True

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01):
        self.blocksize = blocksize
        self.percdamp = percdamp

    def prune_(self, weight, stats, sparsity, pattern, group="row"):
        if stats is None or stats.gram is None:
            raise ValueError("SparseGPT needs the calibration Gram matrix of every layer.")
        new_weight, keep = sparsegpt_prune(
            weight.data, stats.gram, sparsity, pattern, group, self.blocksize, self.percdamp
        )
        weight.data.copy_(new_weight)
        return keep


METHODS: dict[str, PruningMethod] = {}


def register_metric(
    name: str, needs_activations: bool = True, fused: FusedRecipe | None = None
) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator that registers a score function as a pruning method called ``name``.

    Args:
        name: registry name.
        needs_activations: whether the metric reads calibration statistics.
        fused: how the fused Triton kernel computes the same scores, if it can.
    """

    def wrap(fn: ScoreFn) -> ScoreFn:
        METHODS[name] = ScoreMethod(name, fn, needs_activations, fused)
        return fn

    return wrap


def get_method(name: str | PruningMethod) -> PruningMethod:
    """Look up a pruning method by name (case-insensitive)."""
    if isinstance(name, PruningMethod):
        return name
    key = str(name).lower()
    if key not in METHODS:
        raise ValueError(f"Unknown pruning method {name!r}; choose one of {sorted(METHODS)}.")
    return METHODS[key]


@register_metric("magnitude", needs_activations=False, fused=FusedRecipe())
def magnitude_score(weight: torch.Tensor, stats: LayerStats | None = None) -> torch.Tensor:
    """``|W|`` (Han et al., 2015)."""
    return weight.abs()


def _activation_norm(stats: LayerStats, device: torch.device | None = None) -> torch.Tensor:
    """``sqrt(x_j)``, Wanda's activation factor (the fused kernel takes it as a vector)."""
    return stats.act_sq_mean.sqrt()


@register_metric("wanda", fused=FusedRecipe(activation=_activation_norm))
def wanda_score(weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    """Wanda (Sun et al., 2024): ``|W_ij| * ||X_j||_2``."""
    return weight.abs() * _activation_norm(stats).unsqueeze(0)


#: RIA's exponent of the activation norm (the paper's ``a``).
RIA_EXPONENT = 0.5


def _ria_activation(stats: LayerStats, device: torch.device | None = None) -> torch.Tensor:
    """``sqrt(x_j) ** RIA_EXPONENT``, RIA's activation factor at its default exponent."""
    return _activation_norm(stats).pow(RIA_EXPONENT)


def _ria_sums(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column sums of ``|W|`` (``(out, 1)``, ``(1, in)``), clamped above zero."""
    tiny = torch.finfo(w.dtype).tiny  # an all-zero row or column must not give 0/0 = NaN
    return w.sum(dim=1, keepdim=True).clamp_min(tiny), w.sum(dim=0, keepdim=True).clamp_min(tiny)


@register_metric(
    "ria", fused=FusedRecipe(activation=_ria_activation, weight_norm="ria", weight_stats=_ria_sums)
)
def ria_score(
    weight: torch.Tensor, stats: LayerStats | None, a: float = RIA_EXPONENT
) -> torch.Tensor:
    """RIA (Zhang et al., 2024): relative importance times ``||X_j||_2 ** a`` (a = 0.5).

    Relative importance is ``|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|`` (column sum over
    the output dimension plus row sum over the input dimension).
    """
    w = weight.abs()
    row_sum, column_sum = _ria_sums(w)
    relative = w / column_sum + w / row_sum
    return relative * _activation_norm(stats).pow(a).unsqueeze(0)


METHODS["sparsegpt"] = SparseGPTMethod()
