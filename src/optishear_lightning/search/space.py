"""The OptiShear meta pruning metric: a small, serialisable point of a discrete space.

``S_ij = [a(|W|)_ij * F1(|W_ij|)] * [b(x)_j * F2(sqrt(x_j))]``, where ``x_j`` is the mean squared
activation of input channel ``j``. ``F1, F2`` are element-wise transforms and ``a, b``
normalisers (reciprocals of sums or norms) of ``|W|`` and of ``x`` respectively; ``x`` is treated
as a ``1 x in`` row, as in the paper's code, so its "column sum" is ``x_j`` itself and its
"row sum" the total.

Numerically safe choices (all keep the ordering inside any comparison group):

- ``log`` clamps its argument to the smallest normal float first, so zeros (weights pruned
  earlier, dead channels) give a large negative score instead of ``-inf`` and ``0 * -inf`` NaNs;
- ``exp`` is taken of ``v - max(v)`` over the whole matrix (or vector): a factor constant over
  the layer, invisible to every comparison group, that keeps large activations from overflowing;
- ``softmax`` runs along the input dimension (per output row for ``W``, over channels for ``x``),
  as in the reference code, with PyTorch's max-subtracting implementation;
- every normaliser divides by its sum or norm clamped to the smallest normal float, so an
  all-zero row or a dead channel never divides by zero.

Wanda is ``a=1, F1=identity, b=1, F2=identity`` (``|W| * sqrt(x)``); magnitude is
``a=1, F1=identity, b=column_sum, F2=square`` (``|W| * x_j / x_j``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..calibration import LayerStats
from ..dispatch import FUSABLE_TRANSFORMS, FusedRecipe, try_fused_prune_
from ..masks import SparsityPattern
from ..metrics import PruningMethod, prune_by_scores_

__all__ = [
    "MAGNITUDE",
    "NORMALISERS",
    "TRANSFORMS",
    "WANDA",
    "MetaMetric",
    "effective_space",
    "full_space",
]

Tensor = torch.Tensor


def _tiny(t: Tensor) -> float:
    return torch.finfo(t.dtype).tiny


TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda v: v,
    "sqrt": torch.sqrt,
    "square": torch.square,
    "exp": lambda v: torch.exp(v - v.max()),
    "log": lambda v: torch.log(v.clamp_min(_tiny(v))),
    "sigmoid": torch.sigmoid,
    "softmax": lambda v: torch.softmax(v, dim=-1),
}


def _recip(t: Tensor) -> Tensor:
    return 1.0 / t.clamp_min(_tiny(t))


# Each normaliser maps a non-negative 2-D tensor A (|W|, or x as a 1 x in row) to a tensor that
# broadcasts against it.
NORMALISERS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda a: torch.ones((), dtype=a.dtype, device=a.device),
    "row_sum": lambda a: _recip(a.sum(dim=1, keepdim=True)),
    "column_sum": lambda a: _recip(a.sum(dim=0, keepdim=True)),
    "relative_sum": lambda a: _recip(a.sum(dim=1, keepdim=True) + a.sum(dim=0, keepdim=True)),
    "total_sum": lambda a: _recip(a.sum()),
    "mean": lambda a: _recip(a.mean()),
    "frobenius": lambda a: _recip(torch.linalg.vector_norm(a)),
}

_SYMBOL = {
    "none": "",
    "row_sum": "1/rowsum({v}) * ",
    "column_sum": "1/colsum({v}) * ",
    "relative_sum": "1/(rowsum({v})+colsum({v})) * ",
    "total_sum": "1/sum({v}) * ",
    "mean": "1/mean({v}) * ",
    "frobenius": "1/||{v}||_F * ",
}
_FN = {
    "identity": "{v}",
    "sqrt": "sqrt({v})",
    "square": "({v})^2",
    "exp": "exp({v})",
    "log": "log({v})",
    "sigmoid": "sigmoid({v})",
    "softmax": "softmax({v})",
}


@dataclass(frozen=True)
class MetaMetric(PruningMethod):
    """One pruning metric of the OptiShear space.

    Attributes:
        f1: transform of ``|W|`` (a key of :data:`TRANSFORMS`).
        f2: transform of ``sqrt(x)``.
        a: normaliser of ``|W|`` (a key of :data:`NORMALISERS`).
        b: normaliser of ``x``.

    Example:
        >>> print(MetaMetric("identity", "identity", "none", "none"))
        |W| * sqrt(x)
    """

    f1: str = "identity"
    f2: str = "identity"
    a: str = "none"
    b: str = "none"

    def __post_init__(self) -> None:
        for field_name, table in (("f1", TRANSFORMS), ("f2", TRANSFORMS)):
            if getattr(self, field_name) not in table:
                raise ValueError(
                    f"MetaMetric.{field_name}={getattr(self, field_name)!r}; use one of "
                    f"{sorted(table)}."
                )
        for field_name in ("a", "b"):
            if getattr(self, field_name) not in NORMALISERS:
                raise ValueError(
                    f"MetaMetric.{field_name}={getattr(self, field_name)!r}; use one of "
                    f"{sorted(NORMALISERS)}."
                )

    # PruningMethod interface -------------------------------------------------------------
    @property
    def name(self) -> str:  # type: ignore[override]
        return f"meta[{self.f1},{self.f2},{self.a},{self.b}]"

    needs_activations = True
    needs_gram = False

    def score(self, weight: Tensor, stats: LayerStats | None) -> Tensor:
        """Scores (float32) for ``weight`` given its input statistics."""
        w = weight.detach().float().abs()
        # 1/tiny (an all-zero row or column, a dead channel) times log's -87 overflows to
        # -inf, and -inf * 0 is NaN: clamp the parts and the product to finite values (clamp
        # keeps a NaN that comes from the inputs, which keep_mask_from_scores reports).
        big = torch.finfo(torch.float32).max
        w_part = (NORMALISERS[self.a](w) * TRANSFORMS[self.f1](w)).clamp(-big, big)
        return (w_part * self.x_part(stats, w.device)).clamp(-big, big)

    def channel_scores(self, weight: Tensor, stats: LayerStats | None) -> Tensor:
        """The metric's own scores arrange channels before N:M selection."""
        return self.score(weight, stats)

    def x_part(self, stats: LayerStats, device: torch.device) -> Tensor:
        """The activation factor ``b(x) * F2(sqrt(x))``: float32, ``1 x in``, clamped finite.

        Shared by :meth:`score` and the fused Triton kernels, which take it as a vector.
        """
        x = stats.act_sq_mean.float().to(device).reshape(1, -1)
        big = torch.finfo(torch.float32).max
        return (NORMALISERS[self.b](x) * TRANSFORMS[self.f2](x.sqrt())).clamp(-big, big)

    def fused_recipe(self) -> FusedRecipe | None:
        """What the fused Triton kernel needs to score like :meth:`score`.

        ``None`` when ``F1`` has no bit-exact kernel (``exp``, ``log``, ``sigmoid``,
        ``softmax``): PyTorch scores, then the select-only kernel.
        """
        if self.f1 not in FUSABLE_TRANSFORMS:
            return None
        if self.a == "none":  # NORMALISERS["none"] is a 1: multiplying by it changes nothing
            norm, weight_stats = "none", None
        elif self.a == "relative_sum":
            # The reference reciprocates the broadcast sum: pass both sums, add in the kernel.
            norm = "relative"

            def weight_stats(w: Tensor) -> tuple[Tensor, Tensor]:
                return w.sum(dim=1, keepdim=True), w.sum(dim=0, keepdim=True)

        else:  # a factor whose shape (scalar, row, column) the dispatch reads
            norm, weight_stats = "factor", NORMALISERS[self.a]
        return FusedRecipe(
            transform=self.f1,
            activation=self.x_part,
            weight_norm=norm,
            weight_stats=weight_stats,
            clamp=True,
        )

    def prune_(
        self,
        weight: Tensor,
        stats: LayerStats | None,
        sparsity: float | None,
        pattern: SparsityPattern,
        group: str = "row",
    ) -> Tensor:
        # Fused Triton kernel on CUDA when F1 is exact in a kernel (identity, sqrt, square);
        # otherwise PyTorch scores, and prune_by_scores_ picks the select-only kernel.
        keep = try_fused_prune_(weight, self, stats, sparsity, pattern, group)
        if keep is not None:
            return keep
        return prune_by_scores_(weight, self.score(weight, stats), sparsity, pattern, group)

    # Serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MetaMetric:
        unknown = set(data) - {"f1", "f2", "a", "b"}
        if unknown:
            raise ValueError(f"Unknown MetaMetric fields {sorted(unknown)}.")
        return cls(**data)

    @property
    def formula(self) -> str:
        return str(self)

    def __str__(self) -> str:
        w = _SYMBOL[self.a].format(v="|W|") + _FN[self.f1].format(v="|W|")
        x = _SYMBOL[self.b].format(v="x") + _FN[self.f2].format(v="sqrt(x)")
        return f"{w} * {x}"


WANDA = MetaMetric("identity", "identity", "none", "none")
MAGNITUDE = MetaMetric("identity", "square", "none", "column_sum")

# Normalisers that are a single number for the whole matrix: no comparison group can see them.
_SCALAR_W = ("none", "total_sum", "mean", "frobenius")
# For x (a 1 x in row) the row sum is the total, hence a scalar too.
_SCALAR_X = ("none", "row_sum", "total_sum", "mean", "frobenius")


def full_space() -> list[MetaMetric]:
    """All 7^4 = 2401 metrics of the paper's space."""
    return [
        MetaMetric(f1, f2, a, b)
        for f1, f2, a, b in itertools.product(TRANSFORMS, TRANSFORMS, NORMALISERS, NORMALISERS)
    ]


def effective_space(group: str = "row") -> list[MetaMetric]:
    """One representative per class of metrics that always give the same masks.

    Scalar normalisers are dropped (they scale a whole matrix), and for per-row or N:M groups
    so is ``a=row_sum`` (constant along each row). What remains for row groups is
    7 x 7 x 3 x 3 = 441 metrics.
    """
    a_choices = ["none", "column_sum", "relative_sum"]
    if group == "layer":
        a_choices.insert(1, "row_sum")
    b_choices = ["none", "column_sum", "relative_sum"]
    return [
        MetaMetric(f1, f2, a, b)
        for f1, f2, a, b in itertools.product(TRANSFORMS, TRANSFORMS, a_choices, b_choices)
    ]
