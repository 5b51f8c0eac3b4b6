"""Calibration and evaluation text for post-training pruning.

Two entry points, both framework-free (plain PyTorch, ``transformers`` tokenizers and, for the
Hugging Face Hub sources only, ``datasets``):

* :func:`calibration_windows` returns the ``(n_samples, seq_len)`` token windows a pruning method
  collects activations on. Named sources reproduce the sampling of Wanda / SparseGPT
  (``lib/data.py`` / ``datautils.py``) call for call, so the same seed gives the same windows as
  the published code.
* :func:`evaluation_tokens` returns the 1-D token stream that perplexity is measured on, built
  the way the literature builds it (WikiText-2 test rows joined with ``"\\n\\n"``; the first
  1,100 C4 validation documents joined with ``" "`` and cut to ``256 * seq_len`` tokens).

Sources are either a known name (``"c4"``, ``"wikitext2"``, ``"ptb"``; these download from the
Hub), a local file whose path the caller passes (nothing here assumes any particular data
directory exists), in-memory text or tokens, or -- for calibration only -- ``"self"``: text
sampled from the model itself, for data-free calibration.

Windows cut from one token stream start with BOS only where the stream does. Families that need
a BOS token at the start of every sequence (Gemma; see
:func:`~optishear_lightning.models.needs_bos_per_window`) get ``[BOS] + seq_len - 1`` stream
tokens per window instead: the ``bos_per_window`` setting of :func:`calibration_windows` and
:func:`evaluation_windows`, on by default for those families only, so the published LLaMA
protocol is unchanged.

Local files:

* ``.jsonl`` (optionally ``.jsonl.gz``), ``.json`` (a list of objects or strings, or JSON lines;
  optionally ``.json.gz``, which is how the C4 shards ship) and ``.parquet`` hold *documents*
  (the ``text_field`` of each record). Calibration samples them like C4.
* ``.txt`` and ``.raw`` hold *one text stream*, read as is. Calibration samples it like
  WikiText-2.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .models import eval_mode, model_bos_token_id, model_device, resolve_bos_per_window

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CALIBRATION_SOURCES",
    "DOCUMENT_SUFFIXES",
    "EVALUATION_SOURCES",
    "STREAM_SUFFIXES",
    "batch_token_ids",
    "calibration_windows",
    "check_source",
    "encode_text",
    "evaluation_tokens",
    "evaluation_windows",
]

#: Names :func:`calibration_windows` accepts besides local paths, tensors and lists of text.
CALIBRATION_SOURCES: tuple[str, ...] = ("c4", "wikitext2", "ptb", "self", "generated")
#: Names :func:`evaluation_tokens` accepts besides local paths, tensors and lists of text.
EVALUATION_SOURCES: tuple[str, ...] = ("wikitext2", "c4", "ptb")
#: Local file suffixes read as a collection of documents (``.jsonl``/``.json`` may add ``.gz``).
DOCUMENT_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")
#: Local file suffixes read as one text stream.
STREAM_SUFFIXES: tuple[str, ...] = (".txt", ".raw")

# Hub locations used by Wanda / SparseGPT. Only the train and validation shard 0 of C4 are used,
# exactly as in the published code, so results stay comparable.
_C4_REPO = "allenai/c4"
_C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
_C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
# "wikitext" is the legacy alias of this repository; naming the owner avoids relying on the
# Hub's redirect.
_WIKITEXT_REPO = "Salesforce/wikitext"
_WIKITEXT_CONFIG = "wikitext-2-raw-v1"
_PTB_REPO = "ptb_text_only"
_PTB_CONFIG = "penn_treebank"

_ACCEPTED_FILES = (
    "a .jsonl/.json/.parquet file of documents (text in the `text_field` of each record; "
    ".jsonl.gz/.json.gz also work) or a .txt/.raw file read as one text stream"
)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def calibration_windows(
    source: str | os.PathLike[str] | torch.Tensor | Sequence[str] | Any | None,
    tokenizer: PreTrainedTokenizerBase | None,
    n_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    model: torch.nn.Module | None = None,
    *,
    text_field: str = "text",
    generation_batch_size: int = 8,
    bos_per_window: bool | None = None,
) -> torch.Tensor:
    """Draw calibration windows the way Wanda / SparseGPT do.

    Document sources (``"c4"``, ``.jsonl``/``.json``/``.parquet`` files, a list of strings, a
    ``datasets.Dataset``) follow Wanda's ``get_c4`` exactly: with a RNG seeded by ``seed``, each
    sample repeatedly picks ``i = randint(0, n_docs - 1)`` and tokenises document ``i`` until one
    is longer than ``seq_len`` tokens, then takes the window starting at
    ``randint(0, length - seq_len - 1)``.

    Stream sources (``"wikitext2"``, ``"ptb"``, ``.txt``/``.raw`` files) follow ``get_wikitext2``:
    the text is tokenised once and each window starts at ``randint(0, n_tokens - seq_len - 1)``.
    For ``"wikitext2"`` the train rows are joined with ``" "`` as in the published code (the
    test split, used for perplexity, is joined with ``"\\n\\n"``).

    With ``bos_per_window`` on, a leading BOS the tokenizer put in front of a document (or the
    stream) is dropped, the same sampling runs with windows of ``seq_len - 1`` tokens, and each
    window gets the tokenizer's BOS in front: ``[BOS] + seq_len - 1`` text tokens, still
    ``seq_len`` long. Off, the windows are exactly the published code's.

    ``"self"`` / ``"generated"`` (or ``None``) is data-free calibration in the style of LLM-QAT
    (Liu et al., 2023): each window is text the model samples from its own distribution, starting
    from the BOS token, with plain multinomial sampling (``top_k=0``, ``top_p=1``,
    ``temperature=1``) for exactly ``seq_len - 1`` new tokens -- EOS is suppressed so no sample
    ends early. Sampling is seeded with ``seed`` inside a forked RNG, so it is deterministic for
    a given seed, ``generation_batch_size``, model and device, and leaves the caller's global
    RNG state alone. The model is put in eval mode for the duration and restored afterwards.
    These windows start with BOS whatever ``bos_per_window`` says (on, it only checks that the
    model or tokenizer has a BOS token).

    The random module is used through a private ``random.Random(seed)``, which produces the same
    numbers as ``random.seed(seed)`` followed by module-level calls but does not disturb the
    caller's global RNG.

    Args:
        source: A name from :data:`CALIBRATION_SOURCES`, a local file path (see the module
            docstring), a list of document strings, a ``datasets.Dataset`` with a
            ``text_field`` column, an already tokenised 2-D integer tensor (returned as is,
            ``n_samples``/``seq_len``/``bos_per_window`` are not applied to it), or ``None`` for
            ``"self"``. A bare string that matches a known name is the name even if a file of
            that name exists in the working directory; write ``"./c4"`` or pass a
            :class:`~pathlib.Path` to mean the file.
        tokenizer: Tokenizer used for text sources; may be ``None`` for tensors and ``"self"``.
        n_samples: Number of windows.
        seq_len: Tokens per window.
        seed: Seed of the window sampler (and of generation for ``"self"``).
        model: Causal LM; required for ``"self"`` (it needs ``generate``). For other sources it
            only supplies the family default of ``bos_per_window``.
        text_field: Field/column holding the text in local document files and datasets.
        generation_batch_size: Sequences generated at once for ``"self"``.
        bos_per_window: Start every window with BOS. ``None`` (default) follows the model's
            family (:func:`~optishear_lightning.models.needs_bos_per_window`; off without a
            model).

    Returns:
        A ``torch.long`` tensor of shape ``(n_samples, seq_len)`` on the CPU (a tensor source is
        returned unchanged apart from a cast to ``long``).

    Raises:
        ValueError: For an unknown name, an empty source, a source with no document (or a stream)
            longer than ``seq_len`` tokens, a directory or unsupported file type, invalid
            ``n_samples``/``seq_len``/``generation_batch_size``, or ``bos_per_window`` on (set
            or by default) with a tokenizer that has no BOS token.
        FileNotFoundError: For a path-like string that does not exist.
    """
    if isinstance(source, torch.Tensor):
        return _validated_token_tensor(source)
    _check_positive_int("n_samples", n_samples, 1, "ask for at least one calibration window")
    _check_positive_int("seq_len", seq_len, 2, "windows need at least two tokens")
    _check_positive_int("generation_batch_size", generation_batch_size, 1, "use 1 or more")

    if source is None:
        source = "self"
    if not isinstance(source, (str, os.PathLike)):
        docs = _as_documents(source, text_field)
        tok = _require_tokenizer(tokenizer, "a list of documents")
        return _Sampler(tok, n_samples, seq_len, seed, model, bos_per_window).documents(docs)
    kind, resolved = _resolve(source, CALIBRATION_SOURCES)
    if kind == "name" and resolved in ("self", "generated"):
        return _generated_windows(
            model, tokenizer, n_samples, seq_len, seed, generation_batch_size, bos_per_window
        )
    what = f"source {resolved!r}" if kind == "name" else f"file {resolved}"
    tok = _require_tokenizer(tokenizer, what)
    sample = _Sampler(tok, n_samples, seq_len, seed, model, bos_per_window)
    if kind == "name":
        if resolved == "c4":
            return sample.documents(_Column(_load_c4("train", _C4_TRAIN_FILE), "text"))
        # Wanda/SparseGPT join the train rows with " " here (not "\n\n" as for the test split).
        return sample.stream(" ".join(_hf_texts(resolved, "train")))
    path = Path(resolved)
    if _is_stream_file(path):
        text = _read_text(path)
        if not text:
            raise ValueError(f"{path} is empty; give a file with text in it.")
        return sample.stream(text)
    docs = _read_documents(path, text_field)
    if len(docs) == 0:
        raise ValueError(f"{path} holds no documents; give a file with at least one record.")
    return sample.documents(docs)


def evaluation_tokens(
    source: str | os.PathLike[str] | torch.Tensor | Sequence[str] | Any | None,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    text: str | None = None,
    seq_len: int = 2048,
    max_docs: int = 1100,
    max_tokens: int | None = None,
    text_field: str = "text",
) -> torch.Tensor:
    """Tokenise the text perplexity is evaluated on, following the pruning literature.

    * ``"wikitext2"``: WikiText-2 raw test rows joined with ``"\\n\\n"``, tokenised once.
    * ``"c4"``: the first ``max_docs`` (1,100) documents of C4 validation shard 0 joined with
      ``" "``, tokenised, cut to ``max_tokens`` -- by default ``256 * seq_len``, Wanda's
      ``valenc[:, :(256 * seqlen)]``.
    * ``"ptb"``: Penn Treebank test sentences joined with ``" "``.
    * A ``.txt``/``.raw`` file: its text as is (the canonical ``wiki.test.raw`` is byte-identical
      to the joined WikiText-2 test rows, so it reproduces ``"wikitext2"`` offline).
    * A ``.jsonl``/``.json``/``.parquet`` file, a list of strings or a ``datasets.Dataset``: the
      first ``max_docs`` documents joined with ``" "`` (the C4 convention). Pass
      ``max_tokens=256 * seq_len`` to also apply the C4 cut.
    * ``text=``: the given string, tokenised. Raw text is never guessed from ``source``: a string
      source is a known name or a path, anything else is an error.

    Long text is tokenised whole, without truncation and without the tokenizer's "sequence length
    is longer than the specified maximum" warning (the stream is cut into windows later).

    Args:
        source: A name from :data:`EVALUATION_SOURCES`, a local file path, a list of documents, a
            ``datasets.Dataset``, a 1-D (or ``(1, n)``) token tensor, or ``None`` with ``text``.
            Names win over same-named files in the working directory, as in
            :func:`calibration_windows`.
        tokenizer: Tokenizer for text sources; may be ``None`` for a tensor source.
        text: Raw text to tokenise instead of ``source``.
        seq_len: Evaluation window length; only used for the C4 default of ``max_tokens``.
        max_docs: Documents joined for document sources.
        max_tokens: Keep only the first ``max_tokens`` tokens (default: all, except for ``"c4"``).
        text_field: Field/column holding the text in local document files and datasets.

    Returns:
        A 1-D ``torch.long`` tensor of token ids.

    Raises:
        ValueError: For an unknown name, both or neither of ``source`` and ``text``, empty text, a
            directory or unsupported file type, or non-positive ``max_docs``/``max_tokens``/
            ``seq_len``.
        FileNotFoundError: For a path-like string that does not exist.
    """
    _check_positive_int("seq_len", seq_len, 1, "use the model's evaluation length, e.g. 2048")
    _check_positive_int("max_docs", max_docs, 1, "join at least one document")
    if max_tokens is not None:
        _check_positive_int("max_tokens", max_tokens, 1, "use None to keep every token")

    if text is not None:
        if source is not None:
            raise ValueError("Give either `source` or `text=`, not both.")
        if not text:
            raise ValueError("`text` is empty; give the text to evaluate on.")
        ids = encode_text(_require_tokenizer(tokenizer, "text="), text)
        return _truncate(ids, max_tokens)
    if source is None:
        raise ValueError(
            "No evaluation text: pass a source (one of "
            f"{', '.join(map(repr, EVALUATION_SOURCES))} or a local file path) or `text=`."
        )
    if isinstance(source, torch.Tensor):
        ids = _validated_token_tensor(source, one_dimensional=True)
        return _truncate(ids, max_tokens)

    if isinstance(source, (str, os.PathLike)):
        kind, resolved = _resolve(source, EVALUATION_SOURCES, mention_text=True)
        if kind == "name":
            tok = _require_tokenizer(tokenizer, f"source {resolved!r}")
            if resolved == "wikitext2":
                joined = "\n\n".join(_hf_texts("wikitext2", "test"))
            elif resolved == "ptb":
                joined = " ".join(_hf_texts("ptb", "test"))
            else:
                dataset = _load_c4("validation", _C4_VALIDATION_FILE)
                joined = " ".join(dataset[:max_docs]["text"])
                if max_tokens is None:
                    max_tokens = 256 * seq_len
            return _truncate(encode_text(tok, joined), max_tokens)
        tok = _require_tokenizer(tokenizer, f"file {resolved}")
        path = Path(resolved)
        if _is_stream_file(path):
            joined = _read_text(path)
        else:
            joined = " ".join(_read_documents(path, text_field, limit=max_docs))
        if not joined:
            raise ValueError(f"{path} holds no text; give a file with text in it.")
        return _truncate(encode_text(tok, joined), max_tokens)

    docs = _as_documents(source, text_field)
    tok = _require_tokenizer(tokenizer, "a list of documents")
    joined = " ".join(docs[i] for i in range(min(len(docs), max_docs)))
    if not joined:
        raise ValueError("The documents hold no text; give non-empty documents.")
    return _truncate(encode_text(tok, joined), max_tokens)


def evaluation_windows(
    tokens: torch.Tensor,
    seq_len: int,
    max_windows: int | None = None,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """Cut an evaluation token stream into the windows perplexity is measured on.

    Without ``bos_token_id``, the literature's protocol: ``n = N // seq_len`` consecutive,
    non-overlapping windows of ``seq_len`` tokens, the remainder dropped.

    With ``bos_token_id`` (the ``bos_per_window`` setting, on): a BOS at the very start of the
    stream is dropped, and window ``i`` is ``[BOS]`` followed by the stream's tokens
    ``i * (seq_len - 1)`` to ``(i + 1) * (seq_len - 1) - 1``. Windows stay ``seq_len`` long and
    share no text token, so every text token they cover is a next-token target exactly once and
    the BOS never is. There are as many windows as without BOS, so perplexity scores the same
    number of tokens, ``n * (seq_len - 1)``, either way.

    Args:
        tokens: The token ids of the whole text, shape ``(N,)`` or ``(1, N)``.
        seq_len: Window length in tokens.
        max_windows: Keep only the first this many windows (C4 protocol: 256).
        bos_token_id: The BOS id to start every window with, or ``None`` for plain windows.

    Returns:
        A ``torch.long`` tensor of shape ``(n_windows, seq_len)``.

    Raises:
        ValueError: If ``seq_len < 2``, ``max_windows < 1``, ``tokens`` is not one sequence, or
            the text is shorter than one window.
    """
    if seq_len < 2:
        raise ValueError(
            f"seq_len must be at least 2 to have a next token to predict, got {seq_len}"
        )
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be None or at least 1, got {max_windows}")
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise ValueError(
            "input_ids must be one token sequence of shape (N,) or (1, N), "
            f"got {tuple(tokens.shape)}"
        )
    n_windows = tokens.numel() // seq_len
    if n_windows == 0:
        raise ValueError(
            f"the text has {tokens.numel()} tokens, fewer than one window of seq_len={seq_len}; "
            "pass a smaller seq_len or a longer text"
        )
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if bos_token_id is None:
        return tokens[: n_windows * seq_len].reshape(n_windows, seq_len).long()
    body_len = seq_len - 1
    # n * seq_len <= N, so n * (seq_len - 1) <= N - n: the stream still holds every window.
    body = _strip_bos(tokens, bos_token_id)[: n_windows * body_len]
    return _with_bos(body.reshape(n_windows, body_len), bos_token_id).long()


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


class _Sampler:
    """Wanda's window sampling (``get_c4`` / ``get_wikitext2``), optionally a BOS per window.

    The ``bos_per_window`` setting is resolved when the sampler is built, before any text is
    read or tokenised, so a tokenizer without a BOS token fails at once.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        n_samples: int,
        seq_len: int,
        seed: int,
        model: torch.nn.Module | None,
        bos_per_window: bool | None,
    ) -> None:
        self.bos_id = resolve_bos_per_window(
            bos_per_window,
            model,
            getattr(tokenizer, "bos_token_id", None),
            bos_from=f"the tokenizer ({type(tokenizer).__name__})",
        )
        self.tokenizer = tokenizer
        self.n_samples = n_samples
        self.seq_len = seq_len
        self.seed = seed
        # Text tokens per window: one position goes to the BOS when there is one per window.
        self.body_len = seq_len - (self.bos_id is not None)

    def encode(self, text: str) -> torch.Tensor:
        ids = encode_text(self.tokenizer, text)
        # The tokenizer's own BOS in front of the text would be a second one in the first window.
        return _strip_bos(ids, self.bos_id)

    def window(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        return _with_bos(ids[start : start + self.body_len], self.bos_id)

    def too_short(self) -> str:
        if self.bos_id is None:
            return f"seq_len={self.seq_len}"
        return f"{self.body_len} (seq_len={self.seq_len} less the BOS each window starts with)"

    def documents(self, docs: Sequence[str]) -> torch.Tensor:
        """Wanda's ``get_c4`` loop over ``docs``, with a guard against sources too short."""
        n_docs = len(docs)
        # Token ids of documents long enough to hold a window, None for those that are not.
        # Caching changes no random call (tokenisation is deterministic) but saves re-tokenising
        # documents the loop draws again, and lets the pre-scan's work be reused.
        cache: dict[int, torch.Tensor | None] = {}
        longest = 0

        def long_enough(i: int) -> torch.Tensor | None:
            nonlocal longest
            if i not in cache:
                ids = self.encode(_document_text(docs, i))
                longest = max(longest, ids.numel())
                cache[i] = ids if ids.numel() > self.body_len else None
            return cache[i]

        # Without this scan the rejection loop below would spin forever when no document
        # qualifies. It stops at the first long-enough document, which for real corpora is
        # among the first few.
        if not any(long_enough(i) is not None for i in range(n_docs)):
            raise ValueError(
                f"No document is longer than {self.too_short()} tokens (the longest of {n_docs} "
                f"has {longest}); lower seq_len or give longer text."
            )

        rng = random.Random(self.seed)
        windows = []
        used: set[int] = set()
        for _ in range(self.n_samples):
            while True:
                index = rng.randint(0, n_docs - 1)
                ids = long_enough(index)
                if ids is not None:
                    break
            used.add(index)
            windows.append(self.window(ids, rng.randint(0, ids.numel() - self.body_len - 1)))
        if len(used) < self.n_samples / 2:
            # The papers sample 128 windows from hundreds of thousands of C4 documents; a small
            # local slice gives windows that overlap heavily, which is worth knowing.
            warnings.warn(
                f"Only {len(used)} distinct documents longer than seq_len={self.seq_len} "
                f"provided the {self.n_samples} calibration windows; give more (or longer) "
                "documents for a calibration set as diverse as the literature's.",
                stacklevel=3,
            )
        return torch.stack(windows)

    def stream(self, text: str) -> torch.Tensor:
        """Wanda's ``get_wikitext2`` sampling of random windows from one token stream."""
        ids = self.encode(text)
        n_tokens = ids.numel()
        # randint(0, n - seq_len - 1) needs n > seq_len; the published code never uses the last
        # token.
        if n_tokens <= self.body_len:
            raise ValueError(
                f"The text has {n_tokens} tokens, not more than {self.too_short()}; lower "
                "seq_len or give longer text."
            )
        rng = random.Random(self.seed)
        starts = [rng.randint(0, n_tokens - self.body_len - 1) for _ in range(self.n_samples)]
        return torch.stack([self.window(ids, s) for s in starts])


def _generated_windows(
    model: torch.nn.Module | None,
    tokenizer: PreTrainedTokenizerBase | None,
    n_samples: int,
    seq_len: int,
    seed: int,
    batch_size: int,
    bos_per_window: bool | None = None,
) -> torch.Tensor:
    """Sample ``n_samples`` sequences of ``seq_len`` tokens from ``model`` (LLM-QAT style)."""
    if model is None:
        raise ValueError(
            "Data-free calibration ('self'/'generated') samples text from the model: pass "
            "model=..., or give calibration text (a dataset name or a local file)."
        )
    if not callable(getattr(model, "generate", None)):
        raise TypeError(
            f"{type(model).__name__} has no generate(); pass a transformers causal LM for "
            "data-free calibration."
        )
    # Generation starts from the BOS token whenever one exists, so the windows already start
    # with it; the setting only has to make sure there is one.
    resolve_bos_per_window(
        bos_per_window,
        model,
        _bos_token_id(model, tokenizer),
        bos_from="the model's (generation) config or the tokenizer",
    )
    start_id = _start_token_id(model, tokenizer)
    eos_ids = _eos_token_ids(model, tokenizer)
    pad_id = _first_int(getattr(getattr(model, "generation_config", None), "pad_token_id", None))
    if pad_id is None:
        # Every row has the same length so nothing is padded; naming a pad id only silences
        # generate()'s "Setting pad_token_id" notice.
        pad_id = eos_ids[0] if eos_ids else start_id
    device = model_device(model)

    # Eval mode: dropout would make the samples depend on the module's mode.
    with eval_mode(model), _forked_rng(device), torch.no_grad():
        torch.manual_seed(seed)
        chunks = []
        for begin in range(0, n_samples, batch_size):
            rows = min(batch_size, n_samples - begin)
            prompt = torch.full((rows, 1), start_id, dtype=torch.long, device=device)
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                # top_k=None would fall back to the default of 50; 0 disables the cut so the
                # samples follow the model's full distribution.
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                typical_p=1.0,
                repetition_penalty=1.0,
                max_new_tokens=seq_len - 1,
                # min_new_tokens == max_new_tokens masks every EOS id, so no row stops early.
                min_new_tokens=seq_len - 1,
                eos_token_id=eos_ids or None,
                pad_token_id=pad_id,
            )
            if out.shape != (rows, seq_len):
                raise RuntimeError(
                    f"generate() returned shape {tuple(out.shape)}, expected {(rows, seq_len)}"
                )
            chunks.append(out.to("cpu", torch.long))
    return torch.cat(chunks)


def _forked_rng(device: torch.device) -> Any:
    """Fork the RNGs generation draws from, so seeding does not leak into the caller's state."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    if device.type == "cuda":
        # manual_seed seeds every CUDA device, so all of them are forked and restored.
        return torch.random.fork_rng(devices=list(range(torch.cuda.device_count())))
    return torch.random.fork_rng(device_type=device.type)


def _bos_token_id(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> int | None:
    """The model's BOS id, else the tokenizer's (``None`` when neither has one)."""
    token_id = model_bos_token_id(model)
    return (
        token_id if token_id is not None else _first_int(getattr(tokenizer, "bos_token_id", None))
    )


def _start_token_id(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> int:
    """The model's BOS id, else the tokenizer's BOS, else an EOS id (documents start after one)."""
    candidates = (
        _bos_token_id(model, tokenizer),
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(getattr(model, "config", None), "eos_token_id", None),
    )
    for candidate in candidates:
        token_id = _first_int(candidate)
        if token_id is not None:
            return token_id
    raise ValueError(
        "Cannot start data-free generation: neither the model nor the tokenizer defines a BOS or "
        "EOS token; set model.generation_config.bos_token_id."
    )


def _eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    """Every EOS id the model or tokenizer knows, so min_new_tokens masks all of them."""
    ids: list[int] = []
    for value in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        values = value if isinstance(value, (list, tuple)) else [value]
        ids.extend(int(v) for v in values if isinstance(v, int) and int(v) not in ids)
    return ids


def _first_int(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class _Column(Sequence[str]):
    """Lazy list view of one text column of a ``datasets.Dataset``.

    Lazy so that a full C4 shard (356k documents) is not copied into Python strings when the
    sampler only reads a few hundred of them.
    """

    def __init__(self, dataset: Any, field: str) -> None:
        names = list(getattr(dataset, "column_names", None) or [])
        if field not in names:
            raise ValueError(
                f"The dataset has no column {field!r} (it has {names}); set text_field."
            )
        self._dataset = dataset
        self._field = field

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._dataset[int(index)][self._field]


def _as_documents(source: Any, text_field: str) -> Sequence[str]:
    """Validate an in-memory document source: a list of strings or a ``datasets.Dataset``."""
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):
        docs: Sequence[str] = _Column(source, text_field)
    elif isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        docs = source
    else:
        raise TypeError(
            f"Unsupported source type {type(source).__name__}: pass a dataset name, a local file "
            "path, a list of strings, a datasets.Dataset or a token tensor."
        )
    if len(docs) == 0:
        raise ValueError("The source is empty; give at least one document.")
    return docs


def _document_text(docs: Sequence[str], index: int) -> str:
    text = docs[index]
    if not isinstance(text, str):
        raise TypeError(f"Document {index} is a {type(text).__name__}, not a string.")
    return text


def batch_token_ids(batch: Any) -> torch.Tensor:
    """The token ids of one batch, as an int64 ``(batch, seq_len)`` tensor.

    The one normaliser of batch layouts, for calibration and training alike: a tensor (a
    ``(seq_len,)`` one is one row), a mapping with ``input_ids`` (a tokenizer's output), or a
    tuple/list whose first item is the ids (``(input_ids, labels)``). Nested lists of ints work
    too.

    Raises:
        ValueError: a mapping without ``input_ids``, or anything that is not integer ids of
            one or two dimensions.
    """
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"A dict batch needs an 'input_ids' entry; got keys {sorted(batch)}.")
        batch = batch["input_ids"]
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        batch = batch[0]
    try:
        ids = torch.as_tensor(batch)
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is not None and ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids is None or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        shown = f"{tuple(ids.shape)} {ids.dtype}" if ids is not None else type(batch).__name__
        raise ValueError(
            "Batches must hold integer token ids shaped (batch, seq_len) (a tensor, a dict with "
            f"'input_ids' or a tuple whose first item is that); got {shown}."
        )
    return ids.long()


def check_source(source: Any, role: str = "calibration") -> None:
    """Fail now, before any model loads, if a text source can never be read.

    Token tensors and ``None`` pass; a name must be one of the ``role``'s sources
    (``"calibration"``: :data:`CALIBRATION_SOURCES`, ``"evaluation"``: :data:`EVALUATION_SOURCES`)
    and a path must be an existing file of a supported type.
    """
    if source is None or isinstance(source, torch.Tensor):
        return
    if isinstance(source, (str, os.PathLike)):
        names = CALIBRATION_SOURCES if role == "calibration" else EVALUATION_SOURCES
        _resolve(source, names, mention_text=role == "evaluation")


def _resolve(
    source: str | os.PathLike[str], names: tuple[str, ...], mention_text: bool = False
) -> tuple[str, str]:
    """Classify ``source`` as ``("name", canonical_name)`` or ``("path", path)``."""
    if isinstance(source, os.PathLike):
        return "path", _checked_file(Path(source))
    if not source.strip():
        raise ValueError("The source is an empty string; give a dataset name or a file path.")
    looks_like_path = any(sep in source for sep in ("/", os.sep)) or bool(_data_suffix(source))
    key = source.strip().lower().replace("-", "").replace("_", "")
    # A bare known name is the name even if the working directory has a file or folder of that
    # name (running from a data root with a "c4/" folder is common); "./c4" means the path.
    if key in names and not looks_like_path:
        return "name", key
    path = Path(source).expanduser()
    if path.exists() or looks_like_path:
        return "path", _checked_file(path)
    hint = " Pass raw text with text=... instead." if mention_text else ""
    raise ValueError(
        f"Unknown source {source!r}: use one of {', '.join(map(repr, names))}, or the path of "
        f"{_ACCEPTED_FILES}.{hint}"
    )


def _data_suffix(path: str | Path) -> str:
    """The recognised data suffix of ``path`` (``.gz`` looked through), or ``""``."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        inner = suffixes[-2] if len(suffixes) > 1 else ""
        return inner if inner in (".jsonl", ".json", *STREAM_SUFFIXES) else ""
    last = suffixes[-1] if suffixes else ""
    return last if last in DOCUMENT_SUFFIXES + STREAM_SUFFIXES else ""


def _checked_file(path: Path) -> str:
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass {_ACCEPTED_FILES}.")
    if not path.exists():
        raise FileNotFoundError(f"No such file: {path}.")
    if not _data_suffix(path):
        raise ValueError(f"Unsupported file type {path.name!r}; pass {_ACCEPTED_FILES}.")
    return str(path)


def _is_stream_file(path: Path) -> bool:
    return _data_suffix(path) in STREAM_SUFFIXES


def _open_text(path: Path) -> Any:
    # newline="" keeps "\r\n" and lone "\r" as they are: "read as is" must mean byte for byte.
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_text(path: Path) -> str:
    with _open_text(path) as handle:
        return handle.read()


def _read_documents(path: Path, text_field: str, limit: int | None = None) -> list[str]:
    """Read the documents of a ``.jsonl``/``.json``/``.parquet`` file, at most ``limit``."""
    if _data_suffix(path) == ".parquet":
        return _read_parquet(path, text_field, limit)
    with _open_text(path) as handle:
        lines = iter(handle)
        docs: list[str] = []
        for line_no, line in enumerate(lines, 1):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            if not docs and line.lstrip().startswith("["):
                # A JSON list of records; anything else is read as JSON lines, which is also
                # what C4's .json.gz shards hold despite their suffix.
                records = json.loads(line + "".join(lines))
                if not isinstance(records, list):
                    raise ValueError(f"{path}: expected a JSON list of records.")
                records = records[:limit] if limit is not None else records
                return [_record_text(r, text_field, path, n) for n, r in enumerate(records, 1)]
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg}).") from err
            docs.append(_record_text(record, text_field, path, line_no))
        return docs


def _record_text(record: Any, text_field: str, path: Path, where: int) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get(text_field), str):
        return record[text_field]
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(
        f"{path}: record {where} has no string field {text_field!r} (it has {keys}); set "
        "text_field."
    )


def _read_parquet(path: Path, text_field: str, limit: int | None) -> list[str]:
    import pyarrow.parquet as pq  # a dependency of `datasets`; imported only when needed

    names = pq.read_schema(path).names
    if text_field not in names:
        raise ValueError(f"{path} has no column {text_field!r} (it has {names}); set text_field.")
    column = pq.read_table(path, columns=[text_field]).column(text_field)
    if limit is not None:
        column = column.slice(0, limit)
    docs = column.to_pylist()
    for n, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise ValueError(f"{path}: row {n} of {text_field!r} is not a string.")
    return docs


def _from_hub(repo: str, *args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset`` with an error that says how to work without the Hub."""
    from datasets import load_dataset  # imported lazily: only the Hub sources need it

    try:
        return load_dataset(repo, *args, **kwargs)
    except Exception as err:
        raise RuntimeError(
            f"Could not load {repo!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Without network access, point at a local copy instead: the path of "
            f"{_ACCEPTED_FILES} (for example calibration_data: /data/c4-train.00000-of-01024.jsonl "
            "or val_data: /data/wikitext-2-raw/wiki.test.raw)."
        ) from err


def _load_c4(split: str, data_file: str) -> Any:
    # Wanda also passes the config name "allenai--c4", which current `datasets` rejects; the data
    # file alone selects the same shard.
    return _from_hub(_C4_REPO, data_files={split: data_file}, split=split)


def _hf_texts(name: str, split: str) -> list[str]:
    """The text rows of WikiText-2 (raw) or PTB (text only) from the Hub."""
    if name == "wikitext2":
        return list(_from_hub(_WIKITEXT_REPO, _WIKITEXT_CONFIG, split=split)["text"])
    # The Hub copy of PTB is script-based, which newer `datasets` refuse: the error says to
    # pass a local copy (the Mikolov ptb.test.txt file).
    return list(_from_hub(_PTB_REPO, _PTB_CONFIG, split=split)["sentence"])


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Tokenise a whole (long) text in one call, exactly as ``tokenizer(text)`` does.

    Special tokens are added the tokenizer's default way (a LLaMA or Gemma tokenizer puts one
    BOS at the very start of the text), matching ``tokenizer(text, return_tensors="pt")`` in the
    Wanda and SparseGPT code. Nothing is truncated, and the tokenizer's "sequence length is
    longer than the specified maximum" warning is not raised: the text is far longer than
    ``model_max_length`` on purpose, since it is cut into windows later.

    Args:
        tokenizer: A Hugging Face tokenizer.
        text: The text, e.g. the whole WikiText-2 test file.

    Returns:
        A 1-D ``torch.long`` tensor of token ids.
    """
    # verbose=False silences just the length check, without touching global logging or the
    # tokenizer's state. It changes no ids.
    encoded = tokenizer(text, return_tensors="pt", truncation=False, verbose=False)
    return encoded["input_ids"].reshape(-1).to(torch.long)


def _strip_bos(ids: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """Drop one leading BOS (``bos_id`` ``None``: nothing to strip)."""
    if bos_id is not None and ids.numel() > 0 and int(ids[0]) == bos_id:
        return ids[1:]
    return ids


def _with_bos(body: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """``body`` with ``bos_id`` in front along the last dimension (``None``: ``body`` as is)."""
    if bos_id is None:
        return body
    bos = torch.full((*body.shape[:-1], 1), bos_id, dtype=body.dtype, device=body.device)
    return torch.cat([bos, body], dim=-1)


def _truncate(ids: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    return ids if max_tokens is None else ids[:max_tokens]


def _require_tokenizer(
    tokenizer: PreTrainedTokenizerBase | None, what: str
) -> PreTrainedTokenizerBase:
    if tokenizer is None:
        raise ValueError(f"A tokenizer is needed to tokenise {what}; pass tokenizer=...")
    return tokenizer


def _check_positive_int(name: str, value: Any, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}; {fix}.")


def _validated_token_tensor(tokens: torch.Tensor, one_dimensional: bool = False) -> torch.Tensor:
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"Token ids must be an integer tensor, got dtype {tokens.dtype}.")
    if one_dimensional:
        if tokens.dim() == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(
                "Expected a non-empty 1-D (or (1, n)) token tensor, got shape "
                f"{tuple(tokens.shape)}."
            )
    elif tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise ValueError(
            "Expected token windows of shape (n_samples, seq_len) with n_samples >= 1 and "
            f"seq_len >= 2, got shape {tuple(tokens.shape)}; reshape the tensor."
        )
    return tokens.long()
