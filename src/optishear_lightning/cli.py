"""The ``optishear`` command: LightningCLI with ``fit``, ``validate``, ``test`` and ``prune``.

``prune`` calibrates, searches and prunes (no training), validates the pruned model and exports
it; ``fit`` prunes at the start of training (or at ``optishear.prune_on``/``prune_at``) and
fine-tunes with the masks kept; ``validate`` and ``test`` evaluate the model as loaded and say
that the pruning settings are not applied. The
:class:`~optishear_lightning.callback.OptiShearCallback` is configured under the ``optishear:``
key (or, equivalently, listed once under ``trainer.callbacks``); the model (``model:``) is a
:class:`~optishear_lightning.module.CausalLMModule` loaded by name or path and the data
(``data:``) a :class:`~optishear_lightning.datamodule.TextDataModule`, whose tokenizer follows
``model.model``. Other callbacks and loggers go under ``trainer:`` with
``class_path``/``init_args``, as in any LightningCLI. Runs are seeded explicitly
(``seed_everything: 0`` unless set). Examples::

    optishear prune --config examples/configs/wanda_smollm2.yaml
    optishear prune --optishear.method optishear --optishear.sparsity 0.6 --print_config
    optishear fit --config examples/configs/prune_finetune_smollm2.yaml

To use the CLI with your own LightningModule / DataModule, build it in your own script:
``OptiShearCLI(MyModule, MyDataModule)``; the module needs only a Hugging Face model under
``self.model`` (or ``--optishear.model_attr``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from .callback import OptiShearCallback
from .cli_help import TerminalHelpFormatter
from .datamodule import TextDataModule
from .module import CausalLMModule

__all__ = ["CLICausalLMModule", "CLITextDataModule", "OptiShearCLI", "OptiShearTrainer", "main"]


class CLICausalLMModule(CausalLMModule):
    """Fine-tune and evaluate a Hugging Face causal LM loaded by name or path.

    The command line's ``model:``: a :class:`CausalLMModule` whose ``model`` is text (a
    built-in name, a hub id, a local directory or a GGUF file), so that ``--help`` shows one
    type instead of every ``nn.Module`` subclass. Python code passes an ``nn.Module`` to
    :class:`CausalLMModule` itself.

    Example:
        >>> module = CLICausalLMModule("smollm2-135m", learning_rate=2e-5)  # doctest: +SKIP
    """

    def __init__(self, model: str = "smollm2-135m", **kwargs: Any):
        """Load ``model`` and pass every other setting to :class:`CausalLMModule`.

        Args:
            model: The model to load: a built-in name, hub id, directory or GGUF file.
            **kwargs: the other CausalLMModule settings.
        """
        super().__init__(model, **kwargs)


class CLITextDataModule(TextDataModule):
    """Token windows for calibration, fine-tuning and evaluation, named by text.

    The command line's ``data:``: a :class:`TextDataModule` whose sources and tokenizer are
    text (a dataset name, a file, a directory). Typed as text only because jsonargparse reads
    a path given to a ``str | torch.Tensor`` setting as a config file, so a plain-prose
    ``notes.txt`` would arrive as its own contents instead of its path. Python code passes
    token tensors to :class:`TextDataModule` itself.

    Example:
        >>> dm = CLITextDataModule(calibration_data="notes.txt")  # doctest: +SKIP
    """

    def __init__(
        self,
        tokenizer: str | None = "smollm2-135m",
        train_data: str | None = "c4",
        val_data: str | None = "wikitext2",
        test_data: str | None = "wikitext2",
        calibration_data: str | None = "c4",
        **kwargs: Any,
    ):
        """Pass every setting to :class:`TextDataModule`.

        Args:
            tokenizer: model name or path whose tokenizer to use.
            train_data: source of the training windows.
            val_data: source of the validation text (``None``: no validation).
            test_data: source of the test text.
            calibration_data: source of the calibration windows (``None`` or ``"self"``: the
                callback samples text from the model).
            **kwargs: the other TextDataModule settings.
        """
        super().__init__(
            tokenizer=tokenizer,
            train_data=train_data,
            val_data=val_data,
            test_data=test_data,
            calibration_data=calibration_data,
            **kwargs,
        )


#: Settings the CLI links from data: (their one home), with what to write instead.
_LINKED_FROM_DATA = {
    "optishear.calibration_samples": "data.calibration_samples",
    "optishear.calibration_seq_len": "data.calibration_seq_len",
}


def _moved_settings(args: Sequence[str]) -> list[str]:
    """The linked settings that ``args`` (flags or ``--config`` files) set under optishear:."""
    found = [a.split("=")[0][2:] for a in args if a.split("=")[0][2:] in _LINKED_FROM_DATA]
    configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--config")]
    configs += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in configs:
        try:
            section = (yaml.safe_load(Path(path).read_text()) or {}).get("optishear") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue  # the parser itself reports an unreadable config
        found += [f"optishear.{k}" for k in section if f"optishear.{k}" in _LINKED_FROM_DATA]
    return found


class OptiShearTrainer(Trainer):
    """A Lightning Trainer with a ``prune`` entry point next to ``fit``."""

    def prune(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        evaluate_dense: bool = False,
    ) -> dict[str, Any]:
        """Prune the model with the Trainer's OptiShearCallback, evaluate, export.

        Calibrate, search (or reuse a saved search) and prune on the Trainer's device, then
        run the validation loop on the pruned model (if the data has a validation split) and
        write the callback's ``export_dir`` (with the measured perplexities in its model card).
        No training; ``prune_on``/``prune_at`` do not apply (it prunes at once). Loggers get
        the dense results as ``dense/<name>`` and the pruned ones as ``pruned/<name>``
        (``dense/val_ppl``, ``pruned/val_ppl``).

        Args:
            model: the LightningModule holding the causal LM.
            datamodule: data with ``calibration_dataloader()`` and ``val_dataloader()``.
            evaluate_dense: also validate the dense model first, for comparison.

        Returns:
            ``{"dense": [...], "pruned": [...], "sparsity": float, "export_dir": str | None}``
            (validation results as ``Trainer.validate`` returns them, e.g. ``val/ppl``).

        Under DDP (``--trainer.devices 2 --trainer.strategy ddp``) every rank takes part:
        the search's candidates are shared across the ranks, the pruned weights and masks
        are broadcast from rank 0, validation runs on every rank's share of the windows and
        rank 0 exports.

        Raises:
            ValueError: no ``OptiShearCallback`` configured, or several devices with a
                strategy other than DDP.
        """
        callback = self._optishear_callback()
        if self.world_size > 1:
            # One process per device, as fit starts them (the launcher re-runs this command
            # for the other ranks); the callback then shares its search across them.
            return self.strategy.launcher.launch(
                self._prune_impl, callback, model, datamodule, evaluate_dense, trainer=self
            )
        return self._prune_impl(callback, model, datamodule, evaluate_dense)

    def _prune_impl(
        self,
        callback: OptiShearCallback,
        model: LightningModule,
        datamodule: LightningDataModule | None,
        evaluate_dense: bool,
    ) -> dict[str, Any]:
        if self.world_size > 1:
            self.strategy.setup_environment()  # the process group, before the shared search
        has_val = datamodule is not None and bool(datamodule.val_dataloader())
        out: dict[str, Any] = {"dense": None, "pruned": None, "export_dir": None}
        if evaluate_dense and has_val:
            with _metrics_renamed(self.loggers, "dense"):
                out["dense"] = self.validate(model, datamodule=datamodule)
        model.to(self.strategy.root_device)
        callback.prune_now(self, model, datamodule)
        out["sparsity"] = callback.masks.sparsity()
        if has_val:
            with _metrics_renamed(self.loggers, "pruned"):
                out["pruned"] = self.validate(model, datamodule=datamodule)
        for stage in ("dense", "pruned"):
            for key, value in (out[stage][0] if out[stage] else {}).items():
                callback.evaluation[_renamed(key, stage)] = float(value)
        exported = callback.export(self, model)
        out["export_dir"] = str(exported) if exported is not None else None
        if out["dense"] and out["pruned"]:
            dense = out["dense"][0].get("val/ppl")
            pruned = out["pruned"][0].get("val/ppl")
            if dense is not None and pruned is not None and self.is_global_zero:
                print(
                    f"validation perplexity: dense {dense:.3f} -> pruned {pruned:.3f} "
                    f"(sparsity {out['sparsity']:.4f})"
                )
        return out

    def _optishear_callback(self) -> OptiShearCallback:
        callbacks = [c for c in self.callbacks if isinstance(c, OptiShearCallback)]
        if len(callbacks) != 1:
            raise ValueError(
                "prune needs exactly one OptiShearCallback in the Trainer's callbacks "
                f"(found {len(callbacks)}); configure it once, under optishear:."
            )
        if self.world_size > 1 and not isinstance(self.strategy, DDPStrategy):
            raise ValueError(
                f"prune on several devices shares the search across DDP ranks; "
                f"{type(self.strategy).__name__} is not supported: set trainer.strategy=ddp "
                "(or trainer.devices=1)."
            )
        return callbacks[0]


def _renamed(key: str, stage: str) -> str:
    """``val/ppl`` -> ``dense/val_ppl`` (``epoch`` stays)."""
    return key if key == "epoch" else f"{stage}/{key.replace('/', '_')}"


@contextmanager
def _metrics_renamed(loggers: list[Any], stage: str) -> Iterator[None]:
    """While active, every logger receives ``stage/<name>`` instead of each metric ``name``.

    Wraps each logger's own ``log_metrics`` (an instance attribute shadowing the method, removed
    afterwards), so it works with any Lightning logger and any LightningModule.
    """
    wrapped = []
    for logger in loggers:
        original = logger.log_metrics

        def log_metrics(metrics: Mapping[str, Any], step: int | None = None, _log=original):
            return _log({_renamed(k, stage): v for k, v in metrics.items()}, step=step)

        logger.log_metrics = log_metrics
        wrapped.append(logger)
    try:
        yield
    finally:
        for logger in wrapped:
            del logger.log_metrics


_EPILOG = (
    "A class-typed option shows a class's own arguments with --KEY.help CLASS (for example "
    "--trainer.logger.help CSVLogger); --print_config prints a complete YAML config."
)


class OptiShearCLI(LightningCLI):
    """LightningCLI with the ``prune`` subcommand and one OptiShearCallback.

    The callback is configured under ``optishear:``; one listed under ``trainer.callbacks``
    instead is used as it is (configuring both is refused). Runs are seeded explicitly
    (``seed_everything`` defaults to 0), ``--help`` is plain text, and settings that a choice
    makes irrelevant are named: ``--optimizer`` replaces the module's AdamW (so
    ``model.learning_rate``, ``weight_decay``, ``betas`` and ``warmup_steps`` are ignored), and
    ``validate``/``test`` do not prune.

    Args:
        model_class: the LightningModule class (default: CausalLMModule, loaded by name on the
            command line).
        datamodule_class: the DataModule class (default: TextDataModule).
        **kwargs: passed to LightningCLI.

    Example:
        >>> OptiShearCLI(args=["prune", "--config", "wanda.yaml"])  # doctest: +SKIP
    """

    def __init__(
        self,
        model_class: type[LightningModule] | None = CausalLMModule,
        datamodule_class: type[LightningDataModule] | None = TextDataModule,
        **kwargs: Any,
    ):
        if model_class is CausalLMModule:
            model_class = CLICausalLMModule  # text on the command line, a short --help
        if datamodule_class is TextDataModule:
            datamodule_class = CLITextDataModule  # a path stays a path (see its docstring)
        kwargs.setdefault("trainer_class", OptiShearTrainer)
        # Resuming (fit --ckpt_path) reuses the run directory: let it rewrite config.yaml.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Seed explicitly (Lightning's default True picks a seed and warns "No seed found").
        kwargs.setdefault("seed_everything_default", 0)
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("formatter_class", TerminalHelpFormatter)
        for name in self.subcommands():
            sub = dict(parser_kwargs.get(name) or {})
            sub.setdefault("formatter_class", parser_kwargs["formatter_class"])
            sub.setdefault("epilog", _EPILOG)
            parser_kwargs[name] = sub
        self._listed_callback = False
        super().__init__(model_class, datamodule_class, parser_kwargs=parser_kwargs, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        base = LightningCLI.subcommands()
        return {
            "fit": base["fit"],
            "validate": base["validate"],
            "test": base["test"],
            "prune": {"model", "datamodule"},
        }

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if _is_text_data(self.datamodule_class):
            argv = list(sys.argv[1:] if args is None else args if isinstance(args, list) else [])
            moved = _moved_settings(argv)
            if moved:
                homes = ", ".join(_LINKED_FROM_DATA[m] for m in moved)
                parser.error(
                    f"{', '.join(moved)}: on the command line the calibration size is set once, "
                    f"under data:; remove it from optishear: and set {homes} instead."
                )
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        # LightningCLI builds the model (a slow load) before the callbacks: check the
        # callback's settings first so a typo fails in a second, before anything is loaded.
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._listed_callback = self._check_callback_configured_once(config)
        if not self._listed_callback:
            OptiShearCallback(**_callback_kwargs(config["optishear"]))
        if _is_text_data(self.datamodule_class) and config.get("data") is not None:
            # Its sources are checked in __init__ (a missing file, an unknown name), and the
            # tokenizer loads lazily: cheap to build now, before the model loads.
            TextDataModule(**(config["data"].as_dict() | {"tokenizer": None}))
        self._warn_ignored_optimizer_settings(config)

    def _check_callback_configured_once(self, config: Any) -> bool:
        """Whether an OptiShearCallback listed under ``trainer.callbacks`` replaces ours.

        Raises:
            ValueError: it is configured twice (listed more than once, or listed while the
                ``optishear:`` section is set too).
        """
        listed = _listed_optishear_callbacks(config)
        if not listed:
            return False
        defaults = self._parser(self.subcommand).get_defaults()
        configured = _configured(config["optishear"].as_dict(), defaults["optishear"].as_dict())
        if len(listed) > 1 or configured:
            raise ValueError(
                "OptiShearCallback is configured more than once ("
                + ("twice under trainer.callbacks" if len(listed) > 1 else "under "
                   "trainer.callbacks and under optishear:")
                + "). Configure it once, under optishear: (move the init_args of the "
                "trainer.callbacks entry there and remove that entry)."
            )  # fmt: skip
        rank_zero_info(
            "OptiShear: using the OptiShearCallback listed under trainer.callbacks (the "
            "optishear: section is left at its defaults and not used)."
        )
        return True

    def _warn_ignored_optimizer_settings(self, config: Any) -> None:
        """Say which module settings an ``--optimizer`` / ``--lr_scheduler`` makes irrelevant."""
        optimizer, scheduler = config.get("optimizer"), config.get("lr_scheduler")
        module = config.get("model")
        if not issubclass(self._model_class, CausalLMModule) or module is None:
            return
        if optimizer is not None:
            name = (
                optimizer.get("class_path", optimizer) if hasattr(optimizer, "get") else optimizer
            )
            rank_zero_warn(
                f"--optimizer {name} replaces {self._model_class.__name__}'s AdamW: "
                f"model.learning_rate={module.get('learning_rate')}, model.weight_decay="
                f"{module.get('weight_decay')}, model.betas={module.get('betas')} and "
                f"model.warmup_steps={module.get('warmup_steps')} are ignored. Set the "
                "optimizer's own arguments instead (e.g. --optimizer.lr), and a warm-up with "
                "--lr_scheduler."
            )
        elif scheduler is not None:
            rank_zero_warn(
                "--lr_scheduler is ignored without --optimizer (LightningCLI attaches a "
                "scheduler only to an optimizer it builds); use model.warmup_steps for the "
                "module's AdamW, or give --optimizer too."
            )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        extra = [
            self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys
        ]
        if self._listed_callback:  # the user's own entry under trainer.callbacks is the one
            extra = [c for c in extra if not isinstance(c, OptiShearCallback)]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        return self._instantiate_trainer(config, extra)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # The data's bos_per_window default follows the model's family: hand it the model just
        # loaded, rather than have it read the model's config again.
        bind = getattr(self.datamodule, "bind_model", None)
        inner = getattr(self.model, "model", None)
        if callable(bind) and isinstance(inner, nn.Module):
            bind(inner)

    def before_validate(self) -> None:
        self._say_not_pruned("validate")

    def before_test(self) -> None:
        self._say_not_pruned("test")

    def _say_not_pruned(self, subcommand: str) -> None:
        """``validate``/``test`` evaluate the model as loaded: say that nothing is pruned."""
        config = self.config[subcommand]
        if self._listed_callback:
            settings = "the OptiShearCallback's settings"
            configured = True
        else:
            section = config["optishear"].as_dict()
            defaults = self._parser(subcommand).get_defaults()["optishear"].as_dict()
            configured = _configured(section, defaults)
            settings = f"the optishear: settings (method={_method_text(section['method'])}, " + (
                f"sparsity={section['sparsity']}, pattern={section['pattern']})"
            )
        message = (
            f"OptiShear: `optishear {subcommand}` evaluates the model as loaded and does not "
            f"prune; {settings} are not applied. To evaluate a pruned model, run "
            "`optishear prune` (prunes, validates and exports), or evaluate an export "
            "(--model.model <export_dir>) or a fit checkpoint (--ckpt_path)."
        )
        (rank_zero_warn if configured else rank_zero_info)(message)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(OptiShearCallback, "optishear")
        if issubclass(self._model_class, CausalLMModule) and _is_text_data(self.datamodule_class):
            parser.link_arguments("model.model", "data.tokenizer")
        if _is_text_data(self.datamodule_class):
            # One home for the calibration size: data:. The callback only uses its own copy
            # when it samples text from the model (calibration_data: self / null).
            parser.link_arguments("data.calibration_samples", "optishear.calibration_samples")
            parser.link_arguments(
                ("data.seq_len", "data.calibration_seq_len"),
                "optishear.calibration_seq_len",
                compute_fn=_calibration_seq_len,
            )


def _configured(section: Mapping[str, Any], defaults: Mapping[str, Any]) -> bool:
    """Whether the user set anything in ``optishear:`` (the values linked from data: aside)."""
    linked = {name.split(".", 1)[1] for name in _LINKED_FROM_DATA}
    return any(section.get(k) != defaults.get(k) for k in section.keys() - linked)


def _calibration_seq_len(seq_len: int, calibration_seq_len: int | None) -> int:
    return calibration_seq_len or seq_len  # TextDataModule's own default


def _is_text_data(datamodule_class: Any) -> bool:
    return isinstance(datamodule_class, type) and issubclass(datamodule_class, TextDataModule)


def _method_text(method: Any) -> str:
    if isinstance(method, Mapping):
        return str(method.get("class_path", method))
    return str(method)


def _import_class(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _callback_kwargs(section: Any) -> dict[str, Any]:
    """The ``optishear:`` section as OptiShearCallback keyword arguments, a ``method`` given as
    ``class_path``/``init_args`` (a MetaMetric) built into its object."""
    kwargs = section.as_dict()
    method = kwargs.get("method")
    if isinstance(method, Mapping) and "class_path" in method:
        kwargs["method"] = _import_class(method["class_path"])(**(method.get("init_args") or {}))
    return kwargs


def _listed_optishear_callbacks(config: Any) -> list[Any]:
    """The ``trainer.callbacks`` entries that are OptiShearCallbacks (class_path specs)."""
    trainer = config.get("trainer")
    callbacks = trainer.get("callbacks") if trainer is not None else None
    if callbacks is None:
        return []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    found = []
    for spec in callbacks:
        path = spec.get("class_path") if hasattr(spec, "get") else None
        if not isinstance(path, str):
            continue
        try:
            cls = _import_class(path)
        except (ImportError, AttributeError, ValueError):
            continue
        if isinstance(cls, type) and issubclass(cls, OptiShearCallback):
            found.append(spec)
    return found


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``optishear`` console script."""
    OptiShearCLI(args=args)


if __name__ == "__main__":
    main()
