"""Evaluation of (pruned) causal language models.

Three measurements, each following the protocol that published pruning results use, so that
numbers computed here can be set next to the Wanda / SparseGPT / OptiShear tables:

* :func:`perplexity` (:mod:`.perplexity`) — non-overlapping windows of ``seq_len`` tokens over
  one tokenised text (WikiText-2, C4), token NLL averaged over all windows, then exponentiated.
  Families that need a BOS token at the start of every sequence (Gemma) get one per window by
  default (``bos_per_window``).
* :func:`zero_shot_accuracy` (:mod:`.zero_shot`) — multiple-choice tasks scored by
  log-likelihood ranking, with lm-evaluation-harness prompts, tokenisation and ``acc`` /
  ``acc_norm`` conventions, read from local copies of the data sets (see :data:`TASK_FILES`
  for the expected layout; :data:`TASKS` is the table of task formats).
* :func:`sparsity_report` (:mod:`.report`) — fraction of zero weights in the decoder's linear
  layers.

Only PyTorch, ``transformers`` and ``torchmetrics`` are used; nothing here needs Lightning.
Imports point down only: this package uses :mod:`..models` and :mod:`..data`, never the
Lightning glue.
"""

from __future__ import annotations

from .perplexity import perplexity, tokenize_for_eval
from .report import format_sparsity_report, overall_sparsity, sparsity_report
from .zero_shot import (
    DEFAULT_TASKS,
    TASK_FILES,
    TASKS,
    MultipleChoiceExample,
    TaskFormat,
    encode_pair,
    load_task,
    rank_choices,
    score_choices,
    zero_shot_accuracy,
)

__all__ = [
    "DEFAULT_TASKS",
    "TASKS",
    "TASK_FILES",
    "MultipleChoiceExample",
    "TaskFormat",
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
