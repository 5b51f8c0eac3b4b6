"""Search results and resumable search state, as JSON files.

A :class:`SearchResult` is everything needed to prune again without searching: the chosen
metric, one ratio per block, and what identifies the model it was found for (block count and
every prunable weight's shape). The search *state* is the history of evaluated candidates; a
search restarted with the same settings replays its (deterministic) trajectory, taking the
objective values of candidates already evaluated from the history instead of recomputing them.
Both files are written to a temporary file and renamed, so an interrupt never truncates them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..metrics import PruningMethod, get_method
from ..models import find_decoder_blocks, named_prunable_linears
from ..pruning import check_writable_parent
from .space import MetaMetric

__all__ = [
    "SearchResult",
    "SearchState",
    "atomic_write_json",
    "layer_shapes",
    "method_from_dict",
    "method_to_dict",
    "tokens_digest",
    "versions",
    "weights_digest",
]

FORMAT_VERSION = 1


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file in the same directory and a rename.

    The temporary file is opened exclusively under a random name rather than with ``mkstemp``,
    which would make every result and state file ``-rw-------`` whatever the umask.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a JSON file path inside it.")
    check_writable_parent(path, "JSON file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "x") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json(path: str | os.PathLike, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{what} file {path} is corrupted or truncated ({err}); delete it (or restore a "
            "good copy) and run again."
        ) from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is not an optishear-lightning {what.lower()} file of format version "
            f"{FORMAT_VERSION}."
        )
    return data


def method_to_dict(method: PruningMethod) -> dict[str, str]:
    """JSON form of a search outcome: a :class:`MetaMetric`'s fields, or a method's name."""
    if isinstance(method, MetaMetric):
        return method.to_dict()
    return {"name": method.name}


def method_from_dict(data: dict) -> PruningMethod:
    """Inverse of :func:`method_to_dict`."""
    if set(data) == {"name"}:
        return get_method(data["name"])
    return MetaMetric.from_dict(data)


def describe(method: PruningMethod) -> str:
    """A metric's formula, or a fixed method's name."""
    return str(method) if isinstance(method, MetaMetric) else method.name


def layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Shape of every prunable weight, by fully qualified name."""
    return {
        f"{name}.weight": list(lin.weight.shape)
        for name, lin in named_prunable_linears(model).items()
    }


def weights_digest(model: nn.Module, samples: int = 65536) -> str:
    """A SHA-256 of an evenly strided sample of every prunable weight (exact values, no
    arithmetic, so the same weights give the same digest on any device)."""
    digest = hashlib.sha256()
    for name, lin in named_prunable_linears(model).items():
        flat = lin.weight.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)]
        digest.update(name.encode())
        digest.update(picked.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokens_digest(rows: torch.Tensor) -> str:
    """A SHA-256 of calibration token ids (as int64)."""
    return hashlib.sha256(rows.to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


def versions() -> dict[str, str]:
    """Versions of the packages that determine a search's numbers."""
    import pymoo
    import torch
    import transformers

    from .._version import __version__

    return {
        "optishear_lightning": __version__,
        "torch": str(torch.__version__),  # a TorchVersion would not load with weights_only
        "transformers": transformers.__version__,
        "pymoo": pymoo.__version__,
        "python": platform.python_version(),
    }


@dataclass
class SearchResult:
    """The outcome of an OptiShear search.

    Attributes:
        metric: the chosen pruning method: a searched :class:`MetaMetric`, or a baseline
            (``wanda``, ``ria``) when one of them validated best.
        ratios: sparsity of each decoder block.
        target_sparsity: the requested global sparsity.
        achieved_sparsity: global sparsity that ``ratios`` give over all prunable weights.
        pattern: mask layout the search ran for.
        group: comparison group.
        candidates: the ratio values each block could take.
        pareto_front: non-dominated ratio candidates, each
            ``{"ratios", "error", "sparsity_gap"}``.
        history: every evaluated candidate with its objectives, in evaluation order.
        seed: the search seed.
        model_id: the model's id (``config.optishear_model_id`` or ``name_or_path``).
        layer_shapes: every prunable weight's shape, to refuse applying to another model.
        settings: the search settings.
        timing: seconds per phase, candidates evaluated, candidates per second.
        versions: package versions.
        finalists: every finalist really pruned and scored: ``method``, ``ratios``,
            ``source`` (``"search"`` or ``"baseline"``), ``objective`` and ``validation``.
        chosen_by: ``"search"``, or ``"baseline"`` when a fixed method won the validation.
        search_pick: what the search alone (objective windows, dense statistics) picked.
        reconstruct: the weight reconstruction the finalists and the final prune use.
        weights_digest: :func:`weights_digest` of the model searched on.
    """

    metric: PruningMethod
    ratios: list[float]
    target_sparsity: float
    achieved_sparsity: float
    pattern: str = "unstructured"
    group: str = "row"
    candidates: list[float] = field(default_factory=list)
    pareto_front: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    seed: int = 0
    model_id: str = ""
    layer_shapes: dict[str, list[int]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    finalists: list[dict] = field(default_factory=list)
    chosen_by: str = "search"
    search_pick: dict[str, Any] = field(default_factory=dict)
    reconstruct: str | None = None
    weights_digest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["metric"] = method_to_dict(self.metric)
        data["metric_formula"] = describe(self.metric)
        data["format_version"] = FORMAT_VERSION
        data["kind"] = "search_result"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchResult:
        data = dict(data)
        for key in ("format_version", "kind", "metric_formula"):
            data.pop(key, None)
        data["metric"] = method_from_dict(data["metric"])
        return cls(**data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result as JSON (atomically) and return the path."""
        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchResult:
        """Read a result written by :meth:`save`.

        Raises:
            ValueError: a corrupted, truncated or foreign file.
        """
        data = _read_json(path, "Search result")
        if data.get("kind") != "search_result":
            raise ValueError(f"{path} is not a search result (kind={data.get('kind')!r}).")
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError) as err:
            raise ValueError(f"Search result {path} is incomplete or malformed: {err}") from None

    def check_compatible(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless ``model`` has the blocks and shapes searched for."""
        shapes = layer_shapes(model)
        _, blocks = find_decoder_blocks(model)
        if len(blocks) != len(self.ratios):
            raise ValueError(
                f"This search result is for a model with {len(self.ratios)} decoder blocks "
                f"({self.model_id}); the given model has {len(blocks)}. Search again for it."
            )
        if shapes != self.layer_shapes:
            diff = sorted(
                k
                for k in shapes.keys() | self.layer_shapes.keys()
                if shapes.get(k) != self.layer_shapes.get(k)
            )
            raise ValueError(
                f"This search result was found for {self.model_id}, whose prunable layers "
                f"differ from the given model's (first differences: {diff[:3]}). Search again "
                "for this model."
            )

    def warn_if_other_weights(self, model: nn.Module) -> None:
        """Warn (not fail) when ``model``'s weights differ from the ones searched on: reusing a
        search across fine-tuned variants of one model is legitimate, but should be seen."""
        if self.weights_digest is not None and weights_digest(model) != self.weights_digest:
            warnings.warn(
                f"This search result was found on other weights than the given model's (same "
                f"shapes as {self.model_id}); its metric and ratios are applied as they are.",
                UserWarning,
                stacklevel=2,
            )

    def summary(self) -> str:
        """Plain-text summary: the metric and the ratio of each block."""
        lines = [
            f"metric: {describe(self.metric)} (chosen by the {self.chosen_by})",
            f"target sparsity {self.target_sparsity:.4f}, achieved {self.achieved_sparsity:.4f}"
            f" ({self.pattern}, {self.group})",
            "block ratios: " + " ".join(f"{r:.2f}" for r in self.ratios),
        ]
        if self.timing:
            lines.append(", ".join(f"{k}={v:.3g}" for k, v in self.timing.items()))
        return "\n".join(lines)


@dataclass
class SearchState:
    """Resumable search state: identity of the search and every evaluation made so far."""

    fingerprint: dict[str, Any]
    history: list[dict] = field(default_factory=list)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(
            path,
            {
                "format_version": FORMAT_VERSION,
                "kind": "search_state",
                "fingerprint": self.fingerprint,
                "history": self.history,
            },
        )

    @classmethod
    def load_or_new(cls, path: str | os.PathLike | None, fingerprint: dict) -> SearchState:
        """Resume from ``path`` if it exists (checking it is the same search), else start."""
        if path is not None and Path(path).is_dir():
            raise ValueError(
                f"state_path {path} is a directory; give a file path inside it, e.g. "
                f"{Path(path) / 'search_state.json'}."
            )
        if path is None:
            return cls(fingerprint)
        if not Path(path).exists():
            # Checked now, not at the first save after minutes of work.
            check_writable_parent(path, "state_path")
            return cls(fingerprint)
        data = _read_json(path, "Search state")
        if data.get("kind") != "search_state" or not isinstance(data.get("history"), list):
            raise ValueError(f"{path} is not a search state file; delete it and run again.")
        for i, entry in enumerate(data["history"]):
            problem = _history_problem(entry)
            if problem:
                raise ValueError(
                    f"Search state {path} is corrupted (history entry {i}: {problem}); delete "
                    "it to start over, or restore a good copy."
                )
        saved = json.loads(json.dumps(data.get("fingerprint")))
        wanted = json.loads(json.dumps(fingerprint))
        if saved != wanted:
            changed = sorted(
                k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k)
            )
            raise ValueError(
                f"Search state {path} belongs to a different search (differs in {changed}); "
                "use another state path or delete it to start over."
            )
        return cls(fingerprint, data["history"])


# What each kind of history entry must hold, and which of its values are numbers.
_ENTRY_FIELDS = {
    "metric_proxy": ("metric", "proxy"),
    "metric": ("metric", "ratios", "error", "sparsity_gap"),
    "ratios": ("metric", "ratios", "error", "sparsity_gap"),
    "finalist": ("method", "ratios", "objective", "validation", "sparsity_gap"),
}
_NUMBERS = ("proxy", "error", "sparsity_gap", "objective", "validation")


def _history_problem(entry: Any) -> str | None:
    """What is wrong with one history entry of a state file (``None`` if nothing)."""
    if not isinstance(entry, dict) or entry.get("kind") not in _ENTRY_FIELDS:
        return "not an evaluation record"
    missing = [k for k in _ENTRY_FIELDS[entry["kind"]] if k not in entry]
    if missing:
        return f"{entry['kind']} record without {missing}"
    for key in _NUMBERS:
        value = entry.get(key)
        if key in entry and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{key} is {value!r}, not a number"
    return None
