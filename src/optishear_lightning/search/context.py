"""Everything a search candidate shares, computed once, and the two objectives.

The reference implementation reloads the model and re-runs the whole sequential calibration
for each of its 300 trials. Here one dense calibration pass collects every linear layer's
input statistics (and, for the screening proxy, input Gram matrices of a few blocks); the
dense weights are kept; the dense model's final hidden states on the objective windows are
cached. A candidate is then evaluated by re-masking the cached dense weights (no reload, no
re-calibration) and running one forward pass on the objective windows.

For the ratio search the metric is fixed, so each weight's rank inside its row is computed once
and a candidate's mask for any ratio is a single comparison ``rank >= k``.

The model-wise objective (:mod:`.objectives`: KL divergence of the next-token distributions,
or the paper's Frobenius norm of the logit difference) compares the pruned model with the
dense one on two disjoint window sets: the *objective* windows the search optimises on, and the
*validation* windows that only decide among finalists. The logits are never stored: the cached
dense final hidden states go through the LM head chunk by chunk next to the pruned ones (with
Gemma's final soft-capping where the model has it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..calibration import LayerStats, run_sequential
from ..dispatch import dispatch_keep_mask, keep_mask
from ..masks import SparsityPattern, num_pruned
from ..models import find_decoder_blocks, find_prunable_linears, output_logits
from .objectives import Objective, get_objective
from .space import MetaMetric

__all__ = ["SearchContext"]


def _rank_in_rows(scores: torch.Tensor) -> torch.Tensor:
    """Position of each entry in its row's stable ascending order (0 = pruned first)."""
    order = torch.sort(scores, dim=-1, stable=True).indices
    dtype = torch.int16 if scores.shape[-1] < 2**15 else torch.int32
    ranks = torch.empty_like(order, dtype=dtype)
    positions = torch.arange(scores.shape[-1], device=scores.device, dtype=dtype)
    ranks.scatter_(-1, order, positions.expand_as(order).contiguous())
    return ranks


class SearchContext:
    """Cached dense state of a model for fast candidate evaluation.

    Args:
        model: the causal LM (its weights are modified by :meth:`apply` and restored by
            :meth:`restore`).
        calibration: ``(batch, seq_len)`` token batches for the activation statistics.
        objective: ``(batch, seq_len)`` token batches the search optimises on.
        pattern: mask layout.
        group: comparison group for unstructured masks.
        proxy_blocks: block indices whose input Gram matrices are kept for the proxy.
        proxy_rows: score at most this many evenly spaced output rows per matrix in the proxy
            (row and N:M groups only, whose masks are chosen row by row); ``None`` = all rows.
        device: where the model runs (default: its device).
        progress: progress bar for the calibration pass.
        validation: ``(batch, seq_len)`` token batches that decide among finalists.
        objective_fn: the model-wise objective (name or :class:`~.objectives.Objective`).
    """

    def __init__(
        self,
        model: nn.Module,
        calibration: Sequence[torch.Tensor],
        objective: Sequence[torch.Tensor],
        pattern: SparsityPattern,
        group: str = "row",
        proxy_blocks: Sequence[int] = (),
        device: torch.device | str | None = None,
        progress: bool = False,
        proxy_rows: int | None = None,
        validation: Sequence[torch.Tensor] = (),
        objective_fn: str | Objective = "logit_frobenius",
    ):
        self.model = model
        self.objective_fn = get_objective(objective_fn)
        self.proxy_rows = proxy_rows
        self.pattern = pattern
        self.group = group
        self.device = (
            torch.device(device) if device is not None else next(model.parameters()).device
        )
        blocks_name, blocks = find_decoder_blocks(model)
        self.n_blocks = len(blocks)
        self.linears: list[dict[str, nn.Linear]] = []
        self.names: list[list[str]] = []
        for i, block in enumerate(blocks):
            linears = find_prunable_linears(block)
            self.linears.append(linears)
            self.names.append([f"{blocks_name}.{i}.{n}.weight" for n in linears])
        self.dense = {
            fqn: lin.weight.detach().clone()
            for names, linears in zip(self.names, self.linears, strict=True)
            for fqn, lin in zip(names, linears.values(), strict=True)
        }
        self.shapes = {fqn: list(w.shape) for fqn, w in self.dense.items()}
        self.proxy_blocks = sorted(set(proxy_blocks))
        self.stats: dict[str, LayerStats] = {}
        proxy = set(self.proxy_blocks)

        def collect(index: int, block_name: str, block: nn.Module, stats: dict) -> bool:
            shared: list[LayerStats] = []
            for name, st in stats.items():
                # q/k/v (and gate/up) see the same input: keep one Gram matrix for them.
                for other in shared:
                    if other.n_tokens == st.n_tokens and torch.equal(other.sq_sum, st.sq_sum):
                        st.gram = other.gram
                        break
                else:
                    shared.append(st)
                self.stats[f"{block_name}.{name}.weight"] = st
            return False

        run_sequential(
            model,
            calibration,
            collect,
            device=self.device,
            gram_for=_GramSelector(self, proxy) if proxy else None,
            progress=progress,
        )
        self.windows = {
            "objective": [b.to(self.device) for b in objective],
            "validation": [b.to(self.device) for b in validation],
        }
        with _fast_fp32_matmul(self.device):
            self.dense_hidden = {
                which: [self._final_hidden(b) for b in batches]
                for which, batches in self.windows.items()
            }
        self._ranks: dict[str, torch.Tensor] = {}
        self._ranked_metric: MetaMetric | None = None
        self._proxy_ref: dict[str, torch.Tensor] = {}
        self.total_weights = sum(w.numel() for w in self.dense.values())

    # Candidate application -----------------------------------------------------------------
    @torch.no_grad()
    def restore(self) -> None:
        """Put the dense weights back."""
        for linears, names in zip(self.linears, self.names, strict=True):
            for lin, fqn in zip(linears.values(), names, strict=True):
                lin.weight.data.copy_(self.dense[fqn])

    def _prepare_ranks(self, metric: MetaMetric) -> None:
        if self._ranked_metric == metric:
            return
        self._ranks = {
            fqn: _rank_in_rows(metric.score(self.dense[fqn], self.stats[fqn])) for fqn in self.dense
        }
        self._ranked_metric = metric

    @torch.no_grad()
    def apply(self, metric: MetaMetric, ratios: Sequence[float]) -> None:
        """Set the model's weights to the dense weights pruned by ``metric`` at ``ratios``."""
        if self.pattern.is_nm or self.group != "row":
            for linears, names, ratio in zip(self.linears, self.names, ratios, strict=True):
                for lin, fqn in zip(linears.values(), names, strict=True):
                    # Fused kernel on CUDA; on the CPU metric.score + keep_mask_from_scores.
                    keep = dispatch_keep_mask(
                        metric, self.dense[fqn], self.stats[fqn], ratio, self.pattern, self.group
                    )
                    torch.mul(self.dense[fqn], keep, out=lin.weight.data)
            return
        self._prepare_ranks(metric)
        for linears, names, ratio in zip(self.linears, self.names, ratios, strict=True):
            for lin, fqn in zip(linears.values(), names, strict=True):
                k = num_pruned(lin.in_features, ratio)
                torch.mul(self.dense[fqn], self._ranks[fqn] >= k, out=lin.weight.data)

    # Objectives ----------------------------------------------------------------------------
    def _final_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return output_logits(self.model, hidden)

    @torch.no_grad()
    def evaluate(self, which: str = "objective", chunk_tokens: int = 2048) -> float:
        """The objective of the model as it is now against the dense model.

        Args:
            which: ``"objective"`` (the windows the search optimises on) or ``"validation"``.
            chunk_tokens: tokens whose logits are formed at once.
        """
        with _fast_fp32_matmul(self.device):
            total, n_tokens = self._accumulate(which, chunk_tokens)
        return self.objective_fn.reduce(float(total), n_tokens)

    def _accumulate(self, which: str, chunk_tokens: int) -> tuple[torch.Tensor, int]:
        # TF32 on CUDA (dense reference and candidates alike, see _fast_fp32_matmul): its
        # ~1e-3 relative rounding is far below the differences between candidates.
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        n_tokens = 0
        for ids, dense in zip(self.windows[which], self.dense_hidden[which], strict=True):
            hidden = self._final_hidden(ids).flatten(0, 1)
            dense = dense.flatten(0, 1)
            for start in range(0, hidden.shape[0], chunk_tokens):
                part = slice(start, start + chunk_tokens)
                pruned_logits = self._logits(hidden[part])
                dense_logits = self._logits(dense[part])
                total += self.objective_fn.partial(pruned_logits, dense_logits).double()
            n_tokens += hidden.shape[0]
        return total, n_tokens

    def achieved_sparsity(self, ratios: Sequence[float]) -> float:
        """Global sparsity over all prunable weights that ``ratios`` give (exact, no pruning)."""
        if self.pattern.is_nm:
            return self.pattern.sparsity
        pruned = 0
        for names, ratio in zip(self.names, ratios, strict=True):
            for fqn in names:
                rows, cols = self.shapes[fqn]
                if self.group == "row":
                    pruned += rows * num_pruned(cols, ratio)
                else:
                    pruned += num_pruned(rows * cols, ratio)
        return pruned / self.total_weights

    @torch.no_grad()
    def proxy_error(self, metric: MetaMetric, sparsity: float | None) -> float:
        """Mean relative layer reconstruction error ``||dW X|| / ||W X||`` over proxy blocks.

        Uses the cached Gram matrices: ``||dW X||^2 = sum((dW G) * dW)`` with ``G = X^T X``.
        The denominator does not depend on the metric and is computed once per matrix (in full
        float32). On CUDA the numerator's product runs in TF32: the proxy only ranks metrics
        for the model-wise objective to decide, and TF32's ~1e-3 relative error is far below
        the gaps between metrics, while it makes the screening several times faster.
        """
        errors = []
        for b in self.proxy_blocks:
            for fqn in self.names[b]:
                w = self.dense[fqn].float()
                st = self.stats[fqn]
                scores = metric.score(w, st)  # on all rows: normalisers use column sums
                pick = self._proxy_pick(w.shape[0], w.device)
                if pick is not None:
                    # Row masks are independent, so a row sample estimates the error sum
                    # at a fraction of the cost (the Gram product dominates it).
                    w, scores = w[pick], scores[pick]
                keep = keep_mask(scores, sparsity, self.pattern, self.group)  # kernel on CUDA
                delta = w * ~keep
                with _fast_fp32_matmul(w.device):
                    err = ((delta @ st.gram) * delta).sum()
                errors.append((err / self._proxy_reference(fqn, w)).clamp_min(0).sqrt().item())
        return float(sum(errors) / max(len(errors), 1))

    def _proxy_pick(self, rows: int, device: torch.device) -> torch.Tensor | None:
        if not (self.proxy_rows and self.group == "row" and rows > self.proxy_rows):
            return None
        return torch.linspace(0, rows - 1, self.proxy_rows, device=device).long()

    def _proxy_reference(self, fqn: str, w: torch.Tensor) -> torch.Tensor:
        """``||W X||^2`` of the (row-sampled) dense matrix, cached: it is metric-independent."""
        if fqn not in self._proxy_ref:
            gram = self.stats[fqn].gram
            ref = ((w @ gram) * w).sum()
            self._proxy_ref[fqn] = ref.clamp_min(torch.finfo(torch.float32).tiny)
        return self._proxy_ref[fqn]


@contextmanager
def _fast_fp32_matmul(device: torch.device) -> Iterator[None]:
    """Allow TF32 for float32 matmuls on CUDA inside the block (no effect elsewhere)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


class _GramSelector:
    """``gram_for`` callback: Gram matrices only for the proxy blocks' linears."""

    def __init__(self, ctx: SearchContext, blocks: set[int]):
        self.ids = {id(lin) for b in blocks for lin in ctx.linears[b].values()}

    def __call__(self, name: str, linear: nn.Linear) -> bool:
        return id(linear) in self.ids
