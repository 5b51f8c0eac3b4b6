"""Sparse fine-tuning masks: keep pruned weights exactly zero through every optimizer step.

Framework-free (PyTorch only): the Lightning callback drives it, and so can any training loop.
:class:`SparseMasks` holds one keep mask per pruned weight, by fully qualified parameter name,
as a ``bool`` tensor on the weight's device (one byte per weight, a quarter of an fp32 weight;
never a second copy of the weights) and bit-packed (one bit per weight) in checkpoints.

Two operations keep a pruned model pruned while it trains:

- :meth:`SparseMasks.mask_gradients_` zeroes the gradients of pruned weights. Called after the
  gradients are complete (after accumulation, after AMP unscaling) and *before* gradient
  clipping, the pruned entries neither move the weights nor count in the clipping norm, and
  Adam's moment estimates stay zero there;
- :meth:`SparseMasks.apply_` re-zeroes the pruned weights. Called after every optimizer step, it
  makes the guarantee independent of the optimizer (weight decay variants, momentum restored
  from a dense checkpoint, anything that writes weights without a gradient).

Example:
    >>> masks = SparseMasks.from_keep_masks(model, result.masks)  # doctest: +SKIP
    >>> loss.backward(); masks.mask_gradients_(); optimizer.step(); masks.apply_()  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["SparseMasks", "pack_bits", "unpack_bits"]

# Bit weights of one packed byte, most significant first (numpy.packbits' order).
_BIT_VALUES = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """Pack a ``bool`` tensor into ``ceil(numel / 8)`` bytes (``uint8``, CPU), MSB first."""
    flat = keep.detach().reshape(-1).to("cpu", torch.bool)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.reshape(-1, 8).to(torch.uint8)
    return (groups * _BIT_VALUES).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a ``bool`` tensor of ``shape`` (CPU)."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"A packed mask for shape {tuple(shape)} needs {(numel + 7) // 8} uint8 bytes, got "
            f"{packed.numel()} {packed.dtype}; the checkpoint does not belong to this model."
        )
    bits = packed.reshape(-1, 1).bitwise_and(_BIT_VALUES).ne(0)
    return bits.reshape(-1)[:numel].reshape(shape)


class SparseMasks:
    """Keep masks of a pruned model, applied to its weights and gradients.

    Args:
        model: the module whose parameters the names refer to.
        keep: ``{parameter name: bool keep mask}`` (``True`` = weight survives), shaped like
            each parameter; names as ``model.named_parameters()`` gives them.

    Raises:
        ValueError: a name that is not a parameter of ``model``, or a mask of another shape.
    """

    def __init__(self, model: nn.Module, keep: Mapping[str, torch.Tensor]):
        params = dict(model.named_parameters())
        unknown = sorted(set(keep) - set(params))
        if unknown:
            raise ValueError(
                f"Masks name parameters the model does not have: {unknown[:3]}"
                f"{' ...' if len(unknown) > 3 else ''}. They belong to another model."
            )
        self._params: dict[str, nn.Parameter] = {}
        self._keep: dict[str, torch.Tensor] = {}
        for name, mask in keep.items():
            param = params[name]
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(
                    f"Mask of {name} is shaped {tuple(mask.shape)}, the parameter "
                    f"{tuple(param.shape)}; the masks belong to another model."
                )
            self._params[name] = param
            self._keep[name] = mask.to(param.device, torch.bool)

    @classmethod
    def from_keep_masks(
        cls, model: nn.Module, keep: Mapping[str, torch.Tensor], prefix: str = ""
    ) -> SparseMasks:
        """Masks keyed relative to a submodule: ``prefix`` is prepended to every name."""
        return cls(model, {f"{prefix}{name}": mask for name, mask in keep.items()})

    @classmethod
    def from_packed(cls, model: nn.Module, state: Mapping[str, Mapping]) -> SparseMasks:
        """Rebuild from :meth:`packed` output (``{name: {"shape": ..., "bits": uint8}}``)."""
        keep = {
            name: unpack_bits(entry["bits"], tuple(entry["shape"])) for name, entry in state.items()
        }
        return cls(model, keep)

    # Queries -------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._keep)

    def keep_mask(self, name: str) -> torch.Tensor:
        """The ``bool`` keep mask of parameter ``name``."""
        return self._keep[name]

    def packed(self) -> dict[str, dict]:
        """Bit-packed masks for a checkpoint: ``{name: {"shape": [...], "bits": uint8}}``."""
        return {
            name: {"shape": list(mask.shape), "bits": pack_bits(mask)}
            for name, mask in self._keep.items()
        }

    def sparsity(self) -> float:
        """Fraction of masked-out entries over all masked parameters."""
        total = sum(m.numel() for m in self._keep.values())
        kept = sum(int(m.sum().item()) for m in self._keep.values())
        return 1.0 - kept / max(total, 1)

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of masked-out entries of each parameter, by name."""
        return {name: 1.0 - float(m.float().mean()) for name, m in self._keep.items()}

    def violations(self) -> int:
        """How many masked-out weights are not exactly zero (0 while the guarantee holds)."""
        return sum(
            int((p.detach()[~m] != 0).sum().item())
            for p, m in zip(self._params.values(), self._keep.values(), strict=True)
        )

    # Enforcement ---------------------------------------------------------------------------
    @torch.no_grad()
    def apply_(self) -> None:
        """Zero the masked-out weights in place."""
        for name, param in self._params.items():
            param.data.masked_fill_(~self._keep[name], 0)

    @torch.no_grad()
    def mask_gradients_(self) -> None:
        """Zero the gradients of masked-out weights in place (parameters without one skip)."""
        for name, param in self._params.items():
            if param.grad is not None:
                param.grad.masked_fill_(~self._keep[name], 0)

    def sync_devices(self) -> None:
        """Follow the parameters to their current devices (a Trainer may move the model)."""
        for name, param in self._params.items():
            if self._keep[name].device != param.device:
                self._keep[name] = self._keep[name].to(param.device)
