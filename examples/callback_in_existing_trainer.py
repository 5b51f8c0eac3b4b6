"""An existing Lightning training script, pruned and sparsely fine-tuned by adding the callback.

The lines marked ``# + OptiShear`` are the whole change (6 lines): the callback prunes the
model when ``fit`` starts (calibrating on ``calibration_dataloader()``), keeps the pruned
weights at zero through every optimizer step and saves the masks in the checkpoints.

    python examples/callback_in_existing_trainer.py --steps 20
"""

from __future__ import annotations

import argparse

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig

from optishear_lightning import OptiShearCallback  # + OptiShear


class MyLM(LightningModule):
    """A user's own module: any Hugging Face causal LM under ``self.model``."""

    def __init__(self, model: torch.nn.Module, data: torch.Tensor):
        super().__init__()
        self.model, self.data = model, data

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=4, shuffle=True)

    def calibration_dataloader(self):  # + OptiShear: what to calibrate on
        return DataLoader(self.data[:16], batch_size=4)  # + OptiShear

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    # A small random LLaMA so the example runs anywhere in seconds; use your own model.
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    data = torch.randint(0, 512, (64, 64))

    pruning = OptiShearCallback(method="wanda", sparsity=0.5)  # + OptiShear
    trainer = Trainer(
        max_steps=args.steps,
        accelerator="auto",
        devices=1,
        logger=False,
        callbacks=[pruning],  # + OptiShear
    )
    trainer.fit(MyLM(model, data))
    print(
        f"sparsity after fine-tuning: {pruning.masks.sparsity():.4f}, "
        f"pruned weights that moved: {pruning.masks.violations()}"
    )


if __name__ == "__main__":
    main()
