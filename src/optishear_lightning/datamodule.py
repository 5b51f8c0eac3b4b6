"""``TextDataModule``: train / val / test / calibration token windows from the engine's sources.

Every split is a tensor of fixed-length token windows built by :mod:`.data`:

- ``train`` and ``calibration``: random windows drawn the way Wanda / SparseGPT draw calibration
  data (:func:`~optishear_lightning.data.calibration_windows`), with different seeds so that
  fine-tuning does not see the calibration windows first;
- ``val`` and ``test``: the evaluation text (:func:`~optishear_lightning.data.evaluation_tokens`)
  cut into consecutive non-overlapping windows -- the perplexity protocol of the literature
  (:func:`~optishear_lightning.data.evaluation_windows`).

``bos_per_window`` starts every window of every split with the BOS token, for the families that
need one at the start of each sequence (Gemma). ``None`` (default) follows the model's family
(:func:`~optishear_lightning.models.needs_bos_per_window`), so the windows of LLaMA and the other
families stay the literature's.

A source is a dataset name (``"c4"``, ``"wikitext2"``, ``"ptb"``), a local ``.jsonl`` /
``.json`` / ``.parquet`` / ``.txt`` file, or an integer token tensor (Python only). ``None``
leaves the split out. ``calibration_dataloader()`` is what
:class:`~optishear_lightning.callback.OptiShearCallback` looks for.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from .data import calibration_windows, check_source, evaluation_tokens, evaluation_windows
from .models import (
    load_config,
    load_tokenizer,
    model_type_of,
    needs_bos_per_window,
    resolve_bos_per_window,
)

__all__ = ["TextDataModule"]

# A pathlib.Path works too; it is left out of the annotation because with os.PathLike in the
# union, jsonargparse turns the CLI's `null` into the string "None" instead of None.
Source = str | torch.Tensor | None


class TextDataModule(LightningDataModule):
    """Token windows for fine-tuning, evaluation and pruning calibration.

    Args:
        tokenizer: model name or path whose tokenizer to use (the CLI links it to the model),
            or a tokenizer object (Python only); ``None`` only with token-tensor sources.
        train_data: source of the training windows.
        val_data: source of the validation text (``None`` = no validation).
        test_data: source of the test text.
        calibration_data: source of the pruning calibration windows; ``None`` or ``"self"``
            leaves calibration to the callback (which then samples text from the model).
        seq_len: training / evaluation window length in tokens.
        train_samples: number of training windows.
        calibration_samples: number of calibration windows (the literature uses 128).
        calibration_seq_len: their length (default ``seq_len``; the literature uses 2048).
        val_windows: keep only the first this many validation windows (``None`` = all).
        test_windows: likewise for test.
        batch_size: training batch size.
        eval_batch_size: validation / test / calibration batch size (default ``batch_size``).
        num_workers: DataLoader workers.
        seed: sampling seed (calibration uses it, training ``seed + 1``).
        text_field: text column of ``.jsonl``/``.json``/``.parquet`` sources.
        bos_per_window: start every window with the tokenizer's BOS token (``[BOS]`` plus
            ``seq_len - 1`` text tokens; token-tensor train/calibration sources are windows
            already and are used as given). ``None`` follows the model's family: the Trainer's
            model when one is attached, else the config of the model named by ``tokenizer``;
            off when neither is known.

    Example:
        >>> dm = TextDataModule("smollm2-135m", train_data="c4")  # doctest: +SKIP
        >>> next(iter(dm.calibration_dataloader())).shape  # doctest: +SKIP
        torch.Size([8, 2048])
    """

    def __init__(
        self,
        tokenizer: str | Any | None = "smollm2-135m",
        train_data: Source = "c4",
        val_data: Source = "wikitext2",
        test_data: Source = "wikitext2",
        calibration_data: Source = "c4",
        seq_len: int = 512,
        train_samples: int = 512,
        calibration_samples: int = 128,
        calibration_seq_len: int | None = None,
        val_windows: int | None = None,
        test_windows: int | None = None,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        text_field: str = "text",
        bos_per_window: bool | None = None,
    ):
        super().__init__()
        if bos_per_window is not None and not isinstance(bos_per_window, bool):
            raise ValueError(f"bos_per_window must be true, false or null, got {bos_per_window!r}.")
        for name, value in (
            ("seq_len", seq_len),
            ("train_samples", train_samples),
            ("calibration_samples", calibration_samples),
            ("batch_size", batch_size),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if seq_len < 2 or (calibration_seq_len is not None and calibration_seq_len < 2):
            raise ValueError("Window lengths must be at least 2 tokens (one next-token target).")
        for name, value in (("val_windows", val_windows), ("test_windows", test_windows)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None (all windows) or >= 1, got {value}.")
        for name, value, role in (
            ("train_data", train_data, "calibration"),
            ("calibration_data", calibration_data, "calibration"),
            ("val_data", val_data, "evaluation"),
            ("test_data", test_data, "evaluation"),
        ):
            try:
                check_source(value, role)
            except (ValueError, FileNotFoundError) as err:
                raise type(err)(f"data.{name}: {err}") from None
        self.save_hyperparameters(
            ignore=[n for n in ("tokenizer",) if not isinstance(tokenizer, (str, type(None)))]
        )
        self._tokenizer_arg = tokenizer
        self._tokenizer = None if isinstance(tokenizer, (str, type(None))) else tokenizer
        self._splits: dict[str, torch.Tensor] = {}
        self._bos: tuple[int | None] | None = None  # (resolved BOS id or None,) once known
        self._family_model: torch.nn.Module | None = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None and isinstance(self._tokenizer_arg, str):
            self._tokenizer = load_tokenizer(self._tokenizer_arg)
        return self._tokenizer

    # Splits --------------------------------------------------------------------------------
    def split(self, name: str) -> torch.Tensor | None:
        """The ``(n, seq_len)`` token windows of ``name`` (built on first use and cached)."""
        if name not in self._splits:
            windows = self._build(name)
            if windows is None:
                return None
            self._splits[name] = windows
        return self._splits[name]

    def bind_model(self, model: torch.nn.Module) -> None:
        """Take the family default of ``bos_per_window`` from ``model`` (before any split).

        Without it the default comes from the Trainer's model when one is attached, else from
        the config of the model named by ``tokenizer`` (a GGUF file takes seconds to read).
        """
        self._family_model = model

    def window_bos_id(self) -> int | None:
        """The BOS id every window starts with, or ``None`` when ``bos_per_window`` is off.

        Resolved once, before any text is read, so a tokenizer without a BOS token fails at
        once (with what to change) rather than after tokenising a corpus.
        """
        if self._bos is None:
            setting = self.hparams.bos_per_window
            family = self._family() if setting is None else None
            tokenizer = self.tokenizer if (setting or needs_bos_per_window(family)) else None
            bos_id = resolve_bos_per_window(
                setting,
                family,
                getattr(tokenizer, "bos_token_id", None),
                setting="data.bos_per_window",
                bos_from="the tokenizer" if tokenizer is not None else "data.tokenizer (None)",
            )
            self._bos = (bos_id,)
        return self._bos[0]

    def _family(self) -> Any:
        """What the family default is read from (see :meth:`bind_model`)."""
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        for candidate in (self._family_model, getattr(module, "model", None), module):
            if model_type_of(candidate) is not None:
                return candidate
        if isinstance(self._tokenizer_arg, str):
            return load_config(self._tokenizer_arg)
        return None

    def _build(self, name: str) -> torch.Tensor | None:
        hp = self.hparams
        if name not in ("train", "calibration", "val", "test"):
            raise ValueError(f"Unknown split {name!r}.")
        source = {
            "train": hp.train_data,
            "calibration": hp.calibration_data,
            "val": hp.val_data,
            "test": hp.test_data,
        }[name]
        if source is None or (
            name == "calibration" and isinstance(source, str) and source in ("self", "generated")
        ):
            return None
        bos_id = self.window_bos_id()
        if name in ("train", "calibration"):
            return calibration_windows(
                source,
                self.tokenizer,
                hp.train_samples if name == "train" else hp.calibration_samples,
                hp.seq_len if name == "train" else (hp.calibration_seq_len or hp.seq_len),
                # Different seeds: fine-tuning must not see the calibration windows first.
                seed=hp.seed + 1 if name == "train" else hp.seed,
                text_field=hp.text_field,
                bos_per_window=bos_id is not None,
            )
        if isinstance(source, torch.Tensor):
            tokens = source.reshape(-1)
        else:
            tokens = evaluation_tokens(
                source, self.tokenizer, seq_len=hp.seq_len, text_field=hp.text_field
            ).reshape(-1)
        limit = hp.val_windows if name == "val" else hp.test_windows
        try:
            return evaluation_windows(tokens, hp.seq_len, limit, bos_token_id=bos_id)
        except ValueError as err:
            raise ValueError(f"The {name} split: {err}") from None

    def setup(self, stage: str) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ())
        for name in wanted:
            self.split(name)

    # Loaders -------------------------------------------------------------------------------
    def _loader(self, name: str, shuffle: bool) -> DataLoader | None:
        windows = self.split(name)
        if windows is None:
            return None
        size = (
            self.hparams.batch_size
            if name == "train"
            else (self.hparams.eval_batch_size or self.hparams.batch_size)
        )
        generator = torch.Generator().manual_seed(self.hparams.seed) if shuffle else None
        return DataLoader(
            windows,
            batch_size=size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", shuffle=True)
        if loader is None:
            raise ValueError("train_data is None: give a training source to fit.")
        return loader

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False) or []

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", shuffle=False) or []

    def calibration_dataloader(self) -> DataLoader | None:
        """Calibration windows for pruning (``None`` = let the callback generate them)."""
        return self._loader("calibration", shuffle=False)
