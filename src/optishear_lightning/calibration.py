"""Sequential, block-by-block calibration (the Wanda / SparseGPT pipeline).

The inputs of every decoder block are captured once; then, for each block in order, forward
hooks on its ``nn.Linear`` layers collect per-input-channel statistics while the block runs on
the cached inputs, a caller-supplied function prunes (or just inspects) the block, and the
block's outputs, recomputed if it changed, become the next block's inputs. Only one block needs
to sit on the accelerator at a time, so models larger than the accelerator can be pruned with
the rest of the model left on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .models import eval_mode, find_decoder_blocks, find_prunable_linears, is_dispatched
from .progress import track

__all__ = [
    "BlockInputs",
    "LayerStats",
    "StatsCollector",
    "capture_block_inputs",
    "run_block",
    "run_sequential",
]


@dataclass
class LayerStats:
    """Input statistics of one linear layer over the calibration tokens.

    Attributes:
        sq_sum: per input channel, the sum over tokens of ``x_j**2`` (float32).
        n_tokens: number of tokens seen.
        gram: ``sum_t x_t x_t^T`` (float32, ``in x in``) when a method needs it (SparseGPT).
    """

    sq_sum: torch.Tensor
    n_tokens: int = 0
    gram: torch.Tensor | None = None

    @property
    def act_sq_mean(self) -> torch.Tensor:
        """Mean squared activation per input channel, the ``x_j`` of the OptiShear metric."""
        return self.sq_sum / max(self.n_tokens, 1)

    @property
    def act_norm(self) -> torch.Tensor:
        """``||X_j||_2`` over all calibration tokens (Wanda's activation term)."""
        return self.sq_sum.sqrt()

    def to(self, device: torch.device | str) -> LayerStats:
        gram = None if self.gram is None else self.gram.to(device)
        return LayerStats(self.sq_sum.to(device), self.n_tokens, gram)


class StatsCollector:
    """Forward hooks that accumulate :class:`LayerStats` for a set of linear layers.

    Use as a context manager around the forward passes of one block.
    """

    def __init__(self, linears: dict[str, nn.Linear], gram_for: Iterable[str] = ()):
        self.linears = linears
        self.gram_for = set(gram_for)
        self.stats: dict[str, LayerStats] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Linear, args: tuple, output: Any) -> None:
            x = args[0].detach().reshape(-1, module.in_features).float()
            st = self.stats.get(name)
            if st is None:
                st = LayerStats(torch.zeros(module.in_features, device=x.device))
                if name in self.gram_for:
                    st.gram = torch.zeros(module.in_features, module.in_features, device=x.device)
                self.stats[name] = st
            st.sq_sum += x.pow(2).sum(0)
            st.n_tokens += x.shape[0]
            if st.gram is not None:
                st.gram.addmm_(x.t(), x)

        return hook

    def __enter__(self) -> StatsCollector:
        for name, module in self.linears.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def check_finite(self, block_index: int) -> None:
        """Raise ``FloatingPointError`` if any statistic is NaN or infinite."""
        for name, st in self.stats.items():
            if not torch.isfinite(st.sq_sum).all():
                raise FloatingPointError(
                    f"Block {block_index}, {name}: calibration activations are NaN or infinite. "
                    "Load the model in float32 or bfloat16 (float16 overflows in many LLMs) "
                    "and check the calibration tokens."
                )


class _StopForward(Exception):
    """Raised by the last recorder to end the capture forward pass early."""


class _BlockRecorder(nn.Module):
    """Stands in for one decoder block during capture: records its call, passes input on."""

    def __init__(self, index: int, block: nn.Module, sink: BlockInputs, last: bool):
        super().__init__()
        self.index = index
        self.last = last
        # Kept in lists so that they are not registered as submodules: the real block must not
        # move with ``model.to(device)`` during capture.
        self._block = [block]
        self._sink = [sink]

    def __getattr__(self, name: str) -> Any:
        # Some model loops read attributes of their layers (attention_type, layer_idx...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._block[0], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        sink = self._sink[0]
        if self.index == 0:
            sink.hidden.append(hidden_states.detach().to(sink.cache_device))
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs["use_cache"] = False
        sink.calls[self.index].append(sink.dedupe((args, kwargs)))
        if self.last:
            raise _StopForward
        return hidden_states


@dataclass
class BlockInputs:
    """What every decoder block is called with, per calibration batch.

    Attributes:
        hidden: block 0's input hidden states, one tensor per batch.
        calls: ``calls[block][batch]`` is the ``(args, kwargs)`` the model passed to that block
            besides the hidden states (attention masks, position embeddings...). Gemma-2/3 and
            sliding-window Qwen2 pass different masks to different blocks, so they are kept per
            block; identical tensors are stored once.
        cache_device: where ``hidden`` is kept.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    calls: list[list[tuple[tuple, dict]]] = field(default_factory=list)
    cache_device: torch.device | str = "cpu"
    _seen: dict = field(default_factory=dict, repr=False)

    def dedupe(self, value: Any) -> Any:
        """Replace tensors equal to one already stored by that one, recursively."""
        if isinstance(value, torch.Tensor):
            value = value.detach()
            key = (tuple(value.shape), value.dtype, value.device)
            for known in self._seen.setdefault(key, []):
                if known is value or torch.equal(known, value):
                    return known
            self._seen[key].append(value)
            return value
        if isinstance(value, tuple):
            return tuple(self.dedupe(v) for v in value)
        if isinstance(value, list):
            return [self.dedupe(v) for v in value]
        if isinstance(value, dict):
            return {k: self.dedupe(v) for k, v in value.items()}
        return value


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    device: torch.device | str,
    cache_device: torch.device | str | None = None,
) -> BlockInputs:
    """Run the model's embedding stage on each batch and record what each block receives.

    The decoder blocks are swapped for recorders, so no block computes anything and no block
    moves: only the modules outside the blocks (embeddings, rotary tables) run on ``device``.

    Args:
        model: a causal LM.
        batches: ``input_ids`` tensors, each ``(batch, seq_len)``.
        device: where the embedding stage runs.
        cache_device: where to keep block 0's inputs (default: ``device``).
    """
    _, blocks = find_decoder_blocks(model)
    sink = BlockInputs(calls=[[] for _ in blocks], cache_device=cache_device or device)
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _BlockRecorder(i, block, sink, last=i == len(originals) - 1)
    outer_devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    home = next(iter(outer_devices)) if len(outer_devices) == 1 else torch.device("cpu")
    try:
        model.to(device)
        with eval_mode(model):
            for input_ids in batches:
                with contextlib.suppress(_StopForward):
                    model(input_ids=input_ids.to(device), use_cache=False)
    finally:
        # The recorders are still in place, so this moves only the outer modules back.
        model.to(home)
        for i, block in enumerate(originals):
            blocks[i] = block
    if len(sink.hidden) != len(batches) or any(len(c) != len(batches) for c in sink.calls):
        raise RuntimeError(
            f"{type(model).__name__} did not call each decoder block once per batch; its "
            "forward pass is not supported by the sequential calibration pipeline."
        )
    sink._seen.clear()
    return sink


@torch.no_grad()
def run_block(
    block: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict], device: torch.device | str
) -> torch.Tensor:
    """Run one decoder block on cached inputs and return its output hidden states."""
    args, kwargs = call
    out = block(hidden.to(device), *args, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


BlockFn = Callable[[int, str, nn.Module, dict[str, LayerStats]], bool]


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    on_block: BlockFn,
    device: torch.device | str | None = None,
    gram_for: Callable[[str, nn.Linear], bool] | None = None,
    offload: bool | None = None,
    cache_device: torch.device | str | None = None,
    progress: bool = False,
) -> None:
    """Walk the decoder blocks in order, calling ``on_block`` with fresh statistics.

    The model runs in eval mode (no dropout); every module's training flag is restored after.

    Args:
        model: a causal LM.
        batches: calibration ``input_ids``, each ``(batch, seq_len)``.
        on_block: ``on_block(index, block_name, block, stats) -> changed``; may prune the block
            in place and must return whether it changed any weight (then the block's outputs
            are recomputed before they feed the next block).
        device: where blocks run (default: the model's device). A model dispatched by
            accelerate (``device_map``) runs each block on its own device instead, unmoved.
        gram_for: ``gram_for(name, linear)`` says which linears need the input Gram matrix.
        offload: move each block back to its original device after use. Defaults to ``True``
            when the model does not live on ``device``.
        cache_device: where cached hidden states live (default ``device``).
        progress: show a progress bar over blocks.
    """
    blocks_name, blocks = find_decoder_blocks(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    dispatched = is_dispatched(model)  # each block stays on the device accelerate gave it
    if offload is None:
        offload = home != device and not dispatched
    with eval_mode(model):
        inputs = capture_block_inputs(model, batches, device, cache_device)
        hidden = inputs.hidden
        for i in track(range(len(blocks)), "blocks", enabled=progress):
            block = blocks[i]
            block_home = next(block.parameters()).device
            run_on = block_home if dispatched else device
            try:
                if not dispatched:
                    block.to(device)
                linears = find_prunable_linears(block)
                wants_gram = [
                    n for n, m in linears.items() if gram_for is not None and gram_for(n, m)
                ]
                collector = StatsCollector(linears, wants_gram)
                outputs = []
                with collector:
                    for h, call in zip(hidden, inputs.calls[i], strict=True):
                        outputs.append(run_block(block, h, call, run_on).to(h.device))
                collector.check_finite(i)
                changed = on_block(i, f"{blocks_name}.{i}", block, collector.stats)
                del collector
                if changed:
                    outputs = [
                        run_block(block, h, call, run_on).to(h.device)
                        for h, call in zip(hidden, inputs.calls[i], strict=True)
                    ]
                hidden = outputs
            finally:
                # Also on failure (NaN activations, an interrupt), so that the model is not
                # left with one block on the accelerator.
                if offload:
                    block.to(block_home)
