"""Evaluation of (pruned) causal language models.

Three measurements, each following the protocol that published pruning results use, so that
numbers computed here can be set next to the Wanda / SparseGPT / OptiShear tables:

* :func:`perplexity` — non-overlapping windows of ``seq_len`` tokens over one tokenised text
  (WikiText-2, C4), token NLL averaged over all windows, then exponentiated.
* :func:`zero_shot_accuracy` — multiple-choice tasks scored by log-likelihood ranking, with
  lm-evaluation-harness prompts, tokenisation and ``acc`` / ``acc_norm`` conventions, read from
  local copies of the data sets (see :data:`TASK_FILES` for the expected layout).
* :func:`sparsity_report` — fraction of zero weights in the decoder's linear layers.

Only PyTorch, ``transformers`` and ``torchmetrics`` are used; nothing here needs Lightning.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics.text import Perplexity
from tqdm.auto import tqdm

from .models import named_prunable_linears

__all__ = [
    "DEFAULT_TASKS",
    "TASK_FILES",
    "MultipleChoiceExample",
    "encode_pair",
    "format_sparsity_report",
    "load_task",
    "overall_sparsity",
    "perplexity",
    "rank_choices",
    "score_choices",
    "sparsity_report",
    "tokenize_for_eval",
    "zero_shot_accuracy",
]

DeviceLike = torch.device | str | None

DEFAULT_TASKS: tuple[str, ...] = ("arc_easy", "piqa", "hellaswag", "winogrande", "boolq")
"""The tasks :func:`zero_shot_accuracy` evaluates when none are named."""

TASK_FILES: dict[str, tuple[str, ...]] = {
    "arc_easy": ("arc/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc/ARC-Challenge-Test.jsonl",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "hellaswag": ("hellaswag/hellaswag_val.preprocessed.jsonl",),
    "winogrande": ("winogrande/dev.no-qID.jsonl", "winogrande/dev-labels.lst"),
    "boolq": ("boolq/val.jsonl",),
    "openbookqa": ("openbookqa/test.jsonl",),
    "rte": ("rte/val.jsonl",),
}
"""Files each task reads, relative to the ``data_dir`` given to :func:`load_task`.

The labels file of WinoGrande is only read when the records lack an ``answer`` field.
"""


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _resolve_device(model: nn.Module, device: DeviceLike) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    # A parameter-free module (a stub, a wrapper around a remote model) runs where tensors live
    # by default.
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Restore each submodule's own flag rather than calling model.train(True): a caller may hold
    # a partly frozen model (e.g. some blocks deliberately in eval mode) that must stay as it was.
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------


def tokenize_for_eval(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenise a whole evaluation text in one call, as the perplexity protocol requires.

    Special tokens are added the tokenizer's default way (a LLaMA tokenizer puts one BOS at the
    very start of the text), matching ``tokenizer(text, return_tensors="pt")`` in the Wanda and
    SparseGPT evaluation code.

    Args:
        tokenizer: A Hugging Face tokenizer.
        text: The full evaluation text (e.g. the WikiText-2 test file's content).

    Returns:
        A 1-D ``torch.long`` tensor of token ids.
    """
    # The text is far longer than model_max_length on purpose (it is cut into windows later), so
    # the "sequence longer than the maximum" warning is noise here; verbose=False silences just
    # that check without touching global logging or the tokenizer's state.
    encoding = tokenizer(text, return_tensors="pt", truncation=False, verbose=False)
    return encoding["input_ids"].reshape(-1).long()


def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    seq_len: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
    device: DeviceLike = None,
    progress: bool = False,
) -> float:
    """Perplexity of a causal LM over one tokenised text, Wanda / SparseGPT protocol.

    The text is cut into non-overlapping windows of ``seq_len`` tokens (the remainder is
    dropped), each window is run through the model on its own, and the token NLL of the
    ``seq_len - 1`` next-token predictions of every window is averaged over all windows. The
    result is ``exp`` of that mean. Every window predicts the same number of tokens, so this
    equals the papers' ``exp(sum(loss_i * seq_len) / (n_windows * seq_len))``.

    Args:
        model: A causal LM called as ``model(input_ids=..., use_cache=False).logits``.
        input_ids: Token ids of the whole text, shape ``(N,)`` or ``(1, N)``.
        seq_len: Window length in tokens (2048 for LLaMA-class models in published tables).
        batch_size: Windows per forward pass.
        max_windows: Keep only the first this many windows (C4 protocol: 256).
        device: Where to run; defaults to the device of the model's first parameter.
        progress: Show a tqdm progress bar over batches.

    Returns:
        The perplexity as a Python float.

    Raises:
        ValueError: If ``seq_len < 2``, ``batch_size < 1``, ``max_windows < 1``, ``input_ids``
            is not one sequence, or the text is shorter than one window.
    """
    if seq_len < 2:
        raise ValueError(
            f"seq_len must be at least 2 to have a next token to predict, got {seq_len}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be None or at least 1, got {max_windows}")
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(
            "input_ids must be one token sequence of shape (N,) or (1, N), "
            f"got {tuple(input_ids.shape)}"
        )

    n_windows = input_ids.numel() // seq_len
    if n_windows == 0:
        raise ValueError(
            f"the text has {input_ids.numel()} tokens, fewer than one window of seq_len={seq_len}; "
            "pass a smaller seq_len or a longer text"
        )
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = input_ids[: n_windows * seq_len].reshape(n_windows, seq_len).long()

    run_device = _resolve_device(model, device)
    metric = Perplexity().to(run_device)
    starts = range(0, n_windows, batch_size)
    with _eval_mode(model), torch.inference_mode():
        for start in tqdm(starts, desc="perplexity", disable=not progress):
            batch = windows[start : start + batch_size].to(run_device)
            logits = model(input_ids=batch, use_cache=False).logits
            # Half-precision softmax over a 32k+ vocabulary loses the small probabilities that
            # dominate the NLL, hence the upcast before the metric normalises.
            metric.update(logits[:, :-1].float(), batch[:, 1:])
    return float(metric.compute())


# --------------------------------------------------------------------------------------------
# Zero-shot multiple choice
# --------------------------------------------------------------------------------------------


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


def _read_jsonl(path: Path, limit: int | None) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
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


def _same_context(context: str, choices: Sequence[str], gold: int) -> MultipleChoiceExample:
    # lm-eval's default target delimiter: continuations start with one space.
    return MultipleChoiceExample(
        contexts=[context] * len(choices),
        continuations=[f" {choice}" for choice in choices],
        gold=gold,
    )


def _load_arc_style(
    paths: list[Path], limit: int | None, prefix: bool
) -> list[MultipleChoiceExample]:
    examples = []
    for record in _read_jsonl(paths[0], limit):
        question = record["question"]
        labels = [choice["label"] for choice in question["choices"]]
        texts = [choice["text"] for choice in question["choices"]]
        # OpenBookQA prompts with the bare stem; ARC wraps it in "Question: ...\nAnswer:".
        context = f"Question: {question['stem']}\nAnswer:" if prefix else question["stem"]
        examples.append(_same_context(context, texts, labels.index(record["answerKey"].strip())))
    return examples


def _load_arc(paths: list[Path], limit: int | None) -> list[MultipleChoiceExample]:
    return _load_arc_style(paths, limit, prefix=True)


def _load_openbookqa(paths: list[Path], limit: int | None) -> list[MultipleChoiceExample]:
    return _load_arc_style(paths, limit, prefix=False)


def _load_piqa(paths: list[Path], limit: int | None) -> list[MultipleChoiceExample]:
    records = _read_jsonl(paths[0], limit)
    labels = _read_lines(paths[1], limit)
    if len(labels) != len(records):
        raise ValueError(f"{paths[1]} has {len(labels)} labels for {len(records)} questions")
    return [
        _same_context(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(label))
        for r, label in zip(records, labels, strict=True)
    ]


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval's HellaSwag cleanup. The shipped file is already cleaned, but a few records still
    # carry WikiHow "[...]" markup that lm-eval strips; applying it again is otherwise a no-op.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _load_hellaswag(paths: list[Path], limit: int | None) -> list[MultipleChoiceExample]:
    return [
        _same_context(
            _hellaswag_preprocess(r["ctx"]),
            [_hellaswag_preprocess(ending) for ending in r["endings"]],
            int(r["label"]),
        )
        for r in _read_jsonl(paths[0], limit)
    ]


def _load_winogrande(paths: list[Path], limit: int | None) -> list[MultipleChoiceExample]:
    records = _read_jsonl(paths[0], limit)
    if all(str(r.get("answer", "")).strip() for r in records):
        answers = [str(r["answer"]).strip() for r in records]
    else:
        if not paths[1].is_file():
            raise FileNotFoundError(
                f"WinoGrande records lack an 'answer' field and the labels file {paths[1]} "
                "is missing"
            )
        answers = _read_lines(paths[1], limit)
        if len(answers) != len(records):
            raise ValueError(f"{paths[1]} has {len(answers)} labels for {len(records)} sentences")
    examples = []
    for record, answer in zip(records, answers, strict=True):
        sentence = record["sentence"]
        blank = sentence.index("_")
        # Partial evaluation: each option fills the blank in the context, and both options are
        # scored on the same continuation, so acc_norm always equals acc here.
        continuation = " " + sentence[blank + 1 :].strip()
        options = [record["option1"], record["option2"]]
        examples.append(
            MultipleChoiceExample(
                contexts=[sentence[:blank] + option for option in options],
                continuations=[continuation, continuation],
                gold=int(answer) - 1,
            )
        )
    return examples


def _load_boolq(paths: list[Path], limit: int | None) -> list[MultipleChoiceExample]:
    examples = []
    for r in _read_jsonl(paths[0], limit):
        label = r["label"]
        gold = int(label.strip().lower() == "true") if isinstance(label, str) else int(bool(label))
        context = f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"
        examples.append(_same_context(context, ["no", "yes"], gold))
    return examples


def _load_rte(paths: list[Path], limit: int | None) -> list[MultipleChoiceExample]:
    examples = []
    for r in _read_jsonl(paths[0], limit):
        label = r["label"]
        # GLUE numbering: 0 = entailment, 1 = not_entailment, matching the choice order below.
        gold = (0 if label == "entailment" else 1) if isinstance(label, str) else int(label)
        context = f"{r['premise']}\nQuestion: {r['hypothesis']} True or False?\nAnswer:"
        examples.append(_same_context(context, ["True", "False"], gold))
    return examples


_LOADERS: dict[str, Callable[[list[Path], int | None], list[MultipleChoiceExample]]] = {
    "arc_easy": _load_arc,
    "arc_challenge": _load_arc,
    "piqa": _load_piqa,
    "hellaswag": _load_hellaswag,
    "winogrande": _load_winogrande,
    "boolq": _load_boolq,
    "openbookqa": _load_openbookqa,
    "rte": _load_rte,
}


def load_task(
    name: str, data_dir: str | Path, limit: int | None = None
) -> list[MultipleChoiceExample]:
    """Read a multiple-choice task from local files into log-likelihood requests.

    Prompts follow lm-evaluation-harness: ARC and PIQA use ``"Question: ...\\nAnswer:"``,
    HellaSwag the (cleaned) context, WinoGrande partial evaluation, BoolQ
    ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` with choices ``" no"`` / ``" yes"``,
    OpenBookQA the bare question stem and RTE ``"... True or False?\\nAnswer:"``.

    Args:
        name: One of the keys of :data:`TASK_FILES`.
        data_dir: Folder holding the task files in the layout of :data:`TASK_FILES` (the
            project's copy is ``../shared/data/zeroshot``).
        limit: Keep only the first ``limit`` examples, in file order.

    Returns:
        The examples, in file order.

    Raises:
        ValueError: If ``name`` is not a known task or ``limit`` is negative.
        FileNotFoundError: If a file the task needs is missing.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_LOADERS))}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or non-negative, got {limit}")
    root = Path(data_dir)
    paths = [root / relative for relative in TASK_FILES[name]]
    # WinoGrande's labels file is optional (the records usually carry the answer).
    required = paths[:1] if name == "winogrande" else paths
    for path in required:
        if not path.is_file():
            raise FileNotFoundError(f"task {name!r} expects the file {path}")
    return _LOADERS[name](paths, limit)


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _encode(tokenizer: Any, text: str) -> list[int]:
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
    whole = _encode(tokenizer, context + continuation)
    n_context = len(_encode(tokenizer, context))
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


def score_choices(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[MultipleChoiceExample],
    batch_size: int = 8,
    max_length: int = 2048,
    add_bos: bool | None = None,
    device: DeviceLike = None,
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
        progress: Show a tqdm progress bar over batches.

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

    # (example index, choice index, model input ids, continuation ids)
    requests: list[tuple[int, int, list[int], list[int]]] = []
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

    # Longest first: similar lengths share a batch (little padding), and an out-of-memory error
    # shows up on the first batch rather than at the end of a long run.
    order = sorted(range(len(requests)), key=lambda k: -len(requests[k][2]))
    scores: list[list[float]] = [[0.0] * len(example.continuations) for example in examples]
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id

    run_device = _resolve_device(model, device)
    starts = range(0, len(order), batch_size)
    with _eval_mode(model), torch.inference_mode():
        for start in tqdm(starts, desc="log-likelihood", disable=not progress):
            batch = [requests[k] for k in order[start : start + batch_size]]
            width = max(len(inputs) for _, _, inputs, _ in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (_, _, inputs, _) in enumerate(batch):
                input_ids[row, : len(inputs)] = torch.tensor(inputs, dtype=torch.long)
                attention_mask[row, : len(inputs)] = 1
            logits = model(
                input_ids=input_ids.to(run_device),
                attention_mask=attention_mask.to(run_device),
                use_cache=False,
            ).logits
            for row, (i, j, inputs, continuation_ids) in enumerate(batch):
                # Position p predicts token p + 1, so the continuation's n tokens are predicted
                # by the last n input positions (right padding keeps those in place).
                n = len(continuation_ids)
                log_probs = logits[row, len(inputs) - n : len(inputs)].float().log_softmax(-1)
                targets = torch.tensor(continuation_ids, device=log_probs.device).unsqueeze(-1)
                scores[i][j] = float(log_probs.gather(-1, targets).sum())
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
    device: DeviceLike = None,
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


# --------------------------------------------------------------------------------------------
# Sparsity
# --------------------------------------------------------------------------------------------


def _decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    try:
        return named_prunable_linears(model)
    except ValueError:
        return {}  # reported below with a hint to pass the layers explicitly


def sparsity_report(
    model: nn.Module | Mapping[str, nn.Module],
    modules: Mapping[str, nn.Module] | None = None,
) -> list[dict[str, Any]]:
    """Zero counts of the weights of a model's decoder linear layers.

    Args:
        model: The model, or directly a mapping ``{name: linear layer}`` to report on.
        modules: The layers to report on, by name. When neither this nor a mapping is given,
            the prunable linears of the model's decoder blocks are used
            (:func:`~optishear_lightning.models.named_prunable_linears`), i.e. exactly what
            :func:`~optishear_lightning.pruning.prune` prunes.

    Returns:
        One row per layer, in the given (or module) order, with keys ``name``, ``shape``
        (tuple), ``numel``, ``zeros`` and ``sparsity`` (fraction of zero weights). Biases are
        not counted.

    Raises:
        ValueError: If no layers are found (pass ``modules=`` for an unusual architecture).
        TypeError: If a given module has no ``weight`` tensor.
    """
    if modules is None and isinstance(model, Mapping):
        modules = model
    if modules is None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module or a mapping, got {type(model).__name__}")
        modules = _decoder_linears(model)
    if not modules:
        raise ValueError(
            "no decoder linear layers found; pass them explicitly as modules={name: nn.Linear}"
        )
    rows = []
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"module {name!r} ({type(module).__name__}) has no weight tensor")
        numel = weight.numel()
        zeros = numel - int(torch.count_nonzero(weight.detach()))
        rows.append(
            {
                "name": name,
                "shape": tuple(weight.shape),
                "numel": numel,
                "zeros": zeros,
                "sparsity": zeros / numel if numel else 0.0,
            }
        )
    return rows


def overall_sparsity(rows: Sequence[Mapping[str, Any]]) -> float:
    """Fraction of zero weights over all rows of a :func:`sparsity_report`, weighted by size.

    Args:
        rows: Rows from :func:`sparsity_report`.

    Returns:
        Total zeros divided by total weights (0.0 when there are no weights).
    """
    total = sum(row["numel"] for row in rows)
    return sum(row["zeros"] for row in rows) / total if total else 0.0


def format_sparsity_report(rows: Sequence[Mapping[str, Any]]) -> str:
    """Render :func:`sparsity_report` rows as a plain-text table with an overall line.

    Args:
        rows: Rows from :func:`sparsity_report`.

    Returns:
        The table, one line per layer plus a header and an ``overall`` line.
    """
    header = ("layer", "shape", "zeros", "numel", "sparsity")
    lines = [
        (
            str(row["name"]),
            "x".join(str(d) for d in row["shape"]),
            str(row["zeros"]),
            str(row["numel"]),
            f"{row['sparsity']:.2%}",
        )
        for row in rows
    ]
    total_zeros = sum(row["zeros"] for row in rows)
    total_numel = sum(row["numel"] for row in rows)
    footer = ("overall", "", str(total_zeros), str(total_numel), f"{overall_sparsity(rows):.2%}")
    table = [header, *lines, footer]
    widths = [max(len(line[c]) for line in table) for c in range(len(header))]

    def render(line: tuple[str, ...]) -> str:
        # Names and shapes read best left-aligned, numbers right-aligned.
        cells = [
            cell.ljust(width) if c < 2 else cell.rjust(width)
            for c, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "-" * len(render(header))
    body = [render(line) for line in lines]
    return "\n".join([render(header), rule, *body, rule, render(footer)])
