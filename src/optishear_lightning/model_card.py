"""Model cards for exported pruned models: a Hugging Face ``README.md`` with YAML front matter.

:func:`~optishear_lightning.pruning.save_pruned_model` (and so the callback's ``export_dir`` and
``optishear prune``) writes one into every export. What the card says comes from three places,
later ones winning: the model itself (its base model id, and the sparsity of every decoder
block, counted from the weights being saved), the :class:`~optishear_lightning.pruning.PruneResult`
or prune summary (method, pattern, targets, calibration) and the ``card`` mapping the caller
gives (``base_model``, ``method``, ``metric_formula``, ``calibration``, ``evaluation``...).

Example:
    >>> fields = card_fields(model, result, None, {"evaluation": {"wikitext2 ppl": 51.5}})
    ... # doctest: +SKIP
    >>> print(render_model_card(fields))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CARD_FILE",
    "card_fields",
    "hub_model_id",
    "render_model_card",
    "restore_inference_config",
    "write_model_card",
]

CARD_FILE = "README.md"
TAGS = ["optishear", "pruned", "sparse"]
# Built-in model names (see models.BUILTIN_MODELS) and the hub model they were made from.
_BUILTIN_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def hub_model_id(name: str | None) -> str | None:
    """The hub repo id behind a model name, or ``None`` for a local path or an unknown name.

    Example:
        >>> hub_model_id("smollm2-135m")
        'HuggingFaceTB/SmolLM2-135M-Instruct'
        >>> hub_model_id("/data/models/llama") is None
        True
    """
    if not name:
        return None
    if name.lower() in _BUILTIN_HUB_IDS:
        return _BUILTIN_HUB_IDS[name.lower()]
    if _HUB_ID.match(name) and ".." not in name and not os.path.exists(name):
        return name
    return None


def restore_inference_config(config_path: str | os.PathLike) -> None:
    """Set ``use_cache: true`` in a saved ``config.json`` (the transformers default).

    :func:`~optishear_lightning.models.load_model` turns the KV cache off for calibration and
    training; an exported model is for inference, so its saved config must not keep that.
    The model in memory is not touched.
    """
    path = Path(config_path)
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if config.get("use_cache") is False:
        config["use_cache"] = True
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _block_sparsity(model: nn.Module) -> list[float]:
    """Fraction of zeros of each decoder block's prunable weights, counted from the model."""
    from .models import find_decoder_blocks, find_prunable_linears

    _, blocks = find_decoder_blocks(model)
    out = []
    for block in blocks:
        weights = [lin.weight.detach() for lin in find_prunable_linears(block).values()]
        zeros = sum(int((w == 0).sum()) for w in weights)
        out.append(zeros / max(1, sum(w.numel() for w in weights)))
    return out


def card_fields(
    model: nn.Module,
    result: Any = None,
    summary: Mapping[str, Any] | None = None,
    card: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the card shows, as one flat mapping (see the module docstring).

    Args:
        model: the pruned model being exported.
        result: its :class:`~optishear_lightning.pruning.PruneResult`, if known.
        summary: the prune summary (the callback's), if known.
        card: fields given by the caller; they override the others.

    Returns:
        ``base_model``, ``method``, ``metric_formula``, ``pattern``, ``group``,
        ``target_sparsity`` (per block), ``block_sparsity`` (achieved per block),
        ``overall_sparsity``, ``calibration``, ``evaluation``, ``versions`` and any extra keys.
    """
    import transformers

    from ._version import __version__

    config = getattr(model, "config", None)
    info: dict[str, Any] = {
        "base_model": getattr(config, "optishear_model_id", None)
        or getattr(config, "_name_or_path", None),
        "block_sparsity": _block_sparsity(model),
        "versions": {
            "optishear-lightning": __version__,
            "torch": str(torch.__version__),
            "transformers": transformers.__version__,
        },
    }
    for source in (result.to_dict() if result is not None else None, summary):
        for key, value in (source or {}).items():
            if key == "block_sparsity":  # the engine's targets; achieved comes from the model
                info["target_sparsity"] = value
            elif key not in ("layer_sparsity", "masks", "peak_memory"):
                info[key] = value
    if result is not None and result.n_calibration_samples:
        info.setdefault(
            "calibration",
            {"samples": result.n_calibration_samples, "seq_len": result.calibration_seq_len},
        )
    info.update(card or {})
    info["overall_sparsity"] = _overall_sparsity(model)  # what is saved, not what was asked
    return info


def _overall_sparsity(model: nn.Module) -> float:
    from .models import named_prunable_linears

    weights = [lin.weight.detach() for lin in named_prunable_linears(model).values()]
    return sum(int((w == 0).sum()) for w in weights) / max(1, sum(w.numel() for w in weights))


def _front_matter(info: Mapping[str, Any]) -> str:
    import yaml

    meta: dict[str, Any] = {"library_name": "transformers", "tags": list(TAGS)}
    base = hub_model_id(info.get("base_model"))
    if base is not None:
        meta["base_model"] = base
    meta["pipeline_tag"] = "text-generation"
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _percent(value: Any) -> str:
    return f"{float(value):.2%}" if isinstance(value, (int, float)) else "-"


def _settings_table(info: Mapping[str, Any]) -> list[str]:
    rows = [("method", f"`{info.get('method', 'unknown')}`")]
    formula = info.get("metric_formula")
    if formula and formula != info.get("method"):
        rows.append(("pruning metric", f"`{formula}`"))
    pattern, group = info.get("pattern"), info.get("group")
    if pattern:
        rows.append(("pattern", f"{pattern}" + (f" ({group} groups)" if group else "")))
    rows.append(("sparsity", f"{_percent(info['overall_sparsity'])} of the pruned linear weights"))
    if info.get("layers"):
        rows.append(("layers", str(info["layers"])))
    calibration = info.get("calibration")
    if isinstance(calibration, Mapping):
        text = f"{calibration.get('samples', '?')} sequences x {calibration.get('seq_len', '?')}"
        text += " tokens" + (f" from {calibration['source']}" if calibration.get("source") else "")
        rows.append(("calibration data", text))
    elif calibration:
        rows.append(("calibration data", str(calibration)))
    lines = ["| setting | value |", "|---|---|"]
    return lines + [f"| {k} | {v} |" for k, v in rows]


def _blocks_table(info: Mapping[str, Any]) -> list[str]:
    achieved = info.get("block_sparsity") or []
    targets = info.get("target_sparsity") or [None] * len(achieved)
    lines = ["| block | target | achieved |", "|---:|---:|---:|"]
    for i, value in enumerate(achieved):
        target = targets[i] if i < len(targets) else None
        lines.append(f"| {i} | {_percent(target)} | {_percent(value)} |")
    return lines


def _evaluation_table(info: Mapping[str, Any]) -> list[str]:
    evaluation = info.get("evaluation") or {}
    if not evaluation:
        return ["Not measured by the export."]
    lines = ["| metric | value |", "|---|---:|"]
    for name, value in evaluation.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {name} | {shown} |")
    return lines


def render_model_card(info: Mapping[str, Any], repo_id: str | None = None) -> str:
    """The ``README.md`` text for :func:`card_fields` output.

    Args:
        info: the card's fields.
        repo_id: the hub repo the card will live in (for the usage snippet).
    """
    base = info.get("base_model") or "a causal language model"
    hub = hub_model_id(base)
    base_text = f"[{hub}](https://huggingface.co/{hub})" if hub else f"`{base}`"
    versions = ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items())
    where = repo_id or info.get("repo_id") or "path/to/this/model"
    parts = [
        _front_matter(info),
        f"# {Path(str(base)).name} pruned to {_percent(info['overall_sparsity'])} sparsity",
        "",
        f"{base_text} pruned with [optishear-lightning](https://github.com/optishear/"
        f"optishear-lightning) ({info.get('method', 'unknown method')}). Pruned weights are "
        "stored as zeros in a dense safetensors checkpoint: it loads with plain transformers. "
        "Embeddings and the LM head are not pruned.",
        "",
        "## Pruning",
        "",
        *_settings_table(info),
        "",
        "## Sparsity per decoder block",
        "",
        *_blocks_table(info),
        "",
        "## Evaluation",
        "",
        *_evaluation_table(info),
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        "```",
        "",
        "The prune summary (per-layer sparsity, settings, timing) is in `optishear_prune.json`.",
        "",
        f"Made with {versions}." if versions else "",
    ]
    return "\n".join(parts).rstrip() + "\n"


def write_model_card(
    directory: str | os.PathLike, info: Mapping[str, Any], repo_id: str | None = None
) -> Path:
    """Write ``README.md`` into ``directory`` and return its path."""
    path = Path(directory) / CARD_FILE
    path.write_text(render_model_card(info, repo_id))
    return path
