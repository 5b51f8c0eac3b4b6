"""Sparse fine-tuning recovers perplexity: prune SmolLM2-135M at 50%, fine-tune with masks kept.

Measures WikiText-2 perplexity (standard protocol: full test set, windows of 2048) of the dense
model, right after pruning, and after ``--steps`` optimizer steps of next-token training on C4
windows with :class:`OptiShearCallback` keeping the pruned weights at zero. Also reports the
sparsity before and after training and how many pruned weights moved (must be 0).

    python benchmarks/bench_finetune.py --device cuda --out benchmarks/results/finetune_h200.md
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from harness import SHARED_DATA as SHARED
from harness import md_table, utc_now, write_json, write_text_atomic
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from optishear_lightning.callback import OptiShearCallback
from optishear_lightning.data import evaluation_tokens
from optishear_lightning.datamodule import TextDataModule
from optishear_lightning.evaluation import perplexity
from optishear_lightning.module import CausalLMModule


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--c4", default=str(SHARED / "c4" / "c4-train.00000-of-01024.head1041.jsonl"))
    p.add_argument("--eval", default=str(SHARED / "wikitext2" / "wiki.test.raw"))
    p.add_argument("--method", default="wanda")
    p.add_argument("--search-result", default=None, help="reuse a saved OptiShear search")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=0, help="0 = the whole test set")
    p.add_argument("--out", required=True, help="Markdown file; a .json is written beside it")
    return p.parse_args()


def build_data(args: argparse.Namespace) -> tuple[Any, Any]:
    """The module and the data module."""
    module = CausalLMModule(args.model, learning_rate=args.lr, warmup_steps=20)
    data = TextDataModule(
        args.model,
        train_data=args.c4,
        val_data=None,
        test_data=None,
        calibration_data=args.c4,
        calibration_samples=args.nsamples,
        calibration_seq_len=args.calib_seqlen,
        seq_len=args.seqlen,
        train_samples=args.steps * args.batch_size,
        batch_size=args.batch_size,
    )
    return module, data


def build_trainer(args: argparse.Namespace, out: Path) -> tuple[Any, Any]:
    """The pruning callback and the ``Trainer``."""
    callback = OptiShearCallback(
        method=args.method,
        sparsity=args.sparsity,
        search_result=args.search_result,
        calibration_batch_size=8,
        progress=False,
        save_dir=str(out.parent / "finetune_run"),
    )
    trainer = Trainer(
        accelerator=accelerator(args),
        devices=1,
        max_steps=args.steps,
        precision=args.precision,
        gradient_clip_val=1.0,
        logger=CSVLogger(out.parent / "finetune_run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    return callback, trainer


def accelerator(args: argparse.Namespace) -> str:
    return "gpu" if str(args.device).startswith("cuda") else "cpu"


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    module, data = build_data(args)
    wiki = evaluation_tokens(args.eval, module.tokenizer, seq_len=args.eval_seqlen)
    windows = args.eval_windows or None

    def ppl() -> float:
        return perplexity(
            module.model,
            wiki,
            args.eval_seqlen,
            batch_size=4,
            max_windows=windows,
            device=args.device,
        )

    module.model.to(args.device)
    dense = ppl()
    callback, trainer = build_trainer(args, out)
    # Prune first (no training) to measure the pruned model, then fine-tune with the same
    # callback: the masks it holds are kept, nothing is pruned again.
    t0 = time.perf_counter()
    module.to(trainer.strategy.root_device)
    callback.prune_now(trainer, module, data)
    prune_s = time.perf_counter() - t0
    pruned = ppl()
    sparsity_pruned = callback.masks.sparsity()
    trainer.callbacks.append(callback)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_s = time.perf_counter() - t0
    module.model.to(args.device)  # Lightning moves the model back to the CPU after fit
    tuned = ppl()
    report = {
        "date": utc_now(),
        "device": torch.cuda.get_device_name()
        if accelerator(args) == "gpu"
        else platform.processor(),
        "torch": str(torch.__version__),
        "args": vars(args),
        "dense_ppl": dense,
        "pruned_ppl": pruned,
        "finetuned_ppl": tuned,
        "sparsity_after_prune": sparsity_pruned,
        "sparsity_after_finetune": callback.masks.sparsity(),
        "pruned_weights_that_moved": callback.masks.violations(),
        "prune_s": prune_s,
        "finetune_s": train_s,
        "tokens_seen": args.steps * args.batch_size * args.seqlen,
    }
    write_json(out.with_suffix(".json"), report, end="")
    text = render(args, report)
    write_text_atomic(out, text)
    print(text)


def render(args: argparse.Namespace, report: dict[str, Any]) -> str:
    """The Markdown report."""
    command = " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None
    )
    windows = args.eval_windows or None
    lines = [
        "# Sparse fine-tuning after pruning (SmolLM2-135M)",
        "",
        f"- Date: {report['date']}; device: {report['device']}; torch {report['torch']}",
        f"- Command: `python benchmarks/bench_finetune.py {command}`",
        f"- Pruning: {args.method} at {args.sparsity} ({args.nsamples} x {args.calib_seqlen} C4 "
        f"calibration), {report['prune_s']:.1f} s",
        f"- Fine-tuning: {args.steps} AdamW steps, batch {args.batch_size} x {args.seqlen} tokens "
        f"of C4 ({report['tokens_seen']:,} tokens), lr {args.lr}, {args.precision}, clip 1.0, "
        f"{report['finetune_s']:.1f} s",
        f"- WikiText-2 test, windows of {args.eval_seqlen}"
        + (f", first {windows}" if windows else ", all windows"),
        "",
        *md_table(
            ("model", "perplexity", "sparsity"),
            [
                ("dense", f"{report['dense_ppl']:.2f}", 0),
                ("pruned", f"{report['pruned_ppl']:.2f}", f"{report['sparsity_after_prune']:.4f}"),
                (
                    "pruned + fine-tuned",
                    f"{report['finetuned_ppl']:.2f}",
                    f"{report['sparsity_after_finetune']:.4f}",
                ),
            ],
            "lrr",
        ),
        "",
        f"Pruned weights that moved during fine-tuning: {report['pruned_weights_that_moved']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
