"""Perplexity of a causal LM over one tokenised text, the Wanda / SparseGPT protocol.

Windows come from :func:`~optishear_lightning.data.evaluation_windows`, the same cut the
:class:`~optishear_lightning.datamodule.TextDataModule` uses for its val/test splits, and long
texts are tokenised by :func:`~optishear_lightning.data.encode_text`: one home for each.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics.text import Perplexity

from ..data import encode_text, evaluation_windows
from ..models import eval_mode, model_bos_token_id, model_device, resolve_bos_per_window
from ..progress import track

__all__ = ["perplexity", "tokenize_for_eval"]


def tokenize_for_eval(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenise a whole evaluation text in one call (alias of ``data.encode_text``).

    Kept for callers of the earlier ``evaluation.tokenize_for_eval``; new code should use
    :func:`optishear_lightning.data.encode_text` or
    :func:`optishear_lightning.data.evaluation_tokens`.

    Args:
        tokenizer: A Hugging Face tokenizer.
        text: The full evaluation text (e.g. the WikiText-2 test file's content).

    Returns:
        A 1-D ``torch.long`` tensor of token ids, special tokens added the tokenizer's way.
    """
    return encode_text(tokenizer, text)


def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    seq_len: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    bos_per_window: bool | None = None,
    bos_token_id: int | None = None,
) -> float:
    """Perplexity of a causal LM over one tokenised text, Wanda / SparseGPT protocol.

    The text is cut into non-overlapping windows of ``seq_len`` tokens (the remainder is
    dropped), each window is run through the model on its own, and the token NLL of the
    ``seq_len - 1`` next-token predictions of every window is averaged over all windows. The
    result is ``exp`` of that mean. Every window predicts the same number of tokens, so this
    equals the papers' ``exp(sum(loss_i * seq_len) / (n_windows * seq_len))``.

    With ``bos_per_window`` on, every window is ``[BOS]`` followed by the next ``seq_len - 1``
    tokens of the text (see :func:`~optishear_lightning.data.evaluation_windows`): the BOS is
    never a target, no text token is scored twice, and the same number of windows and of scored
    tokens as without it.

    Args:
        model: A causal LM called as ``model(input_ids=..., use_cache=False).logits``.
        input_ids: Token ids of the whole text, shape ``(N,)`` or ``(1, N)``.
        seq_len: Window length in tokens (2048 for LLaMA-class models in published tables).
        batch_size: Windows per forward pass.
        max_windows: Keep only the first this many windows (C4 protocol: 256).
        device: Where to run; defaults to the device of the model's first parameter.
        progress: Show a progress bar over batches.
        bos_per_window: Start every window with BOS. ``None`` (default) follows the model's
            family (:func:`~optishear_lightning.models.needs_bos_per_window`: on for Gemma,
            off for LLaMA and the other families, whose published numbers use plain windows).
        bos_token_id: The BOS id; defaults to the model's (generation) config's.

    Returns:
        The perplexity as a Python float.

    Raises:
        ValueError: If ``seq_len < 2``, ``batch_size < 1``, ``max_windows < 1``, ``input_ids``
            is not one sequence, the text is shorter than one window, or ``bos_per_window`` is
            on (set or by default) and no BOS id is known.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    bos_id = resolve_bos_per_window(
        bos_per_window,
        model,
        bos_token_id if bos_token_id is not None else model_bos_token_id(model),
        bos_from="bos_token_id= or the model's (generation) config",
    )
    windows = evaluation_windows(input_ids, seq_len, max_windows, bos_token_id=bos_id)

    run_device = torch.device(device) if device is not None else model_device(model)
    metric = Perplexity().to(run_device)
    starts = range(0, windows.shape[0], batch_size)
    with eval_mode(model), torch.inference_mode():
        for start in track(starts, "perplexity", enabled=progress):
            batch = windows[start : start + batch_size].to(run_device)
            logits = model(input_ids=batch, use_cache=False).logits
            # Half-precision softmax over a 32k+ vocabulary loses the small probabilities that
            # dominate the NLL, hence the upcast before the metric normalises.
            metric.update(logits[:, :-1].float(), batch[:, 1:])
    return float(metric.compute())
