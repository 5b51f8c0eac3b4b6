"""Input-channel permutation before N:M selection (RIA's channel permutation).

An N:M mask keeps ``N`` weights in every group of ``M`` *consecutive* input channels. Which
channels share a group is an accident of the layout: when two important channels fall into one
group, one of them is lost. Permuting the input channels first, so that important channels are
spread over the groups, keeps more of the score (Zhang et al., 2024, "Plug-and-Play").

The permutation must leave the dense model unchanged. Here it is folded into the layer that
produces the permuted channels: the rows of the MLP's up/gate projection (and the columns of
its down projection), or, inside one attention head, the rows of the value projection (and the
columns of the output projection). Nothing is undone at inference and the mask stays a plain
N:M mask in the stored layout, so 2:4 kernels and exports work unchanged. Layers whose input
is the residual stream (q/k/v, gate/up) are not permuted: their permutation would have to run
through every block of the model.

The algorithm (pure tensor functions, :func:`nm_channel_permutation`):

1. *Balanced allocation*: channels sorted by total score are dealt to the ``in/M`` groups in
   snake order, so every group gets a similar share of important channels.
2. *Refinement*: for each slot of a group in turn, the channels in that slot are reassigned to
   groups by a linear sum assignment (SciPy) that maximises the score the N:M mask keeps, the
   other ``M-1`` channels of every group held fixed. Each step can only increase the kept
   score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

__all__ = [
    "ChannelCoupling",
    "apply_coupling_permutation",
    "coupling_permutations",
    "kept_nm_score",
    "nm_channel_permutation",
    "permute_block_channels",
]

# Elements of the (rows x groups x groups) comparison tensor built per chunk of rows: bounds
# the refinement's memory to ~256 MB of float32 whatever the layer size.
_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class ChannelCoupling:
    """A consumer linear whose input channels are the outputs of ``producers``.

    Between producers and consumer only elementwise operations happen (an activation, a gate
    product), or, with ``heads``, attention, which mixes positions but not channels of a head.

    Attributes:
        consumer: name (within the block) of the linear whose input channels are permuted.
        producers: linears whose output rows are permuted the same way. A producer with
            ``k`` times as many rows as the consumer has inputs holds ``k`` stacked parts (a
            fused gate/up projection); each part is permuted.
        heads: ``(query_heads, kv_heads, head_dim)`` for value -> output projections: channels
            only move within a head, and every query head of a KV group moves as its KV head.
    """

    consumer: str
    producers: tuple[str, ...]
    heads: tuple[int, int, int] | None = None


def kept_nm_score(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Total score an N:M mask keeps on ``scores`` (``rows x in``) in its current layout."""
    groups = scores.reshape(scores.shape[0], -1, m)
    return groups.topk(n, dim=-1).values.sum()


def _balanced_allocation(importance: torch.Tensor, m: int) -> torch.Tensor:
    """``(groups, m)`` channel indices: channels dealt to groups in snake order by importance."""
    n_groups = importance.numel() // m
    order = torch.argsort(importance, descending=True, stable=True).reshape(m, n_groups)
    order[1::2] = order[1::2].flip(-1)  # snake: every other round deals the groups backwards
    return order.t().contiguous()


def _slot_gain(scores: torch.Tensor, layout: torch.Tensor, slot: int, n: int) -> torch.Tensor:
    """``gain[c, g]``: score kept by group ``g`` with the channel now in ``slot`` of group ``c``.

    With the other ``m-1`` channels of group ``g`` sorted, the kept score is the sum of their
    ``n-1`` largest plus ``max(their n-th largest, candidate)``; the first part does not depend
    on the candidate, so only the ``max`` term enters the assignment.
    """
    m = layout.shape[1]
    others = layout[:, [s for s in range(m) if s != slot]]
    candidates = layout[:, slot]
    rows = scores.shape[0]
    n_groups = layout.shape[0]
    gain = torch.zeros(n_groups, n_groups, dtype=torch.float64, device=scores.device)
    step = max(1, _CHUNK_ELEMENTS // max(n_groups * n_groups, 1))
    for start in range(0, rows, step):
        chunk = scores[start : start + step]
        threshold = chunk[:, others].topk(n, dim=-1).values[..., n - 1]  # (rows, groups)
        cand = chunk[:, candidates]  # (rows, candidates)
        gain += torch.maximum(cand.unsqueeze(2), threshold.unsqueeze(1)).sum(0).double()
    return gain


def nm_channel_permutation(
    scores: torch.Tensor, n: int, m: int, refine_passes: int = 2
) -> torch.Tensor:
    """A permutation of the input channels under which an N:M mask keeps more of ``scores``.

    Args:
        scores: ``(rows, in)`` importance of each weight (higher = keep), ``in % m == 0``.
        n: weights kept per group.
        m: group size.
        refine_passes: passes of slot-wise linear-assignment refinement after the balanced
            allocation (0: allocation only).

    Returns:
        ``perm`` (``int64``, on ``scores``' device): use ``scores[:, perm]``. The identity when
        no arrangement found keeps more than the original layout.

    Example:
        >>> s = torch.tensor([[9.0, 8.0, 1.0, 0.0]])
        >>> perm = nm_channel_permutation(s, 1, 2)
        >>> kept_nm_score(s[:, perm], 1, 2).item()
        17.0
    """
    if scores.dim() != 2 or scores.shape[1] % m:
        raise ValueError(f"scores must be (rows, in) with in divisible by {m}.")
    identity = torch.arange(scores.shape[1], device=scores.device)
    if n >= m or scores.shape[1] == m:
        return identity
    scores = scores.detach().float()
    layout = _balanced_allocation(scores.sum(0), m)
    for _ in range(refine_passes):
        for slot in range(m):
            gain = _slot_gain(scores, layout, slot, n).cpu().numpy()
            cand_idx, group_idx = linear_sum_assignment(gain, maximize=True)
            moved = layout[:, slot].clone()
            layout[torch.as_tensor(group_idx), slot] = moved[torch.as_tensor(cand_idx)]
    perm = layout.reshape(-1)
    if kept_nm_score(scores[:, perm], n, m) <= kept_nm_score(scores, n, m):
        return identity
    return perm


def coupling_permutations(
    coupling: ChannelCoupling, scores: torch.Tensor, n: int, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutations of the consumer's input channels and of each producer part's rows.

    Args:
        coupling: what is permuted.
        scores: ``(rows, in)`` scores of the consumer's weight.
        n: weights kept per N:M group.
        m: N:M group size.

    Returns:
        ``(consumer_perm, producer_perm)``: equal for MLPs; for attention the consumer's covers
        every query head, the producer's every KV head.
    """
    if coupling.heads is None:
        perm = nm_channel_permutation(scores, n, m)
        return perm, perm
    q_heads, kv_heads, head_dim = coupling.heads
    per_kv = q_heads // kv_heads
    consumer = torch.empty(q_heads * head_dim, dtype=torch.long, device=scores.device)
    producer = torch.empty(kv_heads * head_dim, dtype=torch.long, device=scores.device)
    for g in range(kv_heads):
        # Every query head of the group sees the same value channels in the same order, so
        # one permutation serves them all: its scores are theirs stacked.
        heads = range(g * per_kv, (g + 1) * per_kv)
        cols = [scores[:, h * head_dim : (h + 1) * head_dim] for h in heads]
        perm = nm_channel_permutation(torch.cat(cols, dim=0), n, m)
        producer[g * head_dim : (g + 1) * head_dim] = g * head_dim + perm
        for h in range(g * per_kv, (g + 1) * per_kv):
            consumer[h * head_dim : (h + 1) * head_dim] = h * head_dim + perm
    return consumer, producer


@torch.no_grad()
def apply_coupling_permutation(
    linears: Mapping[str, nn.Linear],
    coupling: ChannelCoupling,
    consumer_perm: torch.Tensor,
    producer_perm: torch.Tensor,
) -> None:
    """Permute the consumer's input columns and the producers' output rows (and biases) in
    place; the block computes exactly what it computed before (up to float rounding of sums in
    another order)."""
    consumer = linears[coupling.consumer]
    consumer.weight.copy_(consumer.weight[:, consumer_perm.to(consumer.weight.device)])
    size = producer_perm.numel()
    for name in coupling.producers:
        producer = linears[name]
        parts = producer.out_features // size
        rows = torch.cat([producer_perm + k * size for k in range(parts)])
        rows = rows.to(producer.weight.device)
        producer.weight.copy_(producer.weight[rows])
        if producer.bias is not None:
            producer.bias.copy_(producer.bias[rows])


def permute_block_channels(
    linears: Mapping[str, nn.Linear],
    couplings: list[ChannelCoupling],
    stats: dict[str, Any],
    score: Callable[[torch.Tensor, Any], torch.Tensor],
    n: int,
    m: int,
) -> None:
    """Permute every coupling of one block for N:M selection, in place.

    Args:
        linears: the block's linears by name.
        couplings: what may be permuted (:func:`~optishear_lightning.models.channel_couplings`).
        stats: the block's input statistics by linear name; the consumers' entries are
            replaced by permuted copies, so that scores and reconstruction see the new order.
        score: ``score(weight, stats) -> (rows, in)`` importance (the pruning method's).
        n: weights kept per N:M group.
        m: N:M group size.
    """
    for coupling in couplings:
        layer_stats = stats.get(coupling.consumer)
        scores = score(linears[coupling.consumer].weight, layer_stats)
        consumer_perm, producer_perm = coupling_permutations(coupling, scores, n, m)
        apply_coupling_permutation(linears, coupling, consumer_perm, producer_perm)
        if layer_stats is not None:
            stats[coupling.consumer] = _permuted_stats(layer_stats, consumer_perm)


def _permuted_stats(layer_stats: Any, perm: torch.Tensor) -> Any:
    """Input statistics with channels in the permuted order (squared sums and Gram matrix)."""
    perm = perm.to(layer_stats.sq_sum.device)
    gram = layer_stats.gram
    if gram is not None:
        gram = gram[perm][:, perm]
    return dataclasses.replace(layer_stats, sq_sum=layer_stats.sq_sum[perm], gram=gram)
