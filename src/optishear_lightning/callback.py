"""``OptiShearCallback``: prune a LightningModule's causal LM when fitting starts, keep it sparse.

Thin glue over the engine (:func:`~optishear_lightning.pruning.prune`) and the search
(:func:`~optishear_lightning.search.optishear_prune`):

1. ``on_fit_start``: take calibration batches (the LightningModule's
   ``calibration_dataloader()``, else the datamodule's, else the loader given to the callback,
   else text sampled from the model), search (``method="optishear"``) or reuse a saved
   ``SearchResult``, prune, log the search through the Trainer's loggers and save the
   ``SearchResult`` beside the checkpoints. Under DDP, rank 0 prunes and broadcasts the pruned
   weights and masks, so every rank holds identical masks.
2. While training: the gradients of pruned weights are zeroed before gradient clipping and the
   optimizer step, and the pruned weights are re-zeroed after every optimizer step (see
   :mod:`.finetuning`), so they stay exactly zero under any precision, accumulation or
   clipping setting.
3. Checkpoints carry the bit-packed masks, the ``SearchResult`` and the prune summary (by fully
   qualified parameter name); ``trainer.fit(ckpt_path=...)`` resumes with the same masks and no
   new search. ``export_dir`` writes a plain transformers checkpoint at the end of fitting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn

from .finetuning import SparseMasks
from .masks import parse_pattern, validate_sparsity
from .metrics import METHODS
from .models import find_decoder_blocks
from .pruning import (
    as_calibration_batches,
    check_output_dir,
    check_token_ids,
    prune,
    save_pruned_model,
)
from .reconstruction import Reconstruction, check_reconstruction
from .search.config import SearchConfig

__all__ = ["OptiShearCallback"]

SEARCH_FILE = "optishear_search.json"
STATE_FILE = "optishear_search_state.json"
_STATE_VERSION = 1
_SHARDED_STRATEGIES = {"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"}


class OptiShearCallback(Callback):
    """Prune the model at the start of ``fit`` and keep the masks through fine-tuning.

    Args:
        method: ``"optishear"`` (search a metric and per-block ratios), or an engine method:
            ``"wanda"``, ``"ria"``, ``"sparsegpt"``, ``"magnitude"``.
        sparsity: target global sparsity for unstructured patterns (``None`` for N:M).
        pattern: ``"unstructured"`` or ``"N:M"`` (``"2:4"``, ``"4:8"``).
        group: comparison group of unstructured masks (``"row"`` or ``"layer"``).
        search_result: path of a saved ``SearchResult`` to reuse instead of searching; with an
            engine method, that method is applied with the saved ratios.
        search: the search settings (:class:`~optishear_lightning.search.SearchConfig`); in
            YAML, a mapping under ``search:`` (``--optishear.search.budget 100``).
        reconstruct: update the kept weights of every pruned layer to minimise
            ``||WX - ŴX||`` once its mask is fixed: ``"obs"`` or ``"lsq"`` (see
            :mod:`optishear_lightning.reconstruction`); with ``"optishear"`` the search's
            finalists are scored with it too.
        permute: N:M only: permute input channels before N:M selection, folded into the
            producing layers so the dense model is unchanged (see
            :mod:`optishear_lightning.permutation`); with ``"optishear"`` the finalists too.
        calibration_samples: at most this many calibration sequences are used (``None`` =
            all the loader yields); also the number generated when no loader exists.
        calibration_seq_len: length of generated calibration text (loaders keep theirs).
        calibration_batch_size: sequences per calibration forward pass.
        calibration_dataloader: a loader of token ids, used when neither the LightningModule
            nor the datamodule has ``calibration_dataloader()`` (Python only).
        seed: search seed.
        keep_masks: keep pruned weights at zero while training (sparse fine-tuning).
        save_dir: where the ``SearchResult`` (and the resumable search state) go; default:
            the checkpoint directory, else the Trainer's ``default_root_dir``.
        save_plots: also write the Pareto-front and ratio PNGs there.
        export_dir: write the final model there (``save_pretrained``, safetensors) at the end
            of fitting; must not exist yet unless ``overwrite_export``.
        overwrite_export: replace an existing ``export_dir``.
        model_attr: attribute path of the Hugging Face model inside the LightningModule
            (default: ``"model"`` if it exists, else its first ``PreTrainedModel``).
        progress: progress bars and a summary table during the search.

    Raises:
        ValueError: an unknown method, pattern or reconstruction, a sparsity outside [0, 1),
            search ratios ``sparsity +- delta`` outside [0, 1), a missing
            ``search_result`` file, or an ``export_dir`` that exists -- all in ``__init__``.

    Example:
        >>> trainer = Trainer(max_steps=100, callbacks=[OptiShearCallback(sparsity=0.5)])
        >>> trainer.fit(module, datamodule=datamodule)  # doctest: +SKIP
    """

    def __init__(
        self,
        method: str = "optishear",
        sparsity: float | None = 0.5,
        pattern: str = "unstructured",
        group: str = "row",
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
        progress: bool = True,
    ):
        super().__init__()
        method = str(method).lower()
        if method != "optishear" and method not in METHODS:
            raise ValueError(
                f"Unknown pruning method {method!r}; choose 'optishear' or one of "
                f"{sorted(METHODS)}."
            )
        pat = parse_pattern(pattern)
        if pat.is_nm:
            if sparsity is not None and abs(float(sparsity) - pat.sparsity) > 1e-9:
                raise ValueError(
                    f"The {pat} pattern fixes sparsity at {pat.sparsity:g}; set sparsity to "
                    "null/None (or to that value)."
                )
            sparsity = pat.sparsity
        else:
            if sparsity is None:
                raise ValueError("Unstructured pruning needs a sparsity, e.g. sparsity: 0.5.")
            sparsity = validate_sparsity(sparsity, "sparsity")
        if group not in ("row", "layer"):
            raise ValueError(f"Unknown comparison group {group!r}: use 'row' or 'layer'.")
        if pat.is_nm and group != "row":
            raise ValueError("N:M patterns use their own groups; leave group='row'.")
        search = search if search is not None else SearchConfig()
        if isinstance(search, dict):  # a mapping from Python or an older YAML loader
            search = SearchConfig(**search)
        reconstruct = check_reconstruction(reconstruct)
        if search.reconstruct is not None and search.reconstruct != reconstruct:
            raise ValueError(
                f"reconstruct is set on the search ({search.reconstruct!r}) and on the callback "
                f"({reconstruct!r}); set it once, as the callback's reconstruct."
            )
        if permute and not pat.is_nm:
            raise ValueError(
                "permute arranges input channels for N:M groups; with an unstructured pattern "
                "it has nothing to do: set pattern to '2:4' (or another N:M) or permute to false."
            )
        if search.permute and not permute:
            raise ValueError(
                "permute is set on the search; set it once, as the callback's permute."
            )
        search = search.replace(reconstruct=reconstruct, permute=bool(permute))
        searching = method == "optishear" and search_result is None
        if searching and search.search_ratios and not pat.is_nm:
            search.ratio_candidates(sparsity)  # fails now, not after the model has loaded
        for name, value, low in (
            ("calibration_seq_len", calibration_seq_len, 2),
            ("calibration_batch_size", calibration_batch_size, 1),
        ):
            if int(value) < low:
                raise ValueError(f"{name} must be >= {low}, got {value}.")
        if calibration_samples is not None and calibration_samples < 1:
            raise ValueError("calibration_samples must be None (all) or >= 1.")
        if search_result is not None and not Path(search_result).is_file():
            raise FileNotFoundError(
                f"search_result {search_result} does not exist; give the path of a JSON file "
                "saved by a previous search (optishear_search.json)."
            )
        if export_dir is not None:
            check_output_dir(export_dir, overwrite_export)

        self.method = method
        self.sparsity = float(sparsity)
        self.pattern = str(pat)
        self.group = group
        self.search_result = search_result
        self.search = search
        self.reconstruct = reconstruct
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

        self.masks: SparseMasks | None = None
        self.found = None  # SearchResult of this run (or of the checkpoint)
        self.summary: dict[str, Any] = {}
        self._restored: dict[str, Any] | None = None
        self._hooks: list[Any] = []

    # Configuration identity ----------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "sparsity": self.sparsity,
            "pattern": self.pattern,
            "group": self.group,
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
        elif self.masks is None:
            if trainer.ckpt_path is not None:
                rank_zero_warn(
                    f"OptiShear: the checkpoint {trainer.ckpt_path} holds no OptiShearCallback "
                    "state, so its weights (perhaps already fine-tuned) are pruned again from "
                    "scratch. Resume from a checkpoint written with this callback to keep its "
                    "masks."
                )
            self.prune_now(trainer, pl_module)
        self.masks.sync_devices()
        self.masks.apply_()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
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
        if self.masks is not None and self.keep_masks:
            violations = self.masks.violations()
            self._log(trainer, {"optishear/final_sparsity": self.masks.sparsity()}, step=None)
            if violations:
                rank_zero_warn(f"{violations} pruned weights are no longer zero after training.")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.export_dir is not None:
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
        saved = _checked_config(state_dict.get("config"))
        mine = self._config()
        if saved["pattern"] != mine["pattern"] or not math.isclose(
            saved["sparsity"], mine["sparsity"], abs_tol=1e-9
        ):
            raise ValueError(
                f"The checkpoint was pruned to sparsity {saved['sparsity']} ({saved['pattern']}); "
                f"this callback asks for {mine['sparsity']} ({mine['pattern']}). Resume with the "
                "checkpoint's settings, or start a new run (without ckpt_path) to prune again."
            )
        self._restored = state_dict

    def _resume(self, pl_module: LightningModule, state: dict[str, Any]) -> None:
        from .search import SearchResult

        masks = SparseMasks.from_packed(pl_module, state["masks"])
        model, prefix = self._find_model(pl_module)
        _check_resumed_masks(masks, model, prefix, state)
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
        if saved_method != self.method:
            rank_zero_info(
                f"OptiShear: the checkpoint was pruned with {saved_method!r}; its masks are kept "
                f"and method={self.method!r} is not applied (start a new run to prune with it)."
            )
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
        distributed = trainer.world_size > 1 and torch.distributed.is_initialized()
        result = masks = None
        if not distributed or trainer.is_global_zero:
            batches = self._calibration_batches(trainer, pl_module, model, datamodule)
            result = self._prune_model(trainer, model, batches, saved)
            masks = SparseMasks.from_keep_masks(pl_module, result.masks, prefix)
        if distributed:
            masks = self._broadcast(trainer, pl_module, masks)
        self.masks = masks
        self.summary = {
            "method": self.method,
            "overall_sparsity": self.masks.sparsity(),
            "seconds": result.seconds if result is not None else None,
            "n_calibration_samples": result.n_calibration_samples if result is not None else None,
        }
        self._report(trainer)

    def _prune_model(self, trainer: Trainer, model: nn.Module, batches: list, saved: Any) -> Any:
        from .search import optishear_prune

        pattern = parse_pattern(self.pattern)
        sparsity = None if pattern.is_nm else self.sparsity
        common = dict(batch_size=self.calibration_batch_size, progress=self.progress)
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
        needs_data = self.method == "optishear" or METHODS[self.method].needs_activations
        loader, where = None, None
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
            for batch in as_calibration_batches(loader, self.calibration_batch_size):
                rows.extend(batch)
                if limit is not None and len(rows) >= limit:
                    break
        except ValueError as err:
            raise ValueError(f"Calibration batches from {where}: {err}") from None
        if limit is not None:
            rows = rows[:limit]
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
    def _save_dir(self, trainer: Trainer) -> Path:
        if self.save_dir is not None:
            return Path(self.save_dir)
        ckpt = trainer.checkpoint_callback
        dirpath = getattr(ckpt, "dirpath", None) if ckpt is not None else None
        return Path(dirpath) if dirpath else Path(trainer.default_root_dir)

    @rank_zero_only
    def _report(self, trainer: Trainer) -> None:
        """Log the search and the prune; save the SearchResult beside the checkpoints."""
        if self.found is not None:
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
            save_dir = self._save_dir(trainer)
            save_dir.mkdir(parents=True, exist_ok=True)
            self.found.save(save_dir / SEARCH_FILE)
            if self.save_plots:
                from .search import save_plots

                save_plots(self.found, save_dir / "optishear_plots")
            rank_zero_info(f"OptiShear: search result saved to {save_dir / SEARCH_FILE}")
        self._log(trainer, {"optishear/sparsity": self.summary["overall_sparsity"]}, step=None)
        rank_zero_info(
            f"OptiShear: pruned with {self.method} to sparsity "
            f"{self.summary['overall_sparsity']:.4f} ({self.pattern})."
        )

    @staticmethod
    def _log(trainer: Trainer, metrics: dict[str, float], step: int | None) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step if step is not None else trainer.global_step)

    def export(self, trainer: Trainer, pl_module: LightningModule) -> Path | None:
        """Write the pruned model with ``save_pretrained`` to ``export_dir`` (rank 0 only)."""
        if self.export_dir is None or not trainer.is_global_zero:
            return None
        model, _ = self._find_model(pl_module)
        tokenizer = getattr(pl_module, "tokenizer", None)
        out = save_pruned_model(model, self.export_dir, tokenizer, None, self.overwrite_export)
        rank_zero_info(f"OptiShear: pruned model written to {out}")
        return out

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


def _checked_config(config: Any) -> dict[str, Any]:
    """The checkpoint's callback config, or a clear error naming what is wrong with it."""
    fix = "resume from another checkpoint, or start a new run (without ckpt_path)"
    if not isinstance(config, dict) or not {"method", "sparsity", "pattern"} <= set(config):
        raise ValueError(f"The checkpoint's OptiShearCallback state has no valid config; {fix}.")
    try:
        sparsity = float(config["sparsity"])
    except (TypeError, ValueError):
        raise ValueError(
            f"The checkpoint's OptiShearCallback config has sparsity {config['sparsity']!r}, "
            f"not a number; {fix}."
        ) from None
    return dict(config) | {"sparsity": sparsity}


def _check_resumed_masks(
    masks: SparseMasks, model: nn.Module, prefix: str, state: dict[str, Any]
) -> None:
    """Refuse masks that do not match what was saved: a missing layer, flipped bits, or
    weights that are not zero where a mask prunes (while masks were being kept)."""
    from .models import named_prunable_linears

    expected = {f"{prefix}{name}.weight" for name in named_prunable_linears(model)}
    missing = sorted(expected - set(masks.names))
    fix = "the checkpoint is corrupted; resume from another one or start a new run"
    if missing:
        raise ValueError(
            f"The checkpoint has no mask for {missing[:3]}{' ...' if len(missing) > 3 else ''}; "
            f"that layer would train dense while the run reports it pruned: {fix}."
        )
    saved = state.get("layer_sparsity")
    if isinstance(saved, dict):
        for name, value in masks.layer_sparsity().items():
            if name in saved and abs(value - float(saved[name])) > 1e-6:
                raise ValueError(
                    f"The mask of {name} prunes {value:.4f} of its weights, the checkpoint "
                    f"recorded {float(saved[name]):.4f}: {fix}."
                )
    if state.get("keep_masks", True):
        violations = masks.violations()
        if violations:
            raise ValueError(
                f"{violations} weights that the checkpoint's masks prune are not zero: the "
                f"masks do not belong to these weights; {fix}."
            )
