"""Fit a tiny model with OptiShearCallback under DDP (2 CPU processes, gloo); save the masks.

Run by tests/test_ddp.py as ``python tests/scripts/ddp_masks.py OUT_DIR METHOD``; Lightning
re-launches this script for rank 1.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from transformers import LlamaConfig, LlamaForCausalLM

from optishear_lightning.callback import OptiShearCallback
from optishear_lightning.datamodule import TextDataModule
from optishear_lightning.models import named_prunable_linears
from optishear_lightning.module import CausalLMModule
from optishear_lightning.search import SearchConfig

warnings.filterwarnings("ignore")


def main() -> None:
    out, method = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    # Each rank seeds differently on purpose: the callback must still give identical masks.
    rank_seed = int(__import__("os").environ.get("LOCAL_RANK", "0"))
    torch.manual_seed(rank_seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    # Calibration differs per rank too: only rank 0's is used.
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(rank_seed))
    data = TextDataModule(
        None,
        train_data=torch.randint(0, 128, (16, 32), generator=gen),
        val_data=None,
        test_data=None,
        calibration_data=calib,
        seq_len=32,
        batch_size=2,
    )
    callback = OptiShearCallback(
        method=method,
        sparsity=0.5,
        search=SearchConfig(
            budget=6,
            pop_size=4,
            proxy_blocks=1,
            metric_topk=1,
            objective_samples=2,
            objective_seq_len=16,
            validation_samples=2,
        ),
        progress=False,
        save_dir=str(out),
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=3,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(CausalLMModule(model, learning_rate=1e-2), datamodule=data)
    weights = {n: lin.weight.detach().clone() for n, lin in named_prunable_linears(model).items()}
    masks = {n: callback.masks.keep_mask(n).clone() for n in callback.masks.names}
    found = callback.found.to_dict() if callback.found is not None else None
    torch.save(
        {"masks": masks, "weights": weights, "violations": callback.masks.violations(),
         "history": found["history"] if found else None},
        out / f"rank{trainer.global_rank}.pt",
    )  # fmt: skip


if __name__ == "__main__":
    main()
