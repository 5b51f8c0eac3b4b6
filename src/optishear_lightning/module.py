"""``CausalLMModule``: a LightningModule around any causal LM the engine can load.

Training step: next-token cross-entropy. Validation and test: perplexity over the batches'
windows with torchmetrics (the same quantity :func:`~optishear_lightning.evaluation.perplexity`
computes, synchronised across DDP ranks), plus optional zero-shot accuracy at the end of test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.text import Perplexity

from .data import batch_token_ids
from .models import load_model, load_tokenizer

__all__ = ["CausalLMModule", "batch_input_ids"]


#: The one batch normaliser lives in the engine; this name stays for existing imports.
batch_input_ids = batch_token_ids


class CausalLMModule(LightningModule):
    """Fine-tune and evaluate a Hugging Face causal LM with Lightning.

    Args:
        model: The model: a name or path (built-in name such as ``"smollm2-135m"``, hub id,
            local directory, GGUF file), or an already built ``nn.Module`` (Python only).
        dtype: Weight dtype when loading by name. ``"float32"``, ``"bfloat16"``...; leave
            ``"float32"`` for mixed-precision training (``precision="bf16-mixed"``).
        learning_rate: AdamW learning rate (ignored with the CLI's ``--optimizer``).
        weight_decay: AdamW (decoupled) weight decay (ignored with ``--optimizer``).
        betas: AdamW betas (ignored with ``--optimizer``).
        warmup_steps: Linear learning-rate warm-up, in optimizer steps.
        trainable: Train only parameters whose name contains one of these. For example
            ``["mlp"]``; the others are frozen.
        zero_shot_tasks: Zero-shot tasks to score at the end of test. For example
            ``["arc_easy", "piqa"]``, with
            :func:`~optishear_lightning.evaluation.zero_shot_accuracy`; needs
            ``zero_shot_dir``.
        zero_shot_dir: Folder with the zero-shot task files.
        zero_shot_limit: Examples per zero-shot task (null: all).
        attn_implementation: Attention implementation, passed to ``from_pretrained``.

    Example:
        >>> module = CausalLMModule("smollm2-135m", learning_rate=2e-5)  # doctest: +SKIP
        >>> trainer = Trainer(callbacks=[OptiShearCallback(method="wanda")])  # doctest: +SKIP
        >>> trainer.fit(module, datamodule=TextDataModule("smollm2-135m"))  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str | nn.Module = "smollm2-135m",
        dtype: str | None = "float32",
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        trainable: Sequence[str] | None = None,
        zero_shot_tasks: Sequence[str] | None = None,
        zero_shot_dir: str | None = None,
        zero_shot_limit: int | None = None,
        attn_implementation: str | None = None,
    ):
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
        if weight_decay < 0 or warmup_steps < 0:
            raise ValueError("weight_decay and warmup_steps must be >= 0.")
        if zero_shot_tasks and not zero_shot_dir:
            raise ValueError("zero_shot_tasks needs zero_shot_dir (the folder of the task files).")
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        if isinstance(model, nn.Module):
            self.model = model
            self.model_name = getattr(getattr(model, "config", None), "optishear_model_id", None)
        else:
            self.model = load_model(
                model, dtype=dtype, device=None, attn_implementation=attn_implementation
            )
            self.model_name = str(model)
        # load_model returns eval mode (for pruning); a LightningModule starts in train mode.
        self.model.train()
        self._tokenizer = None
        if trainable is not None:
            self._freeze_except(list(trainable))
        self.val_ppl = Perplexity()
        self.test_ppl = Perplexity()

    # Model access --------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (loaded on first use; ``None`` for a module given as object)."""
        if self._tokenizer is None and isinstance(self.hparams.get("model"), str):
            self._tokenizer = load_tokenizer(self.hparams["model"])
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._tokenizer = value

    def _freeze_except(self, patterns: list[str]) -> None:
        matched = 0
        for name, param in self.model.named_parameters():
            param.requires_grad_(any(p in name for p in patterns))
            matched += param.requires_grad
        if not matched:
            raise ValueError(f"trainable={patterns} matches no parameter name of the model.")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for ``input_ids``."""
        return self.model(input_ids=input_ids, use_cache=False).logits

    # Steps ---------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids = batch_input_ids(batch)
        loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=ids.shape[0])
        return loss

    def _eval_step(self, batch: Any, metric: Perplexity, stage: str) -> None:
        ids = batch_input_ids(batch)
        logits = self(ids)
        # Upcast before the softmax: half-precision log-probabilities lose the small
        # probabilities that dominate the NLL.
        metric.update(logits[:, :-1].float(), ids[:, 1:])
        self.log(f"{stage}/ppl", metric, prog_bar=True, batch_size=ids.shape[0])

    def on_validation_epoch_start(self) -> None:
        # States reset inside trainer.validate() are inference tensors, which the validation
        # inside a later fit() (no_grad, not inference mode) cannot update: start clean.
        self.val_ppl.reset()

    def on_test_epoch_start(self) -> None:
        self.test_ppl.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_ppl, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_ppl, "test")

    def on_test_epoch_end(self) -> None:
        if not self.hparams.zero_shot_tasks:
            return
        from .evaluation import zero_shot_accuracy

        if self.tokenizer is None:
            raise ValueError("Zero-shot evaluation needs a tokenizer: set module.tokenizer.")
        results = zero_shot_accuracy(
            self.model,
            self.tokenizer,
            self.hparams.zero_shot_dir,
            self.hparams.zero_shot_tasks,
            limit=self.hparams.zero_shot_limit,
            device=self.device,
        )
        for task, scores in results.items():
            self.log(f"test/{task}_acc", scores["acc"], sync_dist=True)
            self.log(f"test/{task}_acc_norm", scores["acc_norm"], sync_dist=True)

    # Optimisation --------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=self.hparams.learning_rate,
            weight_decay=self.hparams.weight_decay,
            betas=tuple(self.hparams.betas),
        )
        warmup = self.hparams.warmup_steps
        if not warmup:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
