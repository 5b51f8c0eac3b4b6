"""Zero-shot multiple-choice accuracy by log-likelihood ranking (lm-evaluation-harness style).

Tasks are data: :data:`TASKS` maps each task name to a :class:`TaskFormat` -- the files it reads
and how a record becomes a prompt (a context template, the choices, the gold answer) -- and one
reader, :func:`load_task`, serves all of them. Prompts, tokenisation and the ``acc`` /
``acc_norm`` conventions follow lm-evaluation-harness; the data sets are read from local copies
(see :data:`TASK_FILES` for the expected layout).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import eval_mode, model_device
from ..progress import track

__all__ = [
    "DEFAULT_TASKS",
    "TASKS",
    "TASK_FILES",
    "MultipleChoiceExample",
    "TaskFormat",
    "encode_pair",
    "load_task",
    "rank_choices",
    "score_choices",
    "zero_shot_accuracy",
]

Record = dict[str, Any]

DEFAULT_TASKS: tuple[str, ...] = ("arc_easy", "piqa", "hellaswag", "winogrande", "boolq")
"""The tasks :func:`zero_shot_accuracy` evaluates when none are named."""


@dataclass
class MultipleChoiceExample:
    """One multiple-choice question as log-likelihood requests.

    Choice ``i`` is scored as ``loglik(continuations[i] | contexts[i])``. Most tasks share one
    context across choices; WinoGrande (partial evaluation) varies the context and shares the
    continuation.

    Attributes:
        contexts: One context per choice.
        continuations: One continuation per choice, usually starting with the ``" "`` delimiter.
        gold: Index of the correct choice.
    """

    contexts: list[str]
    continuations: list[str]
    gold: int

    def __post_init__(self) -> None:
        if not self.continuations:
            raise ValueError("a multiple-choice example needs at least one choice")
        if len(self.contexts) != len(self.continuations):
            raise ValueError(
                f"got {len(self.contexts)} contexts for {len(self.continuations)} continuations; "
                "give one context per choice"
            )
        if not 0 <= self.gold < len(self.continuations):
            raise ValueError(
                f"gold={self.gold} is not a choice index (0..{len(self.continuations) - 1})"
            )


# --------------------------------------------------------------------------------------------
# Tasks as data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskFormat:
    """How one task is read from disk and prompted.

    Each line of ``files[0]`` (JSON lines) is one record. Unless ``example`` is given, a record
    becomes one shared context -- ``context.format_map(record)``, so ``"{question[stem]}"``
    reaches into nested fields -- and one continuation per choice, ``" " + choice`` (lm-eval's
    target delimiter), with ``clean`` applied to the context and every choice.

    Attributes:
        files: Paths relative to the task's data folder: the records, then optionally a labels
            file with one answer per line.
        context: Template of the shared context.
        choices: The choices' texts of a record.
        gold: The index of a record's correct choice.
        example: Builds the whole example instead (tasks whose context differs per choice).
        labels_field: The record field that the labels file's lines fill in.
        labels_optional: Read the labels file only when some record lacks ``labels_field``.
        clean: Text cleanup applied to the context and the choices.
    """

    files: tuple[str, ...]
    context: str = ""
    choices: Callable[[Record], list[str]] | None = None
    gold: Callable[[Record], int] | None = None
    example: Callable[[Record], MultipleChoiceExample] | None = None
    labels_field: str | None = None
    labels_optional: bool = False
    clean: Callable[[str], str] | None = None

    def to_example(self, record: Record) -> MultipleChoiceExample:
        """The log-likelihood requests of one record."""
        if self.example is not None:
            return self.example(record)
        if self.choices is None or self.gold is None:
            raise ValueError("a TaskFormat needs either example= or both choices= and gold=")
        clean = self.clean or (lambda text: text)
        choices = [clean(choice) for choice in self.choices(record)]
        return MultipleChoiceExample(
            contexts=[clean(self.context.format_map(record))] * len(choices),
            continuations=[f" {choice}" for choice in choices],
            gold=self.gold(record),
        )


def _arc_choices(record: Record) -> list[str]:
    return [choice["text"] for choice in record["question"]["choices"]]


def _arc_gold(record: Record) -> int:
    labels = [choice["label"] for choice in record["question"]["choices"]]
    return labels.index(record["answerKey"].strip())


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval's HellaSwag cleanup. The shipped file is already cleaned, but a few records still
    # carry WikiHow "[...]" markup that lm-eval strips; applying it again is otherwise a no-op.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _winogrande_example(record: Record) -> MultipleChoiceExample:
    sentence = record["sentence"]
    blank = sentence.index("_")
    # Partial evaluation: each option fills the blank in the context, and both options are
    # scored on the same continuation, so acc_norm always equals acc here.
    continuation = " " + sentence[blank + 1 :].strip()
    options = [record["option1"], record["option2"]]
    return MultipleChoiceExample(
        contexts=[sentence[:blank] + option for option in options],
        continuations=[continuation, continuation],
        gold=int(str(record["answer"]).strip()) - 1,
    )


def _boolq_gold(record: Record) -> int:
    label = record["label"]
    return int(label.strip().lower() == "true") if isinstance(label, str) else int(bool(label))


def _rte_gold(record: Record) -> int:
    # GLUE numbering: 0 = entailment, 1 = not_entailment, matching the choice order.
    label = record["label"]
    return (0 if label == "entailment" else 1) if isinstance(label, str) else int(label)


_ARC_PROMPT = "Question: {question[stem]}\nAnswer:"

TASKS: dict[str, TaskFormat] = {
    "arc_easy": TaskFormat(("arc/ARC-Easy-Test.jsonl",), _ARC_PROMPT, _arc_choices, _arc_gold),
    "arc_challenge": TaskFormat(
        ("arc/ARC-Challenge-Test.jsonl",), _ARC_PROMPT, _arc_choices, _arc_gold
    ),
    "piqa": TaskFormat(
        ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
        "Question: {goal}\nAnswer:",
        lambda r: [r["sol1"], r["sol2"]],
        lambda r: int(r["label"]),
        labels_field="label",
    ),
    "hellaswag": TaskFormat(
        ("hellaswag/hellaswag_val.preprocessed.jsonl",),
        "{ctx}",
        lambda r: list(r["endings"]),
        lambda r: int(r["label"]),
        clean=_hellaswag_preprocess,
    ),
    "winogrande": TaskFormat(
        ("winogrande/dev.no-qID.jsonl", "winogrande/dev-labels.lst"),
        example=_winogrande_example,
        labels_field="answer",
        labels_optional=True,
    ),
    "boolq": TaskFormat(
        ("boolq/val.jsonl",),
        "{passage}\nQuestion: {question}?\nAnswer:",
        lambda r: ["no", "yes"],
        _boolq_gold,
    ),
    # OpenBookQA prompts with the bare stem; ARC wraps it in "Question: ...\nAnswer:".
    "openbookqa": TaskFormat(
        ("openbookqa/test.jsonl",), "{question[stem]}", _arc_choices, _arc_gold
    ),
    "rte": TaskFormat(
        ("rte/val.jsonl",),
        "{premise}\nQuestion: {hypothesis} True or False?\nAnswer:",
        lambda r: ["True", "False"],
        _rte_gold,
    ),
}
"""The built-in tasks: name -> files and prompt format (lm-evaluation-harness prompts)."""

TASK_FILES: dict[str, tuple[str, ...]] = {name: task.files for name, task in TASKS.items()}
"""Files each task reads, relative to the ``data_dir`` given to :func:`load_task`.

The labels file of WinoGrande is only read when the records lack an ``answer`` field.
"""


def _read_jsonl(path: Path, limit: int | None) -> list[Record]:
    records: list[Record] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if limit is not None and len(records) >= limit:
                break
            if line.strip():
                records.append(json.loads(line))
    return records


def _read_lines(path: Path, limit: int | None) -> list[str]:
    with path.open(encoding="utf-8") as handle:
        lines = [line.strip() for line in handle if line.strip()]
    return lines if limit is None else lines[:limit]


def _fill_labels(
    name: str, task: TaskFormat, records: list[Record], path: Path, limit: int | None
) -> None:
    """Write the labels file's answers into the records' ``labels_field``, where needed."""
    field = task.labels_field
    if task.labels_optional and all(str(r.get(field, "")).strip() for r in records):
        return  # the records carry their answers
    if not path.is_file():
        raise FileNotFoundError(
            f"the {name} records lack an {field!r} field and the labels file {path} is missing"
        )
    labels = _read_lines(path, limit)
    if len(labels) != len(records):
        raise ValueError(f"{path} has {len(labels)} labels for {len(records)} records")
    for record, label in zip(records, labels, strict=True):
        record[field] = label


def load_task(
    name: str, data_dir: str | Path, limit: int | None = None
) -> list[MultipleChoiceExample]:
    """Read a multiple-choice task from local files into log-likelihood requests.

    Prompts follow lm-evaluation-harness: ARC and PIQA use ``"Question: ...\\nAnswer:"``,
    HellaSwag the (cleaned) context, WinoGrande partial evaluation, BoolQ
    ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` with choices ``" no"`` / ``" yes"``,
    OpenBookQA the bare question stem and RTE ``"... True or False?\\nAnswer:"`` (the table is
    :data:`TASKS`).

    Args:
        name: One of the keys of :data:`TASKS` (and :data:`TASK_FILES`).
        data_dir: Folder holding the task files in the layout of :data:`TASK_FILES` (the
            project's copy is ``../shared/data/zeroshot``).
        limit: Keep only the first ``limit`` examples, in file order.

    Returns:
        The examples, in file order.

    Raises:
        ValueError: If ``name`` is not a known task or ``limit`` is negative.
        FileNotFoundError: If a file the task needs is missing.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or non-negative, got {limit}")
    task = TASKS[name]
    root = Path(data_dir)
    paths = [root / relative for relative in task.files]
    # An optional labels file is checked only when it turns out to be needed.
    required = paths[:1] if task.labels_optional else paths
    for path in required:
        if not path.is_file():
            raise FileNotFoundError(f"task {name!r} expects the file {path}")
    records = _read_jsonl(paths[0], limit)
    if task.labels_field is not None and len(paths) > 1:
        _fill_labels(name, task, records, paths[1], limit)
    return [task.to_example(record) for record in records]


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _encode_plain(tokenizer: Any, text: str) -> list[int]:
    # Short prompt text, no special tokens (the long-text tokeniser is data.encode_text).
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def encode_pair(
    tokenizer: Any, context: str, continuation: str, add_bos: bool = False
) -> tuple[list[int], list[int]]:
    """Tokenise a (context, continuation) request the way lm-evaluation-harness does.

    Trailing whitespace of the context moves to the continuation; ``context + continuation`` is
    encoded as one string and split after as many tokens as the context alone encodes to, so
    the model sees the text's real tokenisation (encoding ``" yes"`` on its own gives a
    different, wrong token sequence with SentencePiece tokenizers).

    Args:
        tokenizer: A Hugging Face tokenizer.
        context: The prompt.
        continuation: The text whose log-likelihood is wanted.
        add_bos: Put the tokenizer's BOS token in front of the context (never the continuation).

    Returns:
        ``(context_ids, continuation_ids)``; the model input is their concatenation.

    Raises:
        ValueError: If the continuation encodes to no tokens, or the context is empty and the
            tokenizer has neither a BOS nor an EOS token to condition on.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode_plain(tokenizer, context + continuation)
    n_context = len(_encode_plain(tokenizer, context))
    context_ids, continuation_ids = whole[:n_context], whole[n_context:]
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after {context!r}")
    if add_bos and tokenizer.bos_token_id is not None:
        context_ids = [tokenizer.bos_token_id, *context_ids]
    if not context_ids:
        # The first continuation token needs something to be predicted from; lm-eval uses the
        # end-of-text token as the "empty" context.
        prefix = (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        )
        if prefix is None:
            raise ValueError("empty context and the tokenizer has no BOS/EOS token to stand in")
        context_ids = [prefix]
    return context_ids, continuation_ids


# (example index, choice index, model input ids, continuation ids)
_Request = tuple[int, int, list[int], list[int]]


def _build_requests(
    tokenizer: Any, examples: Sequence[MultipleChoiceExample], max_length: int, add_bos: bool
) -> list[_Request]:
    requests: list[_Request] = []
    for i, example in enumerate(examples):
        for j, (context, continuation) in enumerate(
            zip(example.contexts, example.continuations, strict=True)
        ):
            context_ids, continuation_ids = encode_pair(tokenizer, context, continuation, add_bos)
            if len(continuation_ids) > max_length:
                raise ValueError(
                    f"continuation of example {i}, choice {j} is {len(continuation_ids)} tokens, "
                    f"more than max_length={max_length}"
                )
            # The last token is only ever a target; left truncation keeps the continuation whole.
            inputs = (context_ids + continuation_ids)[-(max_length + 1) :][:-1]
            requests.append((i, j, inputs, continuation_ids))
    return requests


def _score_batch(
    model: nn.Module, batch: Sequence[_Request], pad_id: int, device: torch.device
) -> list[float]:
    """Continuation log-likelihoods of one right-padded batch of requests."""
    width = max(len(inputs) for _, _, inputs, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (_, _, inputs, _) in enumerate(batch):
        input_ids[row, : len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        attention_mask[row, : len(inputs)] = 1
    logits = model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
    ).logits
    scores = []
    for row, (_, _, inputs, continuation_ids) in enumerate(batch):
        # Position p predicts token p + 1, so the continuation's n tokens are predicted by the
        # last n input positions (right padding keeps those in place).
        n = len(continuation_ids)
        log_probs = logits[row, len(inputs) - n : len(inputs)].float().log_softmax(-1)
        targets = torch.tensor(continuation_ids, device=log_probs.device).unsqueeze(-1)
        scores.append(float(log_probs.gather(-1, targets).sum()))
    return scores


def score_choices(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[MultipleChoiceExample],
    batch_size: int = 8,
    max_length: int = 2048,
    add_bos: bool | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> list[list[float]]:
    """Log-likelihood of every choice of every example.

    Each request is ``loglik(continuation | context)``: the sum of the log-probabilities of the
    continuation tokens (see :func:`encode_pair`). Requests are sorted by length and run
    ``batch_size`` at a time, right-padded; a request longer than ``max_length + 1`` tokens
    loses tokens from the left of its context.

    Args:
        model: A causal LM called as ``model(input_ids=..., attention_mask=...,
            use_cache=False).logits``.
        tokenizer: The model's Hugging Face tokenizer.
        examples: The questions, e.g. from :func:`load_task`.
        batch_size: Sequences per forward pass.
        max_length: Longest input the model gets, in tokens.
        add_bos: Prefix each context with BOS. ``None`` follows the tokenizer (BOS when
            ``tokenizer("a")`` starts with it, as for LLaMA). lm-evaluation-harness's HF backend
            passes no special tokens by default; use ``False`` to reproduce it exactly.
        device: Where to run; defaults to the device of the model's first parameter.
        progress: Show a progress bar over batches.

    Returns:
        ``result[i][j]`` is the log-likelihood of choice ``j`` of ``examples[i]``.

    Raises:
        ValueError: If ``batch_size`` or ``max_length`` is below 1, or a continuation alone is
            longer than ``max_length`` tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if add_bos is None:
        add_bos = _tokenizer_adds_bos(tokenizer)
    requests = _build_requests(tokenizer, examples, max_length, add_bos)

    # Longest first: similar lengths share a batch (little padding), and an out-of-memory error
    # shows up on the first batch rather than at the end of a long run.
    order = sorted(range(len(requests)), key=lambda k: -len(requests[k][2]))
    scores: list[list[float]] = [[0.0] * len(example.continuations) for example in examples]
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id

    run_device = torch.device(device) if device is not None else model_device(model)
    starts = range(0, len(order), batch_size)
    with eval_mode(model), torch.inference_mode():
        for start in track(starts, "log-likelihood", enabled=progress):
            batch = [requests[k] for k in order[start : start + batch_size]]
            for (i, j, _, _), score in zip(
                batch, _score_batch(model, batch, pad_id, run_device), strict=True
            ):
                scores[i][j] = score
    return scores


def _normalisation_length(continuation: str) -> int:
    # lm-eval divides by the length of the choice text without the " " target delimiter; bytes
    # rather than characters keep the measure independent of the script (and equal lm-eval's
    # character count on ASCII text).
    return max(len(continuation.removeprefix(" ").encode("utf-8")), 1)


def rank_choices(loglikelihoods: Sequence[float], continuations: Sequence[str]) -> tuple[int, int]:
    """Pick the predicted choice, raw and length-normalised.

    Args:
        loglikelihoods: One log-likelihood per choice.
        continuations: The choices' continuations (only their lengths matter).

    Returns:
        ``(pred, pred_norm)``: the argmax of the log-likelihoods (``acc``) and the argmax of the
        log-likelihoods divided by the UTF-8 byte length of each continuation, leading ``" "``
        delimiter excluded (``acc_norm``). Ties go to the lowest index.

    Raises:
        ValueError: If the two sequences differ in length or are empty.
    """
    if len(loglikelihoods) != len(continuations) or not continuations:
        raise ValueError(
            f"need one continuation per log-likelihood, got {len(continuations)} and "
            f"{len(loglikelihoods)}"
        )
    normalised = [
        ll / _normalisation_length(text)
        for ll, text in zip(loglikelihoods, continuations, strict=True)
    ]
    pred = max(range(len(loglikelihoods)), key=lambda k: loglikelihoods[k])
    pred_norm = max(range(len(normalised)), key=lambda k: normalised[k])
    return pred, pred_norm


def zero_shot_accuracy(
    model: nn.Module,
    tokenizer: Any,
    data_dir: str | Path,
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int = 2048,
    add_bos: bool | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Zero-shot multiple-choice accuracy by log-likelihood ranking (lm-eval-harness style).

    Args:
        model: A Hugging Face causal LM.
        tokenizer: Its tokenizer.
        data_dir: Folder with the task files (layout in :data:`TASK_FILES`).
        tasks: Task names (keys of :data:`TASK_FILES`).
        limit: Evaluate only the first ``limit`` examples of each task.
        batch_size: Sequences per forward pass.
        max_length: Longest model input in tokens; longer requests lose context from the left.
        add_bos: See :func:`score_choices`.
        device: Where to run; defaults to the device of the model's first parameter.
        progress: Show progress bars.

    Returns:
        ``{task: {"acc": ..., "acc_norm": ..., "n": number of examples}}``.

    Raises:
        ValueError: If a task name is unknown or a task has no examples.
        FileNotFoundError: If a task's file is missing.
    """
    # Load every task first so a typo or a missing file fails before any model time is spent.
    loaded = {name: load_task(name, data_dir, limit) for name in tasks}
    results: dict[str, dict[str, float]] = {}
    for name, examples in loaded.items():
        if not examples:
            raise ValueError(f"task {name!r} has no examples (limit={limit})")
        scores = score_choices(
            model,
            tokenizer,
            examples,
            batch_size=batch_size,
            max_length=max_length,
            add_bos=add_bos,
            device=device,
            progress=progress,
        )
        correct = correct_norm = 0
        for example, lls in zip(examples, scores, strict=True):
            pred, pred_norm = rank_choices(lls, example.continuations)
            correct += pred == example.gold
            correct_norm += pred_norm == example.gold
        results[name] = {
            "acc": correct / len(examples),
            "acc_norm": correct_norm / len(examples),
            "n": len(examples),
        }
    return results
