"""One-call pruning: ``prune(model, calibration, method="wanda", sparsity=0.5)``.

This module is the engine's public entry point. It validates everything up front, then runs
the sequential calibration pipeline of :mod:`.calibration`, pruning each decoder block with a
method from :mod:`.metrics` as soon as its statistics are known.
"""

from __future__ import annotations

import json
import numbers
import os
import resource
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import LayerStats, run_sequential
from .data import batch_token_ids
from .dispatch import deferred_nan_checks
from .masks import (
    Group,
    SparsityPattern,
    check_group,
    check_pattern_fits,
    parse_pattern,
    validate_sparsity,
)
from .metrics import PruningMethod, get_method
from .models import channel_couplings, find_decoder_blocks, find_prunable_linears
from .permutation import permute_block_channels
from .reconstruction import check_reconstruction, reconstruct_weight

__all__ = [
    "EXPORT_MARKER",
    "CalibrationBatches",
    "PruneResult",
    "as_calibration_batches",
    "check_output_dir",
    "check_token_ids",
    "prune",
    "resolve_block_sparsities",
    "save_pruned_model",
]

SparsitySpec = float | Sequence[float] | Mapping[int, float] | None


@dataclass
class PruneResult:
    """What :func:`prune` did.

    Attributes:
        method: pruning method name.
        metric_formula: the method's score as a formula, if it has one (a searched metric).
        pattern: ``"unstructured"`` or ``"N:M"``.
        group: comparison group of unstructured masks (``"row"`` or ``"layer"``).
        block_sparsity: target sparsity of each decoder block.
        layer_sparsity: achieved fraction of zeros of each pruned linear (fully qualified name).
        overall_sparsity: achieved fraction of zeros over all prunable weights.
        masks: keep masks (``bool``, CPU) by fully qualified weight name, if requested.
        n_calibration_samples: calibration sequences used.
        calibration_seq_len: their length in tokens.
        seconds: wall time of the whole prune.
        peak_memory: ``cuda_bytes``, the peak accelerator memory during the prune (``prune``
            resets CUDA's peak statistics when it starts), and ``cpu_rss_bytes``, the peak
            resident memory of the whole process so far (``ru_maxrss``: it includes anything
            the process did before the prune; run a prune in its own process to isolate it).
    """

    method: str
    pattern: str
    group: str
    block_sparsity: list[float]
    metric_formula: str | None = None
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    overall_sparsity: float = 0.0
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    n_calibration_samples: int = 0
    calibration_seq_len: int = 0
    seconds: float = 0.0
    peak_memory: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (without the masks)."""
        out = asdict(self)
        out.pop("masks")
        return out

    def summary(self) -> str:
        """A short human-readable report."""
        lines = [
            f"method={self.method} pattern={self.pattern} group={self.group} "
            f"overall sparsity={self.overall_sparsity:.4f} time={self.seconds:.1f}s",
        ]
        for name, value in self.peak_memory.items():
            lines.append(f"peak {name}: {value / 2**20:.0f} MiB")
        return "\n".join(lines)


def resolve_block_sparsities(
    sparsity: SparsitySpec, n_blocks: int, pattern: str = "unstructured"
) -> list[float]:
    """Expand a sparsity spec into one ratio per decoder block.

    Args:
        sparsity: one ratio for all blocks, a sequence with one ratio per block, or a mapping
            ``{block_index: ratio}`` covering every block. For N:M patterns leave it ``None``
            (or give the ratio the pattern implies).
        n_blocks: number of decoder blocks.
        pattern: the mask layout.
    """
    pat = parse_pattern(pattern)
    if pat.is_nm:
        implied = pat.sparsity
        if sparsity is not None and not (
            _is_scalar(sparsity) and abs(float(sparsity) - implied) < 1e-9
        ):
            raise ValueError(
                f"The {pat} pattern fixes sparsity at {implied:g}; leave sparsity unset (None) "
                "or use an unstructured pattern for per-block ratios."
            )
        return [implied] * n_blocks
    if sparsity is None:
        raise ValueError("sparsity is required for unstructured pruning, e.g. sparsity=0.5.")
    if isinstance(sparsity, (str, bytes)):
        raise ValueError(
            f"sparsity must be a number, a list with one ratio per block or a {{block: ratio}} "
            f"mapping, not the text {sparsity!r}; write 0.5, not '0.5'."
        )
    if isinstance(sparsity, Mapping):
        by_block = {_block_index(k, n_blocks): v for k, v in sparsity.items()}
        missing = sorted(set(range(n_blocks)) - set(by_block))
        if missing:
            raise ValueError(
                f"Per-block sparsity must name every block 0..{n_blocks - 1}; missing {missing}."
            )
        values = [by_block[k] for k in range(n_blocks)]
    elif _is_scalar(sparsity):
        values = [sparsity] * n_blocks
    else:
        values = list(sparsity)
        if len(values) != n_blocks:
            raise ValueError(
                f"Got {len(values)} per-block sparsities for a model with {n_blocks} decoder "
                "blocks; give one ratio per block."
            )
    return [validate_sparsity(v, f"sparsity of block {i}") for i, v in enumerate(values)]


def _is_scalar(value: Any) -> bool:
    """A real number: Python, NumPy or a one-element tensor (not text, not a bool)."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _block_index(key: Any, n_blocks: int) -> int:
    """A ``{block: ratio}`` key as an int (YAML/JSON may give ``"3"``), or a clear error."""
    text = str(key).strip()
    if isinstance(key, bool) or not (isinstance(key, int) or text.isdigit()):
        raise ValueError(
            f"Per-block sparsity keys are block indices 0..{n_blocks - 1}; got {key!r}."
        )
    index = int(text)
    if index >= n_blocks:
        raise ValueError(f"Per-block sparsity names block {index}; the model has {n_blocks}.")
    return index


class CalibrationBatches(list):
    """Calibration normalised once: int64 ``(batch, seq_len)`` token tensors, ``batch_size``
    rows each (the last of each length may have fewer).

    What :func:`as_calibration_batches` returns, and what flows down from the entry point
    (the callback, ``prune``, the search) to the engine: handed back to
    :func:`as_calibration_batches` with the same ``batch_size``, it is returned as it is.
    """

    def __init__(self, batches: Iterable[torch.Tensor], batch_size: int):
        super().__init__(batches)
        self.batch_size = batch_size


def as_calibration_batches(calibration: Any, batch_size: int = 8) -> CalibrationBatches:
    """Normalise calibration input into a list of ``(batch, seq_len)`` ``input_ids`` tensors.

    Accepts a ``(n, seq_len)`` or ``(seq_len,)`` LongTensor, a sequence of such tensors, or an
    iterable (e.g. a ``DataLoader``) of tensors, dicts with an ``input_ids`` entry or
    ``(input_ids, ...)`` tuples (:func:`~optishear_lightning.data.batch_token_ids`). Calibration
    normalised before with the same ``batch_size`` is returned unchanged.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if isinstance(calibration, CalibrationBatches) and calibration.batch_size == batch_size:
        return calibration
    if isinstance(calibration, torch.Tensor):
        items: Iterable = [calibration]
    elif isinstance(calibration, (str, bytes)) or calibration is None:
        raise TypeError("Pass calibration token ids here; text sources go through prune().")
    else:
        items = calibration
    rows: list[torch.Tensor] = []
    for item in items:
        ids = batch_token_ids(item)
        if ids.numel() == 0:
            raise ValueError(
                f"Calibration item {len(rows)} is empty; every item needs token ids shaped "
                "(batch, seq_len) with seq_len >= 2."
            )
        rows.extend(ids.long())
    if not rows:
        raise ValueError(
            "The calibration set is empty: give at least one sequence of token ids (128 "
            "windows of 2048 tokens is the literature's setting)."
        )
    if rows[0].numel() < 2:
        raise ValueError("Calibration sequences are too short: use at least 2 tokens each.")
    by_len: dict[int, list[torch.Tensor]] = {}
    for row in rows:
        by_len.setdefault(row.numel(), []).append(row)
    batches = []
    for same in by_len.values():
        for start in range(0, len(same), batch_size):
            batches.append(torch.stack(same[start : start + batch_size]))
    return CalibrationBatches(batches, batch_size)


def check_token_ids(batches: Sequence[torch.Tensor], model: nn.Module) -> None:
    """Refuse windows longer than the model's positions and token ids outside its vocabulary
    (they would prune silently on wrong positions, or fail late with a bare ``IndexError``)."""
    if not batches:
        return
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(b.shape[-1] for b in batches)
    if isinstance(limit, int) and longest > limit:
        raise ValueError(
            f"Calibration windows of {longest} tokens are longer than the model's "
            f"max_position_embeddings ({limit}); use seq_len <= {limit}."
        )
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is None:
        return
    low = min(int(b.min()) for b in batches)
    high = max(int(b.max()) for b in batches)
    if low < 0 or high >= vocab:
        raise ValueError(
            f"Calibration token ids span [{low}, {high}], outside the model's vocabulary "
            f"[0, {vocab - 1}]; tokenize the calibration text with the model's own tokenizer."
        )


def _select_linears(
    blocks_name: str, blocks: nn.ModuleList, layers: Callable[[str], bool] | Sequence[str] | None
) -> list[dict[str, nn.Linear]]:
    """Each block's prunable linears that ``layers`` selects (see :func:`prune`)."""
    every = [find_prunable_linears(b) for b in blocks]
    if layers is None:
        return every
    names = [f"{blocks_name}.{i}.{n}" for i, linears in enumerate(every) for n in linears]
    if isinstance(layers, str) or not callable(layers):
        wanted = {layers} if isinstance(layers, str) else set(layers)
        unknown = sorted(wanted - set(names))
        if unknown:
            raise ValueError(
                f"layers names {unknown[:3]}, which are not prunable linears of the model; "
                f"names look like {names[:2]} (fully qualified module names)."
            )
        layers = wanted.__contains__
    selected = [
        {n: lin for n, lin in linears.items() if layers(f"{blocks_name}.{i}.{n}")}
        for i, linears in enumerate(every)
    ]
    if not any(selected):
        raise ValueError(
            f"layers selects none of the model's {len(names)} prunable linears (names look "
            f"like {names[:2]}); select at least one."
        )
    return selected


def _peak_memory(device: torch.device) -> dict[str, int]:
    peak = {"cpu_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        peak["cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak


def prune(
    model: nn.Module,
    calibration: Any = None,
    method: str | PruningMethod = "wanda",
    sparsity: SparsitySpec = 0.5,
    pattern: str = "unstructured",
    group: Group = "row",
    *,
    tokenizer: Any = None,
    n_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    offload: bool | None = None,
    keep_masks: bool = True,
    atomic: bool = True,
    progress: bool = False,
    reconstruct: str | None = None,
    permute: bool = False,
    layers: Callable[[str], bool] | Sequence[str] | None = None,
) -> PruneResult:
    """Prune a causal LM in place, block by block.

    Args:
        model: a Hugging Face causal LM (see :func:`~optishear_lightning.models.load_model`).
        calibration: token ids (a ``(n, seq_len)`` tensor, a list of tensors or a dataloader),
            or a text source for :func:`~optishear_lightning.data.calibration_windows` (a
            dataset name such as ``"c4"``, a local ``.jsonl``/``.txt``/``.parquet`` path), or
            ``None`` to sample calibration text from the model itself. Text sources need
            ``tokenizer``. Ignored by ``magnitude``.
        method: ``"magnitude"``, ``"wanda"``, ``"ria"``, ``"sparsegpt"`` or a
            :class:`~optishear_lightning.metrics.PruningMethod`.
        sparsity: fraction of weights to prune: one ratio, one per block (list), or
            ``{block: ratio}``. ``None`` for N:M patterns.
        pattern: ``"unstructured"``, ``"2:4"``, ``"4:8"``...
        group: comparison group for unstructured masks: ``"row"`` or ``"layer"``.
        tokenizer: needed for text calibration sources.
        n_samples: calibration windows drawn from a text source.
        seq_len: their length.
        seed: their sampling seed.
        batch_size: calibration sequences per forward pass.
        device: where blocks are calibrated (default: the model's device). With the model on
            the CPU and ``device="cuda"``, one block at a time visits the GPU.
        offload: move each block back after use (default: when model and device differ).
        keep_masks: return the keep masks in the result (CPU ``bool`` tensors).
        atomic: keep a CPU copy of each pruned weight until the whole prune succeeds, so that a
            failure (NaN activations in block 17, an interrupt...) restores the dense model.
            Costs CPU memory equal to the prunable weights; turn off for models that do not fit.
        progress: show progress bars.
        reconstruct: after each layer's mask is fixed, update its kept weights to minimise
            ``||WX - ŴX||`` on the calibration inputs: ``"obs"`` (SparseGPT's update on the
            given mask) or ``"lsq"`` (the least-squares optimum for the mask); see
            :mod:`.reconstruction`. Works with every method and pattern (masks stay exact);
            needs calibration data, also for ``magnitude``.
        permute: N:M only: before each block's masks are chosen, permute the input channels
            of the layers that allow it (MLP down projection, attention output projection
            within a head) so that the N:M groups keep more of the method's scores; the
            permutation is folded into the producing layer, so the dense model computes the
            same function and the mask stays a plain N:M mask (see :mod:`.permutation`).
        layers: which linears to prune, by fully qualified module name (as
            :func:`~optishear_lightning.models.named_prunable_linears` names them, e.g.
            ``"model.layers.0.mlp.down_proj"``): a predicate ``layers(name) -> bool`` or a
            sequence of names (an unknown name is an error). ``None`` prunes every linear of
            every decoder block. The others keep their weights; per-block ratios, the layer
            and overall sparsities and the masks cover the selected linears only.

    Returns:
        A :class:`PruneResult`.

    Raises:
        ValueError: bad arguments, found before any weight changes.

    Example:
        >>> model = load_model("smollm2-135m")  # doctest: +SKIP
        >>> tok = load_tokenizer("smollm2-135m")  # doctest: +SKIP
        >>> result = prune(model, "c4", "wanda", 0.5, tokenizer=tok)  # doctest: +SKIP
    """
    pm = get_method(method)
    pat = parse_pattern(pattern)
    reconstruct = check_reconstruction(reconstruct)
    needs_data = pm.needs_activations or reconstruct is not None
    check_group(group, pat)
    if permute and not pat.is_nm:
        raise ValueError(
            "permute=True arranges input channels for N:M groups; with an unstructured "
            "pattern it has nothing to do: set pattern='2:4' (or another N:M) or permute=False."
        )
    blocks_name, blocks = find_decoder_blocks(model)
    ratios = resolve_block_sparsities(sparsity, len(blocks), str(pat))
    linears_per_block = _select_linears(blocks_name, blocks, layers)
    for i, linears in enumerate(linears_per_block):
        for name, lin in linears.items():
            check_pattern_fits(lin.weight.shape, pat, f"{blocks_name}.{i}.{name}")

    batches: list[torch.Tensor] = []
    if needs_data:
        sampling = {"n_samples": n_samples, "seq_len": seq_len, "seed": seed}
        batches = _calibration_batches(
            calibration, pm, reconstruct, model, tokenizer, batch_size, **sampling
        )
    home = next(model.parameters()).device
    run_device = torch.device(device) if device is not None else home
    if run_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run_device)
    result = PruneResult(
        method=pm.name if reconstruct is None else f"{pm.name}+{reconstruct}",
        metric_formula=pm.formula,
        pattern=str(pat),
        group=group,
        block_sparsity=ratios,
        n_calibration_samples=sum(b.shape[0] for b in batches),
        calibration_seq_len=batches[0].shape[1] if batches else 0,
    )
    config = getattr(model, "config", None)
    pruner = _BlockPruner(
        pm, pat, group, ratios, linears_per_block, result, run_device, reconstruct,
        couplings=(lambda linears: channel_couplings(linears, config)) if permute else None,
        atomic=atomic, keep_masks=keep_masks,
    )  # fmt: skip
    started = time.perf_counter()
    try:
        with torch.no_grad():
            if needs_data:
                gram = (lambda n, m: True) if pm.needs_gram or reconstruct else None
                run_sequential(model, batches, pruner, device=run_device, gram_for=gram,
                               offload=offload, progress=progress)  # fmt: skip
            else:
                for i, block in enumerate(blocks):
                    pruner(i, f"{blocks_name}.{i}", block, {})
    except BaseException:
        pruner.restore()
        raise
    result.overall_sparsity = pruner.overall_sparsity()
    result.seconds = time.perf_counter() - started
    result.peak_memory = _peak_memory(run_device)
    return result


def _calibration_batches(
    calibration: Any,
    pm: PruningMethod,
    reconstruct: str | None,
    model: nn.Module,
    tokenizer: Any,
    batch_size: int,
    **sampling: Any,
) -> list[torch.Tensor]:
    """``prune``'s calibration as token batches: given ids, or windows sampled from text."""
    if calibration is None or isinstance(calibration, (str, os.PathLike)):
        if tokenizer is None and not pm.needs_activations:
            raise ValueError(
                f"reconstruct={reconstruct!r} needs calibration data (each layer's inputs), "
                f"also for {pm.name}: pass calibration token ids, or a text source with "
                "tokenizer=..."
            )
        if tokenizer is None:
            raise ValueError(
                "A text calibration source (or self-generated calibration when none is "
                "given) needs the tokenizer: pass tokenizer=..."
            )
        from .data import calibration_windows

        source = "self" if calibration is None else calibration
        calibration = calibration_windows(source, tokenizer, model=model, **sampling)
    batches = as_calibration_batches(calibration, batch_size)
    check_token_ids(batches, model)
    return batches


@dataclass
class _BlockPruner:
    """Prunes the selected linears of one block at a time (``run_sequential``'s callback).

    Keeps a CPU copy of everything it changes when ``atomic``, so that :meth:`restore` can
    put the dense model back after a failure in a later block.
    """

    pm: PruningMethod
    pat: SparsityPattern
    group: Group
    ratios: list[float]
    linears_per_block: list[dict[str, nn.Linear]]
    result: PruneResult
    run_device: torch.device
    reconstruct: str | None
    #: With ``permute``: the channel couplings of a block's linears (None: no permutation).
    couplings: Callable[[dict[str, nn.Linear]], Any] | None = None
    atomic: bool = True
    keep_masks: bool = True
    backups: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)

    def __call__(
        self, index: int, block_name: str, block: nn.Module, stats: dict[str, LayerStats]
    ) -> bool:
        linears = self.linears_per_block[index]
        if self.atomic:
            # Weights and biases: a permutation also moves the producers' biases.
            self.backups.extend(
                (p, p.detach().to("cpu", copy=True))
                for lin in linears.values()
                for p in lin.parameters()
            )
        if self.couplings is not None:
            permute_block_channels(linears, self.couplings(linears), stats,
                                   self.pm.channel_scores, self.pat.n, self.pat.m)  # fmt: skip
        kept: dict[str, torch.Tensor] = {}
        # One device sync per block, not per matrix: the kernels' NaN checks and the kept
        # fractions are read back together at the end.
        with deferred_nan_checks():
            for name, lin in linears.items():
                fqn = f"{block_name}.{name}.weight"
                kept[fqn] = self._prune_linear(fqn, lin, stats.get(name), self.ratios[index])
        if kept:
            fractions = torch.stack([v.to(self.run_device) for v in kept.values()]).tolist()
            for fqn, fraction in zip(kept, fractions, strict=True):
                self.result.layer_sparsity[fqn] = 1.0 - fraction
        return True

    def _prune_linear(
        self, fqn: str, lin: nn.Linear, stats: LayerStats | None, ratio: float
    ) -> torch.Tensor:
        """Prune one linear in place; return its kept fraction (a device scalar)."""
        self.params[fqn] = lin.weight
        dense = lin.weight.detach().clone() if self.reconstruct else None
        keep = self.pm.prune_(lin.weight, stats, ratio, self.pat, self.group)
        if self.reconstruct:
            lin.weight.data.copy_(reconstruct_weight(self.reconstruct, dense, stats.gram, keep))
        if self.keep_masks:
            self.result.masks[fqn] = keep.cpu()
        return keep.float().mean()

    def restore(self) -> None:
        for param, original in self.backups:
            param.data.copy_(original)
        self.backups.clear()

    def overall_sparsity(self) -> float:
        total = sum(p.numel() for p in self.params.values())
        zeros = sum(self.result.layer_sparsity[f] * p.numel() for f, p in self.params.items())
        return zeros / max(total, 1)


EXPORT_MARKER = ".optishear_export"
# Marks a directory as an export of this package: the only kind ``overwrite`` replaces.


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early if ``path`` cannot take an export: call before pruning.

    A missing path is fine. An existing one is refused unless ``overwrite`` is set *and* it is a
    directory that this package exported before (it holds :data:`EXPORT_MARKER`): overwriting
    must never delete a user's own files or a run's checkpoints.
    """
    out = Path(path)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"Output directory {out} already exists; choose a new path or pass "
                "overwrite=True to replace an earlier export."
            )
        if not out.is_dir() or out.is_symlink():
            raise FileExistsError(
                f"{out} exists and is not a directory; overwrite only replaces an earlier "
                "export directory. Choose another path or remove it yourself."
            )
        if not (out / EXPORT_MARKER).is_file():
            raise FileExistsError(
                f"{out} exists and is not an earlier optishear export (no {EXPORT_MARKER} "
                "file), so overwrite=True will not delete it. Choose a new path, or remove "
                "the directory yourself if its contents can go."
            )
    check_writable_parent(out)
    return out


def check_writable_parent(path: str | os.PathLike, what: str = "Output directory") -> None:
    """Fail before any work, not after it, if ``path`` could never be created.

    Args:
        path: the file or directory to be written later.
        what: how the caller names it in the error (its setting, e.g. ``"state_path"``).

    Raises:
        PermissionError: the nearest existing ancestor is a file or not writable.
    """
    path = Path(path)
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{what} {path} cannot be created: {ancestor} is not a writable "
            "directory. Choose a path in a directory you can write to."
        )


def _new_sibling_dir(out: Path, tag: str) -> Path:
    """An empty directory beside ``out``, created with the umask's permissions.

    ``tempfile.mkdtemp`` always makes ``drwx------``, which would leave the export unreadable
    by other users and serving processes after the rename.
    """
    while True:
        candidate = out.parent / f".{out.name}.{tag}-{uuid.uuid4().hex[:12]}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _files_readable_as_umask_allows(directory: Path) -> None:
    """Give every file in ``directory`` the umask's permissions (``0o666 & ~umask``).

    Some writers (safetensors among them) create their files ``-rw-------``. ``directory``
    itself was made with ``mkdir``, so its mode already shows what the umask allows.
    """
    mode = stat.S_IMODE(directory.stat().st_mode) & 0o666
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def save_pruned_model(
    model: nn.Module,
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
    result: PruneResult | None = None,
    overwrite: bool = False,
    card: dict[str, Any] | None = None,
    summary: dict[str, Any] | None = None,
) -> Path:
    """Write a transformers checkpoint (safetensors) that ``from_pretrained`` reloads.

    The directory also holds a model card (``README.md``, see :mod:`.model_card`) and, when
    ``result`` or ``summary`` is given, the prune summary ``optishear_prune.json``. Its
    ``config.json`` has ``use_cache: true``: :func:`~optishear_lightning.models.load_model`
    turns the cache off for pruning and training, which the model in memory keeps.

    The checkpoint is written into a temporary sibling directory and renamed into place only
    once complete, so a crash never leaves a half-written model at ``output_dir``. With
    ``overwrite=True`` an earlier export of this package is replaced (it is moved aside first
    and deleted only after the new one is in place); any other existing path is refused.
    Directories and files get the permissions the process's umask allows.

    Args:
        model: the pruned causal LM.
        output_dir: where to write (must not exist unless ``overwrite``).
        tokenizer: saved beside the model when given.
        result: the :class:`PruneResult` (its summary goes into the JSON and the card).
        overwrite: replace an earlier export of this package.
        card: model card fields (``base_model``, ``method``, ``metric_formula``,
            ``calibration``, ``evaluation``...; see
            :func:`~optishear_lightning.model_card.render_model_card`), over what ``model`` and
            ``result`` tell.
        summary: the prune summary to write as JSON (default: ``result.to_dict()``).

    Example:
        >>> save_pruned_model(model, "pruned", tok, result, card={"evaluation": {"ppl": 9.1}})
        ... # doctest: +SKIP
    """
    from .model_card import card_fields, restore_inference_config, write_model_card

    out = check_output_dir(output_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling_dir(out, "tmp")
    old: Path | None = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        restore_inference_config(tmp / "config.json")
        summary = summary if summary is not None else (result.to_dict() if result else None)
        if summary is not None:
            (tmp / "optishear_prune.json").write_text(json.dumps(summary, indent=2))
        write_model_card(tmp, card_fields(model, result, summary, card))
        (tmp / EXPORT_MARKER).write_text(json.dumps({"package": "optishear-lightning"}) + "\n")
        _files_readable_as_umask_allows(tmp)
        if out.exists():
            check_output_dir(out, overwrite)  # still an export of ours, checked again here
            old = _new_sibling_dir(out, "old")
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out
