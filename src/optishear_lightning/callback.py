"""``OptiShearCallback``: prune a LightningModule's causal LM during ``fit``, keep it sparse.

Thin glue over the engine (:func:`~optishear_lightning.pruning.prune`) and the search
(:func:`~optishear_lightning.search.optishear_prune`):

1. When fitting starts (``prune_on="fit_start"``, default), or at the start of epoch / global
   step ``prune_at`` (``prune_on="epoch"`` / ``"step"``): take calibration batches (the
   LightningModule's ``calibration_dataloader()``, else the datamodule's, else the loader given
   to the callback, else text sampled from the model), search (``method="optishear"``) or reuse
   a saved ``SearchResult``, prune the selected linears (``include``/``exclude``), log the
   search through the Trainer's loggers and save the ``SearchResult`` beside the checkpoints.
   Under DDP a search is shared: every rank evaluates its share of the candidates
   (:mod:`.search.distributed`) and prunes its replica the same way; fixed methods run on rank
   0 alone. Either way rank 0 then broadcasts the pruned weights and masks, so every rank holds
   identical masks.
2. While training: the gradients of pruned weights are zeroed before gradient clipping and the
   optimizer step, and the pruned weights are re-zeroed after every optimizer step (see
   :mod:`.sparse_masks`), so they stay exactly zero under any precision, accumulation or
   clipping setting.
3. Checkpoints carry the bit-packed masks, the ``SearchResult`` and the prune summary (by fully
   qualified parameter name); ``trainer.fit(ckpt_path=...)`` resumes with the same masks and no
   new search. ``export_dir`` writes a plain transformers checkpoint with a model card at the end
   of fitting, and ``push_to_hub`` uploads it.

``verbose`` follows Lightning's ``ModelPruning``: 0 prints nothing, 1 the summary and where
every artifact went, 2 also a per-layer table and per-layer sparsity in the loggers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn

from .callback_settings import (
    check_calibration,
    check_globs,
    check_hub,
    check_method,
    check_resumed_masks,
    check_schedule,
    check_search,
    check_sparsity,
    checked_config,
    same_sparsity,
)
from .data import batch_token_ids
from .loggers import layer_table, log_images, log_metrics, print_rich
from .masks import check_group, parse_pattern
from .metrics import PruningMethod, get_method
from .models import find_decoder_blocks, named_prunable_linears
from .pruning import (
    EXPORT_MARKER,
    as_calibration_batches,
    check_output_dir,
    check_token_ids,
    prune,
    resolve_block_sparsities,
    save_pruned_model,
)
from .reconstruction import Reconstruction
from .search.config import SearchConfig
from .sparse_masks import SparseMasks

__all__ = ["MethodName", "OptiShearCallback", "PatternName"]

SEARCH_FILE = "optishear_search.json"
STATE_FILE = "optishear_search_state.json"
PLOTS_DIR = "optishear_plots"
_STATE_VERSION = 1
_SHARDED_STRATEGIES = {"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"}

MethodName = Literal["optishear", "magnitude", "wanda", "ria", "sparsegpt"]
"""The built-in method names (``register_metric`` adds more)."""
PatternName = Literal["unstructured", "2:4", "4:8"]
"""Common mask layouts; any ``"N:M"`` works."""
SparsitySpec = float | list[float] | dict[int, float] | None


class OptiShearCallback(Callback):
    """Prune the model when fitting starts (or later) and keep the masks through fine-tuning.

    Args:
        method: Pruning method, by name or as a PruningMethod. "optishear" searches a metric
            and per-block ratios; "magnitude", "wanda", "ria", "sparsegpt" (or a name
            registered with ``register_metric``) prune with that method; a PruningMethod
            object such as a hand-made or saved MetaMetric is applied as it is (in YAML:
            ``class_path: optishear_lightning.search.MetaMetric`` with ``init_args``).
        sparsity: Target sparsity (null for N:M). One ratio, a list with one ratio per
            decoder block, or a ``{block: ratio}`` mapping covering every block (checked
            against the model's block count before any weight changes).
        pattern: Mask layout: unstructured or N:M. N:M keeps N of every M weights along the
            input dimension (2:4, 4:8...).
        group: Comparison group of unstructured masks. "row": each output row; "layer": the
            whole matrix.
        search_result: A saved search to reuse instead of searching. An
            ``optishear_search.json``; with an engine method, that method is applied with the
            saved ratios.
        search: The search settings (SearchConfig). In YAML a mapping under ``search:``; on
            the command line ``--optishear.search.budget 100``.
        reconstruct: Update the kept weights after each mask. "obs": SparseGPT's update on the
            mask; "lsq": the least-squares optimum (see ``optishear_lightning.reconstruction``).
        permute: N:M only: permute input channels before choosing masks. Folded into the
            producing layers, so the dense model computes the same function.
        calibration_samples: Calibration sequences to use (null: all). Also how many are
            generated when there is no calibration loader.
        calibration_seq_len: Length of generated calibration text. Loaders keep theirs.
        calibration_batch_size: Sequences per calibration forward pass.
        calibration_dataloader: A loader of token ids (Python only). Used when neither the
            LightningModule nor the datamodule has ``calibration_dataloader()``.
        seed: Search seed (and of generated calibration text).
        keep_masks: Keep pruned weights at zero while training (sparse fine-tuning).
        save_dir: Where the search result and state go. Default: the checkpoint directory,
            else the Trainer's ``default_root_dir``.
        save_plots: Also plot the search (PNG) and send the plots to image loggers.
            Pareto front and per-block ratios, written under ``save_dir`` and sent to
            TensorBoard, W&B, MLflow or Comet when one of them is a logger.
        export_dir: Export the final model here at the end of fitting. A transformers
            checkpoint (safetensors) with a model card ``README.md`` and
            ``optishear_prune.json``; must not exist yet unless ``overwrite_export``.
        overwrite_export: Replace an earlier export of this package at export_dir.
        model_attr: Where the Hugging Face model is in the LightningModule. An attribute path;
            default: ``model`` if it exists, else its first ``PreTrainedModel``.
        progress: Progress bars (Rich) and a summary table during calibration and the search.
            ``None`` (default) follows the Trainer: shown on rank zero when it has a progress
            bar (``enable_progress_bar=True``), hidden when it does not.
        include: Prune only linears matching one of these globs (default: all).
            ``fnmatch`` on fully qualified names such as ``model.layers.0.mlp.down_proj``, as
            ``named_prunable_linears`` gives them.
        exclude: Do not prune linears matching one of these globs. Applied after
            ``include``; a pattern that matches nothing is an error.
        prune_on: When to prune during fit. "fit_start" (default), or at the start of epoch
            ``prune_at`` ("epoch") or of global step ``prune_at`` ("step"), then fine-tune on
            with the masks. ``optishear prune`` prunes at once.
        prune_at: The epoch or global step to prune at (see prune_on).
        verbose: 0 silent, 1 summary and artifact paths, 2 also per-layer sparsity. As in
            Lightning's ``ModelPruning``: 2 prints a per-layer table (layer, method, target,
            achieved) and logs ``optishear/sparsity/<layer>`` to the loggers.
        push_to_hub: Upload the export to this Hub repo (user/name). Needs ``export_dir``
            and a Hub token; uses ``huggingface_hub``'s ``create_repo``/``upload_folder``.

    Raises:
        ValueError: an unknown method, pattern or reconstruction, a sparsity outside [0, 1),
            a per-block sparsity with the search, search ratios ``sparsity +- delta`` outside
            [0, 1), include/exclude with the search, a bad prune_on/prune_at/verbose, a
            push_to_hub without export_dir, a missing ``search_result`` file, or an
            ``export_dir`` that exists -- all in ``__init__``.

    Example:
        >>> trainer = Trainer(max_steps=100, callbacks=[OptiShearCallback(sparsity=0.5)])
        >>> trainer.fit(module, datamodule=datamodule)  # doctest: +SKIP
        >>> OptiShearCallback("wanda", [0.4, 0.6], exclude=["*.self_attn.*"], verbose=2)
        ... # doctest: +SKIP
    """

    def __init__(
        self,
        method: MethodName | str | PruningMethod = "optishear",
        sparsity: SparsitySpec = 0.5,
        pattern: PatternName | str = "unstructured",
        group: Literal["row", "layer"] = "row",
        search_result: str | None = None,
        search: SearchConfig | None = None,
        reconstruct: Reconstruction | None = None,
        permute: bool = False,
        calibration_samples: int | None = 128,
        calibration_seq_len: int = 2048,
        calibration_batch_size: int = 8,
        calibration_dataloader: Iterable | None = None,
        seed: int = 0,
        keep_masks: bool = True,
        save_dir: str | None = None,
        save_plots: bool = False,
        export_dir: str | None = None,
        overwrite_export: bool = False,
        model_attr: str | None = None,
        progress: bool | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        prune_on: Literal["fit_start", "epoch", "step"] = "fit_start",
        prune_at: int = 0,
        verbose: Literal[0, 1, 2] = 1,
        push_to_hub: str | None = None,
    ):
        super().__init__()
        method = check_method(method)
        pat = parse_pattern(pattern)
        check_group(group, pat)
        searching = method == "optishear" and search_result is None
        sparsity = check_sparsity(sparsity, pat, method, search_result)
        search = check_search(search, reconstruct, permute, pat)
        if searching and search.search_ratios and not pat.is_nm:
            search.ratio_candidates(sparsity)  # fails now, not after the model has loaded
        include, exclude = check_globs("include", include), check_globs("exclude", exclude)
        if (include or exclude) and (method == "optishear" or search_result is not None):
            raise ValueError(
                "include/exclude select layers for an engine method (wanda, ria, sparsegpt, "
                "magnitude or a PruningMethod); the OptiShear search and a saved search prune "
                "every layer. Drop include/exclude or choose another method."
            )
        check_schedule(prune_on, prune_at, verbose)
        check_calibration(calibration_samples, calibration_seq_len, calibration_batch_size)
        if search_result is not None and not Path(search_result).is_file():
            raise FileNotFoundError(
                f"search_result {search_result} does not exist; give the path of a JSON file "
                "saved by a previous search (optishear_search.json)."
            )
        check_hub(push_to_hub, export_dir)
        if export_dir is not None:
            check_output_dir(export_dir, overwrite_export)

        self.method = method
        self.sparsity = sparsity
        self.pattern = str(pat)
        self.group = group
        self.search_result = search_result
        self.search = search
        self.reconstruct = search.reconstruct
        self.permute = bool(permute)
        self.calibration_samples = calibration_samples
        self.calibration_seq_len = calibration_seq_len
        self.calibration_batch_size = calibration_batch_size
        self.calibration_loader = calibration_dataloader
        self.seed = seed
        self.keep_masks = keep_masks
        self.save_dir = save_dir
        self.save_plots = save_plots
        self.export_dir = export_dir
        self.overwrite_export = overwrite_export
        self.model_attr = model_attr
        self.progress = progress
        self.include, self.exclude = include, exclude
        self.prune_on, self.prune_at = prune_on, int(prune_at)
        self.verbose = int(verbose)
        self.push_to_hub = push_to_hub

        self.masks: SparseMasks | None = None
        self.found = None  # SearchResult of this run (or of the checkpoint)
        self.summary: dict[str, Any] = {}
        self.evaluation: dict[str, float] = {}  # measured results for the model card
        self.artifacts: dict[str, str] = {}  # what was written where (printed once each)
        self._restored: dict[str, Any] | None = None
        self._hooks: list[Any] = []
        self._calibration_source: str | None = None

    @property
    def method_name(self) -> str:
        """The method's name: ``"optishear"``, an engine name, or the object's ``name``."""
        return self.method if isinstance(self.method, str) else self.method.name

    # Configuration identity ----------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {
            "method": self.method_name,
            "sparsity": self.sparsity,
            "pattern": self.pattern,
            "group": self.group,
            "include": self.include,
            "exclude": self.exclude,
        }

    # Lightning hooks -----------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Sharded strategies split each weight across ranks; the masks and the pruning here
        # assume every rank holds whole weights (single device, DDP). Fail before any work.
        name = type(trainer.strategy).__name__
        if name in _SHARDED_STRATEGIES:
            raise ValueError(
                f"OptiShearCallback supports single-device and DDP training, not {name} "
                "(weights sharded across ranks); use strategy='ddp', or prune first with "
                "`optishear prune` and fine-tune the exported model."
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._restored is not None:
            self._resume(pl_module, self._restored)
            self._restored = None
        elif self.masks is None and self.prune_on == "fit_start":
            if trainer.ckpt_path is not None:
                rank_zero_warn(
                    f"OptiShear: the checkpoint {trainer.ckpt_path} holds no OptiShearCallback "
                    "state, so its weights (perhaps already fine-tuned) are pruned again from "
                    "scratch. Resume from a checkpoint written with this callback to keep its "
                    "masks."
                )
            self.prune_now(trainer, pl_module)
        if self.masks is not None:
            self.masks.sync_devices()
            self.masks.apply_()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._register_hooks(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.prune_on == "epoch" and trainer.current_epoch >= self.prune_at:
            self._prune_while_training(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.prune_on == "step" and trainer.global_step >= self.prune_at:
            self._prune_while_training(trainer, pl_module)

    def _prune_while_training(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Prune once (``prune_on`` epoch/step), then keep the masks from the next step on."""
        if self.masks is not None:
            return
        self.prune_now(trainer, pl_module)
        self.masks.sync_devices()
        self.masks.apply_()
        self._register_hooks(trainer)

    def _register_hooks(self, trainer: Trainer) -> None:
        if not self.keep_masks or self.masks is None:
            return
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            # After every real step (a skipped fp16 step never calls it): re-zero the weights.
            self._hooks.append(optimizer.register_step_post_hook(self._after_step))

    def _after_step(self, *args: Any, **kwargs: Any) -> None:
        self.masks.apply_()

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning calls this after accumulation and AMP unscaling and before clipping.
        if self.keep_masks and self.masks is not None:
            self.masks.mask_gradients_()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        if self.masks is None:
            rank_zero_warn(
                f"OptiShear: training ended before prune_on={self.prune_on!r} prune_at="
                f"{self.prune_at} was reached; the model was not pruned (lower prune_at or "
                "train longer)."
            )
        elif self.keep_masks:
            violations = self.masks.violations()
            self._log(trainer, {"optishear/final_sparsity": self.masks.sparsity()}, step=None)
            if violations:
                rank_zero_warn(f"{violations} pruned weights are no longer zero after training.")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.export_dir is not None and self.masks is not None:
            self.export(trainer, pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # Checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.masks is None:
            return {}
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "masks": self.masks.packed(),
            "search_result": self.found.to_dict() if self.found is not None else None,
            "summary": self.summary,
            # What resuming checks the masks against (flipped bits, dropped entries).
            "layer_sparsity": self.masks.layer_sparsity(),
            "keep_masks": self.keep_masks,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("version") != _STATE_VERSION or "masks" not in state_dict:
            raise ValueError("The checkpoint's OptiShearCallback state is from another version.")
        saved = checked_config(state_dict.get("config"))
        mine = self._config()
        if saved["pattern"] != mine["pattern"] or not same_sparsity(
            saved["sparsity"], mine["sparsity"]
        ):
            raise ValueError(
                f"The checkpoint was pruned to sparsity {saved['sparsity']} ({saved['pattern']}); "
                f"this callback asks for {mine['sparsity']} ({mine['pattern']}). Resume with the "
                "checkpoint's settings, or start a new run (without ckpt_path) to prune again."
            )
        for key in ("include", "exclude"):
            if saved.get(key) != mine[key]:
                raise ValueError(
                    f"The checkpoint pruned the layers selected by {key}={saved.get(key)}; this "
                    f"callback selects {key}={mine[key]}. Resume with the checkpoint's "
                    "selection, or start a new run (without ckpt_path) to prune again."
                )
        self._restored = state_dict

    def _resume(self, pl_module: LightningModule, state: dict[str, Any]) -> None:
        from .search import SearchResult

        masks = SparseMasks.from_packed(pl_module, state["masks"])
        model, prefix = self._find_model(pl_module)
        check_resumed_masks(masks, model, prefix, state, self._layer_filter(model))
        data = state.get("search_result")
        try:
            self.found = SearchResult.from_dict(data) if data else None
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"The checkpoint's OptiShearCallback search_result is malformed ({err}); "
                "resume from another checkpoint, or start a new run to prune again."
            ) from None
        self.masks = masks
        self.summary = dict(state.get("summary") or {})
        saved_method = state["config"]["method"]
        if saved_method != self.method_name:
            rank_zero_info(
                f"OptiShear: the checkpoint was pruned with {saved_method!r}; its masks are kept "
                f"and method={self.method_name!r} is not applied (start a new run to prune "
                "with it)."
            )
        if self.verbose:
            rank_zero_info(
                f"OptiShear: resumed {len(self.masks.names)} masks from the checkpoint "
                f"(sparsity {self.masks.sparsity():.4f}); no new search."
            )

    # Pruning -------------------------------------------------------------------------------
    def prune_now(
        self, trainer: Trainer, pl_module: LightningModule, datamodule: Any = None
    ) -> None:
        """Calibrate, search (or reuse) and prune ``pl_module``'s model; set :attr:`masks`.

        Everything that can be checked is checked before any weight changes: the model and its
        blocks, the saved search result's compatibility, the calibration batches.

        Args:
            trainer: the Trainer (its loggers, ranks and directories are used).
            pl_module: the LightningModule holding the model.
            datamodule: where to look for ``calibration_dataloader()`` when the Trainer has
                no datamodule attached (``OptiShearTrainer.prune`` passes it).
        """
        model, prefix = self._find_model(pl_module)
        saved = self._load_search_result(model)
        blocks_name, blocks = find_decoder_blocks(model)
        # Per-block sparsities and the layer selection: checked now that the model is known.
        resolve_block_sparsities(self.sparsity, len(blocks), self.pattern)
        select = self._layer_filter(model)
        distributed = trainer.world_size > 1 and torch.distributed.is_initialized()
        # A search shares its candidates across the ranks, so every rank takes part in it.
        shared = distributed and self.method == "optishear" and saved is None
        result = masks = None
        if not distributed or trainer.is_global_zero or shared:
            batches = None
            if trainer.is_global_zero:
                batches = self._calibration_batches(trainer, pl_module, model, datamodule)
            if shared:  # rank 0's calibration, as for the fixed methods
                batches, self._calibration_source = trainer.strategy.broadcast(
                    (batches, self._calibration_source), src=0
                )
            result = self._prune_model(trainer, model, batches, saved, select)
            masks = SparseMasks.from_keep_masks(pl_module, result.masks, prefix)
        if distributed:
            masks = self._broadcast(trainer, pl_module, masks)
        self.masks = masks
        self.summary = self._summarise(result)
        self._report(trainer, _layer_targets(result, blocks_name))

    def _summarise(self, result: Any) -> dict[str, Any]:
        """The prune summary: checkpoints carry it, exports write it as JSON."""
        summary: dict[str, Any] = {
            "method": self.method_name,
            "overall_sparsity": self.masks.sparsity(),
            "seconds": result.seconds if result is not None else None,
            "n_calibration_samples": result.n_calibration_samples if result is not None else None,
        }
        if result is None:  # another rank than 0: rank 0 holds the details
            return summary
        from .search.result import describe

        metric = self.found.metric if self.found is not None else get_method(self.method)
        return summary | {
            "engine_method": result.method,
            "metric_formula": describe(metric),
            "pattern": result.pattern,
            "group": result.group,
            "block_sparsity": result.block_sparsity,
            "layer_sparsity": result.layer_sparsity,
            "calibration_seq_len": result.calibration_seq_len,
            "calibration_source": self._calibration_source,
            "include": self.include,
            "exclude": self.exclude,
        }

    def _layer_filter(self, model: nn.Module) -> Callable[[str], bool] | None:
        """The engine's ``layers`` predicate for ``include``/``exclude`` (``None``: all).

        Raises:
            ValueError: a pattern that matches none of the model's prunable linears (a typo
                would otherwise prune what it was meant to skip), or an empty selection.
        """
        if not self.include and not self.exclude:
            return None
        names = list(named_prunable_linears(model))
        for kind, globs in (("include", self.include), ("exclude", self.exclude)):
            for glob in globs or []:
                if not any(fnmatchcase(name, glob) for name in names):
                    raise ValueError(
                        f"{kind} pattern {glob!r} matches none of the model's prunable linears "
                        f"(their names look like {names[:2]}); fix the pattern."
                    )

        def select(name: str) -> bool:
            included = not self.include or any(fnmatchcase(name, g) for g in self.include)
            return included and not any(fnmatchcase(name, g) for g in self.exclude or [])

        if not any(select(name) for name in names):
            raise ValueError(
                f"include={self.include} and exclude={self.exclude} leave none of the model's "
                f"{len(names)} prunable linears to prune; select at least one."
            )
        return select

    def _prune_model(
        self,
        trainer: Trainer,
        model: nn.Module,
        batches: list,
        saved: Any,
        select: Callable[[str], bool] | None,
    ) -> Any:
        from .search import optishear_prune

        pattern = parse_pattern(self.pattern)
        sparsity = None if pattern.is_nm else self.sparsity
        common = dict(batch_size=self.calibration_batch_size, progress=self._progress(trainer))
        if self.method == "optishear" or saved is not None:
            save_dir = self._save_dir(trainer)
            state_path = None
            if saved is None and trainer.is_global_zero:
                save_dir.mkdir(parents=True, exist_ok=True)
                state_path = save_dir / STATE_FILE
            result, self.found = optishear_prune(
                model,
                batches,
                self.sparsity,
                self.pattern,
                self.group,
                search_result=saved,
                method=None if self.method == "optishear" else self.method,
                state_path=state_path,
                config=self.search,
                **common,
            )
        else:
            result = prune(
                model,
                batches,
                self.method,
                sparsity,
                self.pattern,
                self.group,
                reconstruct=self.reconstruct,
                permute=self.permute,
                layers=select,
                **common,
            )
        return result

    def _load_search_result(self, model: nn.Module) -> Any:
        if self.search_result is None:
            return None
        from .search import SearchResult

        saved = SearchResult.load(self.search_result)
        saved.check_compatible(model)
        saved.warn_if_other_weights(model)
        if saved.pattern != self.pattern:
            raise ValueError(
                f"{self.search_result} was searched for pattern {saved.pattern}, not "
                f"{self.pattern}; use the same pattern or search again."
            )
        if not parse_pattern(self.pattern).is_nm and not math.isclose(
            saved.target_sparsity, self.sparsity, abs_tol=1e-9
        ):
            raise ValueError(
                f"{self.search_result} targets sparsity {saved.target_sparsity}, not "
                f"{self.sparsity}; use the same target or search again."
            )
        return saved

    def _calibration_batches(
        self, trainer: Trainer, pl_module: LightningModule, model: nn.Module, datamodule: Any
    ) -> list[torch.Tensor]:
        needs_data = self.method == "optishear" or get_method(self.method).needs_activations
        loader, where = None, None
        self._calibration_source = None
        datamodule = datamodule if datamodule is not None else trainer.datamodule
        for owner, name in ((pl_module, "LightningModule"), (datamodule, "datamodule")):
            fn = getattr(owner, "calibration_dataloader", None) if owner is not None else None
            if callable(fn):
                loader, where = fn(), f"the {name}'s calibration_dataloader()"
                if loader is not None:
                    break
        if loader is None and self.calibration_loader is not None:
            loader, where = self.calibration_loader, "the callback's calibration_dataloader"
        if loader is None:
            if not needs_data:
                return []
            from .data import calibration_windows

            n = self.calibration_samples or 128
            self._calibration_source = "text sampled from the model itself"
            rank_zero_info(
                f"OptiShear: no calibration_dataloader found; sampling {n} x "
                f"{self.calibration_seq_len} tokens of calibration text from the model itself."
            )
            return as_calibration_batches(
                calibration_windows(
                    "self", None, n, self.calibration_seq_len, seed=self.seed, model=model
                ),
                self.calibration_batch_size,
            )
        rows: list[torch.Tensor] = []
        limit = self.calibration_samples
        try:
            for batch in loader:  # lazily: a loader is not read past the rows that are used
                rows.extend(batch_token_ids(batch))
                if limit is not None and len(rows) >= limit:
                    break
        except ValueError as err:
            raise ValueError(f"Calibration batches from {where}: {err}") from None
        if limit is not None:
            rows = rows[:limit]
        self._calibration_source = _describe_source(where, datamodule)
        if not rows or rows[0].numel() < 2:
            raise ValueError(
                f"{where} yielded no usable tokens: it must yield token ids shaped "
                "(batch, seq_len >= 2)."
            )
        try:
            check_token_ids(rows, model)
        except ValueError as err:
            raise ValueError(f"{where} yields unusable tokens: {err}") from None
        return as_calibration_batches(rows, self.calibration_batch_size)

    def _broadcast(
        self, trainer: Trainer, pl_module: LightningModule, masks: SparseMasks | None
    ) -> SparseMasks:
        """Give every rank rank 0's ``masks`` and pruned weights (SparseGPT also changes values).

        ``masks`` is rank 0's (``None`` elsewhere); every rank returns the same masks.
        """
        from .search import SearchResult

        payload = None
        if masks is not None:
            payload = {
                "masks": masks.packed(),
                "found": self.found.to_dict() if self.found is not None else None,
            }
        payload = trainer.strategy.broadcast(payload, src=0)
        params = dict(pl_module.named_parameters())
        for name in payload["masks"]:
            torch.distributed.broadcast(params[name].data, src=0)
        if payload["found"] is not None and self.found is None:
            self.found = SearchResult.from_dict(payload["found"])
        return masks if masks is not None else SparseMasks.from_packed(pl_module, payload["masks"])

    # Outputs -------------------------------------------------------------------------------
    def _progress(self, trainer: Trainer) -> bool:
        if self.progress is not None:
            return self.progress
        return trainer.progress_bar_callback is not None and trainer.is_global_zero

    def _save_dir(self, trainer: Trainer) -> Path:
        if self.save_dir is not None:
            return Path(self.save_dir)
        ckpt = trainer.checkpoint_callback
        dirpath = getattr(ckpt, "dirpath", None) if ckpt is not None else None
        return Path(dirpath) if dirpath else Path(trainer.default_root_dir)

    @rank_zero_only
    def _report(self, trainer: Trainer, layer_targets: Mapping[str, float]) -> None:
        """Log the search and the prune; save the SearchResult beside the checkpoints."""
        if self.found is not None:
            self._log_search(trainer)
            save_dir = self._save_dir(trainer)
            save_dir.mkdir(parents=True, exist_ok=True)
            self._announce("search result", self.found.save(save_dir / SEARCH_FILE))
            if (save_dir / STATE_FILE).is_file():
                self._announce("search state", save_dir / STATE_FILE)
            if self.save_plots:
                from .search import save_plots

                paths = save_plots(self.found, save_dir / PLOTS_DIR)
                self._announce("plots", save_dir / PLOTS_DIR)
                images = {f"optishear/{path.stem}": path for path in paths}
                log_images(trainer.loggers, images, trainer.global_step)
        self._log(trainer, {"optishear/sparsity": self.summary["overall_sparsity"]}, step=None)
        if self.verbose:
            rank_zero_info(
                f"OptiShear: pruned with {self.method_name} to sparsity "
                f"{self.summary['overall_sparsity']:.4f} ({self.pattern})."
            )
        if self.verbose >= 2:
            self._report_layers(trainer, layer_targets)

    def _log_search(self, trainer: Trainer) -> None:
        """Every evaluated candidate, every finalist and the chosen ratios, to the loggers."""
        trials = [h for h in self.found.history if "error" in h]
        best = math.inf
        for step, entry in enumerate(trials):
            within = entry["sparsity_gap"] <= self.search.tolerance
            best = min(best, entry["error"]) if within else best
            metrics = {
                "optishear/trial_objective": entry["error"],
                "optishear/trial_sparsity_gap": entry["sparsity_gap"],
            }
            if math.isfinite(best):
                metrics["optishear/best_objective"] = best
            self._log(trainer, metrics, step=step)
        for i, finalist in enumerate(self.found.finalists):
            self._log(trainer, {"optishear/finalist_validation": finalist["validation"]}, i)
        ratios = {f"optishear/ratio_block_{i:02d}": r for i, r in enumerate(self.found.ratios)}
        self._log(trainer, ratios, step=None)

    def _report_layers(self, trainer: Trainer, layer_targets: Mapping[str, float]) -> None:
        """verbose=2: the per-layer table, and per-layer sparsity in the loggers."""
        achieved = {
            name.removesuffix(".weight"): value
            for name, value in (self.summary.get("layer_sparsity") or {}).items()
        }
        targets = {name.removesuffix(".weight"): v for name, v in layer_targets.items()}
        title = f"OptiShear: per-layer sparsity ({self.summary.get('metric_formula')})"
        method = str(self.summary.get("engine_method", self.method_name))
        print_rich([layer_table(title, method, targets, achieved)])
        per_layer = {f"optishear/sparsity/{name}": value for name, value in achieved.items()}
        self._log(trainer, per_layer, step=None)

    def _announce(self, what: str, path: str | Path) -> None:
        """Record where an artifact went; print it the first time (verbose >= 1, rank 0)."""
        path = str(path)
        if self.artifacts.get(what) == path:
            return
        self.artifacts[what] = path
        if self.verbose:
            rank_zero_info(f"OptiShear: {what} written to {path}")

    @staticmethod
    def _log(trainer: Trainer, metrics: dict[str, float], step: int | None) -> None:
        log_metrics(trainer.loggers, metrics, step if step is not None else trainer.global_step)

    def export(self, trainer: Trainer, pl_module: LightningModule) -> Path | None:
        """Write the pruned model to ``export_dir`` (rank 0 only); upload it if ``push_to_hub``.

        The export is ``save_pretrained`` output (safetensors, ``use_cache`` restored), the
        tokenizer when the LightningModule has one, ``optishear_prune.json`` (the prune
        summary) and a model card ``README.md`` (see :mod:`.model_card`).

        Returns:
            The export directory (``None`` on other ranks or without ``export_dir``).
        """
        if self.export_dir is None or not trainer.is_global_zero:
            return None
        model, _ = self._find_model(pl_module)
        tokenizer = getattr(pl_module, "tokenizer", None)
        out = save_pruned_model(
            model,
            self.export_dir,
            tokenizer,
            None,
            self.overwrite_export,
            card=self._card(trainer),
            summary=self.summary | {"config": self._config()},
        )
        self._announce("pruned model", out)
        if self.push_to_hub:
            self._upload(out)
        return out

    def _card(self, trainer: Trainer) -> dict[str, Any]:
        """Model card fields the callback knows beyond the model (see :mod:`.model_card`)."""
        evaluation = dict(self.evaluation)
        if not evaluation and trainer.state.fn == "fit":
            evaluation = {
                f"{key} (last validation of fit, step {trainer.global_step})": float(value)
                for key, value in trainer.callback_metrics.items()
                if key.startswith(("val/", "test/")) and value.numel() == 1
            }
        card: dict[str, Any] = {
            "method": self.method_name,
            "evaluation": evaluation,
            "calibration": {
                "samples": self.summary.get("n_calibration_samples"),
                "seq_len": self.summary.get("calibration_seq_len"),
                "source": self.summary.get("calibration_source"),
            },
            "target_sparsity": self.summary.get("block_sparsity"),
        }
        if self.summary.get("metric_formula"):
            card["metric_formula"] = self.summary["metric_formula"]
        if self.include or self.exclude:
            card["layers"] = f"include {self.include or ['*']}, exclude {self.exclude or []}"
        if self.push_to_hub:
            card["repo_id"] = self.push_to_hub
        return card

    def _upload(self, folder: Path) -> str:
        """Upload ``folder`` to the Hub repo ``push_to_hub`` with huggingface_hub's own API."""
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(self.push_to_hub, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=self.push_to_hub,
            folder_path=str(folder),
            repo_type="model",
            commit_message=f"Upload a model pruned with optishear-lightning ({self.method_name})",
            ignore_patterns=[EXPORT_MARKER],
        )
        url = f"https://huggingface.co/{self.push_to_hub}"
        self._announce("Hub upload", url)
        return url

    # Model discovery -----------------------------------------------------------------------
    def _find_model(self, pl_module: LightningModule) -> tuple[nn.Module, str]:
        """The Hugging Face causal LM inside ``pl_module`` and its parameter-name prefix."""
        if self.model_attr:
            path = self.model_attr
        elif isinstance(getattr(pl_module, "model", None), nn.Module):
            path = "model"
        else:
            from transformers import PreTrainedModel

            path = next(
                (n for n, m in pl_module.named_modules() if n and isinstance(m, PreTrainedModel)),
                None,
            )
            if path is None:
                raise ValueError(
                    f"{type(pl_module).__name__} holds no Hugging Face model: store it as "
                    "self.model or pass model_attr='path.to.model' to OptiShearCallback."
                )
        model = pl_module.get_submodule(path)
        find_decoder_blocks(model)  # a clear error for a model without decoder blocks
        return model, f"{path}."


def _layer_targets(result: Any, blocks_name: str) -> dict[str, float]:
    """Each pruned weight's target ratio (its block's), by the engine's weight name."""
    if result is None:
        return {}
    out = {}
    for name in result.layer_sparsity:
        index = int(name[len(blocks_name) + 1 :].split(".", 1)[0])
        out[name] = result.block_sparsity[index]
    return out


def _describe_source(where: str | None, datamodule: Any) -> str | None:
    """The calibration source for the model card: the datamodule's data name, if it has one."""
    hparams = getattr(datamodule, "hparams", None)
    data = hparams.get("calibration_data") if isinstance(hparams, Mapping) else None
    if where and "datamodule" in where and isinstance(data, str):
        return data
    return where
