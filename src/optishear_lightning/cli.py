"""The ``optishear`` command: LightningCLI with ``fit``, ``validate``, ``test`` and ``prune``.

``prune`` calibrates, searches and prunes (no training), validates the pruned model and exports
it; ``fit`` prunes at the start of training and fine-tunes with the masks kept. The
:class:`~optishear_lightning.callback.OptiShearCallback` is always present, configured under the
``optishear:`` key; the model (``model:``) is a :class:`~optishear_lightning.module.CausalLMModule`
and the data (``data:``) a :class:`~optishear_lightning.datamodule.TextDataModule`, whose
tokenizer follows ``model.model``. Other callbacks and loggers go under ``trainer:`` with
``class_path``/``init_args``, as in any LightningCLI. Examples::

    optishear prune --config examples/configs/wanda_smollm2.yaml
    optishear prune --optishear.method optishear --optishear.sparsity 0.6 --print_config
    optishear fit --config examples/configs/prune_finetune_smollm2.yaml

To use the CLI with your own LightningModule / DataModule, build it in your own script:
``OptiShearCLI(MyModule, MyDataModule)``; the module needs only a Hugging Face model under
``self.model`` (or ``--optishear.model_attr``).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .callback import OptiShearCallback
from .datamodule import TextDataModule
from .module import CausalLMModule

__all__ = ["OptiShearCLI", "OptiShearTrainer", "main"]


class OptiShearTrainer(Trainer):
    """A :class:`~lightning.pytorch.Trainer` with a ``prune`` entry point next to ``fit``."""

    def prune(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        evaluate_dense: bool = False,
    ) -> dict[str, Any]:
        """Prune ``model`` with the Trainer's :class:`OptiShearCallback`, evaluate, export.

        Calibrate, search (or reuse a saved search) and prune on the Trainer's device, then
        run the validation loop on the pruned model (if the data has a validation split) and
        write the callback's ``export_dir``. No training.

        Args:
            model: the LightningModule holding the causal LM.
            datamodule: data with ``calibration_dataloader()`` and ``val_dataloader()``.
            evaluate_dense: also validate the dense model first, for comparison.

        Returns:
            ``{"dense": [...], "pruned": [...], "sparsity": float, "export_dir": str | None}``
            (validation results as ``Trainer.validate`` returns them).

        Raises:
            ValueError: no ``OptiShearCallback`` configured, or more than one device.
        """
        callbacks = [c for c in self.callbacks if isinstance(c, OptiShearCallback)]
        if len(callbacks) != 1:
            raise ValueError(
                "prune needs exactly one OptiShearCallback in the Trainer's callbacks."
            )
        if self.num_devices * self.num_nodes > 1:
            raise ValueError(
                "prune runs in one process: set trainer.devices=1 (the search and the masks do "
                "not need several devices; fit can then train on several)."
            )
        callback = callbacks[0]
        has_val = datamodule is not None and bool(datamodule.val_dataloader())
        out: dict[str, Any] = {"dense": None, "pruned": None, "export_dir": None}
        if evaluate_dense and has_val:
            out["dense"] = self.validate(model, datamodule=datamodule)
        model.to(self.strategy.root_device)
        callback.prune_now(self, model, datamodule)
        out["sparsity"] = callback.masks.sparsity()
        if has_val:
            out["pruned"] = self.validate(model, datamodule=datamodule)
        exported = callback.export(self, model)
        out["export_dir"] = str(exported) if exported is not None else None
        if out["dense"] and out["pruned"]:
            dense = out["dense"][0].get("val/ppl")
            pruned = out["pruned"][0].get("val/ppl")
            if dense is not None and pruned is not None:
                print(
                    f"validation perplexity: dense {dense:.3f} -> pruned {pruned:.3f} "
                    f"(sparsity {out['sparsity']:.4f})"
                )
        return out


class OptiShearCLI(LightningCLI):
    """LightningCLI with the ``prune`` subcommand and a forced :class:`OptiShearCallback`.

    Args:
        model_class: the LightningModule class (default :class:`CausalLMModule`).
        datamodule_class: the DataModule class (default :class:`TextDataModule`).
        **kwargs: passed to :class:`~lightning.pytorch.cli.LightningCLI`.
    """

    def __init__(
        self,
        model_class: type[LightningModule] | None = CausalLMModule,
        datamodule_class: type[LightningDataModule] | None = TextDataModule,
        **kwargs: Any,
    ):
        kwargs.setdefault("trainer_class", OptiShearTrainer)
        # Resuming (fit --ckpt_path) reuses the run directory: let it rewrite config.yaml.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(model_class, datamodule_class, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        base = LightningCLI.subcommands()
        return {
            "fit": base["fit"],
            "validate": base["validate"],
            "test": base["test"],
            "prune": {"model", "datamodule"},
        }

    def before_instantiate_classes(self) -> None:
        # LightningCLI builds the model (a slow load) before the callbacks: check the
        # callback's settings first so a typo fails in a second, before anything is loaded.
        config = self.config[self.subcommand] if self.subcommand else self.config
        OptiShearCallback(**config["optishear"].as_dict())
        if self.datamodule_class is TextDataModule and config.get("data") is not None:
            # Its sources are checked in __init__ (a missing file, an unknown name), and the
            # tokenizer loads lazily: cheap to build now, before the model loads.
            TextDataModule(**(config["data"].as_dict() | {"tokenizer": None}))

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(OptiShearCallback, "optishear")
        if self.model_class is CausalLMModule and self.datamodule_class is TextDataModule:
            parser.link_arguments("model.model", "data.tokenizer")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``optishear`` console script."""
    OptiShearCLI(args=args)


if __name__ == "__main__":
    main()
