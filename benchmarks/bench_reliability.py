#!/usr/bin/env python3
"""Reliability benchmark: fault injection against the public API (issue 11).

Every case sets up one fault -- a bad argument, an interruption, a corrupted or unwritable file
-- on a tiny randomly initialised model (LLaMA-shaped, hidden 64, vocabulary 128; OPT, GPT-NeoX
and Gemma where a case is family specific) in a fresh temporary directory, runs the public API
(``prune``, ``save_pruned_model``, ``optishear_search`` / ``optishear_prune``,
``OptiShearCallback`` in a Lightning ``Trainer`` on the CPU, the ``optishear`` CLI in a
subprocess, ``SearchResult.load``, ``calibration_windows``, ``perplexity``) and *measures* what
happened: the exception type and the first line of its message, whether the weights are
bit-identical to before (SHA-256 of every parameter), whether the user's files are still there
byte for byte, the permissions of what was written, mask sparsities, evaluations saved and
redone. A case is *handled* when every measured check matches the expectation written beside
it; nothing in the ``observed`` column is hard-coded.

Interruptions are real where they can be: ``kill -9`` of a search, a save and a training run
in child processes (this script started again with ``--child``), a real ``SIGINT`` sent to a
child in the middle of a prune; ``KeyboardInterrupt`` and other exceptions injected by forward
hooks inside the process. Read-only directories cannot be made for root (``os.access`` and
``mkdir`` succeed regardless), so they are simulated two ways: a path under a regular file
(which no user can create) and ``os.access`` patched to deny writing, as a non-root user sees it.

Run it from the repository root (2-5 minutes on 2 shared CPU cores, most of it in the
subprocesses: CLI runs and the killed children)::

    python benchmarks/bench_reliability.py [--out benchmarks/results]

It prints the table (case, expected, observed, handled) and writes ``reliability_cpu.md`` and
``reliability_cpu.json`` (machine, versions, date, every case) to ``--out``. ``--only TEXT``
runs the cases whose id contains ``TEXT`` (and writes nothing unless ``--out`` is given);
``--list`` lists the cases. The exit status is 1 when any case is not handled.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import io
import json
import logging
import os
import platform
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
import torch
from harness import (
    REPO_ROOT,
    git_revision,
    md_cell,
    md_table,
    script_command,
    usable_cpus,
    utc_now,
    write_report,
)

VOCAB = 128
HIDDEN = 64
CASE_TIMEOUT_S = 240
CHILD_TIMEOUT_S = 240

# --------------------------------------------------------------------------------------------
# Cases and outcomes
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a case observed, and whether that is what was expected."""

    observed: str
    handled: bool


@dataclass
class Case:
    """One fault: where it comes from (issue item or family), what should happen, the probe."""

    id: str
    group: str
    expected: str
    fn: Callable[[Path], Outcome]


@dataclass
class Record:
    """A case's row in the results."""

    number: int
    id: str
    group: str
    expected: str
    observed: str
    handled: bool
    seconds: float
    crashed: bool = False
    detail: str = ""


CASES: list[Case] = []


def case(group: str, expected: str) -> Callable:
    """Register ``fn`` (named ``case_<id>``) as a case of ``group``.

    Args:
        group: the issue item (``"1 overwrite"``) or the family of faults it belongs to.
        expected: the behaviour a user should get, in words.
    """

    def register(fn: Callable[[Path], Outcome]) -> Callable[[Path], Outcome]:
        name = fn.__name__.removeprefix("case_").replace("_", "-")
        CASES.append(Case(name, group, expected, fn))
        return fn

    return register


class CaseTimeout(Exception):
    """A case ran past its time limit."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout(f"case ran longer than {CASE_TIMEOUT_S} s")


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, bit for bit (NaNs included)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tree_digest(path: Path) -> str:
    """SHA-256 of a file, or of every path and file content under a directory."""
    digest = hashlib.sha256()
    if path.is_file():
        digest.update(path.read_bytes())
        return digest.hexdigest()
    if not path.exists():
        return "missing"
    for item in sorted(path.rglob("*")):
        digest.update(str(item.relative_to(path)).encode())
        if item.is_file():
            digest.update(item.read_bytes())
    return digest.hexdigest()


def first_line(err: BaseException, limit: int = 220) -> str:
    """``Type: first line of the message`` of an exception, shortened."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary siblings (``.name.tmp-*``, ``.name.old-*``) a save left beside ``name``."""
    return sorted(p.name for p in parent.glob(f".{name}.*"))


def mode(path: Path) -> str:
    """Permission bits of ``path`` in octal (``0o755``)."""
    return oct(stat.S_IMODE(path.stat().st_mode))


def call(action: Callable[[], Any], allow: tuple[type[BaseException], ...] = ()) -> Any:
    """Run ``action``; return its value, or the exception it raised.

    ``KeyboardInterrupt`` is only caught when ``allow`` names it, so the benchmark itself stays
    interruptible; a case timeout is never caught.
    """
    try:
        return action()
    except CaseTimeout:
        raise
    except Exception as err:
        return err
    except BaseException as err:
        if isinstance(err, allow):
            return err
        raise


def refused(
    action: Callable[[], Any],
    types: type[BaseException] | tuple[type[BaseException], ...],
    needles: tuple[str, ...] = (),
    *,
    model: torch.nn.Module | None = None,
    keep: tuple[Path, ...] = (),
    absent: tuple[Path, ...] = (),
) -> Outcome:
    """Expect ``action`` to raise ``types`` with every needle in its message, and nothing lost.

    Args:
        action: the call that should be refused.
        types: the acceptable exception types.
        needles: text the message must contain (case-insensitive), e.g. the path or the limit.
        model: its weights must be bit-identical afterwards.
        keep: files or directories that must be byte-identical afterwards.
        absent: paths that must not exist afterwards (nothing half-written).
    """
    types = types if isinstance(types, tuple) else (types,)
    before = model_digest(model) if model is not None else None
    trees = {p: tree_digest(p) for p in keep}
    result = call(action, allow=tuple(t for t in types if not issubclass(t, Exception)))
    notes, ok = [], True
    if not isinstance(result, BaseException):
        notes.append("no error raised")
        ok = False
    else:
        notes.append(first_line(result))
        ok &= isinstance(result, types)
        message = str(result).lower()
        missing = [n for n in needles if n.lower() not in message]
        if missing:
            notes.append(f"message lacks {missing}")
            ok = False
    ok &= _unchanged(model, before, trees, absent, notes)
    return Outcome("; ".join(notes), ok)


def _unchanged(
    model: torch.nn.Module | None,
    before: str | None,
    trees: dict[Path, str],
    absent: tuple[Path, ...],
    notes: list[str],
) -> bool:
    """Append what stayed the same (or did not) to ``notes``; ``True`` when all did."""
    ok = True
    if model is not None:
        same = model_digest(model) == before
        notes.append("weights unchanged" if same else "WEIGHTS CHANGED")
        ok &= same
    for path, digest in trees.items():
        same = tree_digest(path) == digest
        notes.append(f"{path.name} kept" if same else f"{path.name} CHANGED OR LOST")
        ok &= same
    for path in absent:
        gone = not path.exists()
        notes.append(f"nothing at {path.name}" if gone else f"{path.name} EXISTS")
        ok &= gone
    return ok


@contextlib.contextmanager
def captured() -> Iterator[SimpleNamespace]:
    """Collect warnings and Lightning's log lines (``rank_zero_info``) while the block runs."""
    records = SimpleNamespace(warnings=[], logs=[])

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.logs.append(record.getMessage())

    logger = logging.getLogger("lightning.pytorch")
    saved = logger.handlers[:], logger.level
    logger.handlers = [Collect()]
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
            records.warnings.extend(str(w.message) for w in caught)
    finally:
        logger.handlers, _ = saved
        logger.setLevel(saved[1])


def mentions(lines: list[str], *needles: str) -> str | None:
    """The first of ``lines`` that contains every needle (case-insensitive)."""
    for line in lines:
        if all(n.lower() in line.lower() for n in needles):
            return line
    return None


def short(text: str, limit: int = 200) -> str:
    """First line of ``text``, shortened."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Tiny models, tokens, tokenizer
# --------------------------------------------------------------------------------------------


def tiny_llama(seed: int = 0, layers: int = 2, max_positions: int = 256) -> torch.nn.Module:
    """A random LLaMA: hidden 64, 4 heads (2 KV heads), vocabulary 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    return LlamaForCausalLM(config).eval()


def tiny_opt(seed: int = 0, max_positions: int = 64) -> torch.nn.Module:
    """A random OPT with 2 blocks (learned positions: an index error past the table)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        ffn_dim=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        word_embed_proj_dim=HIDDEN,
    )
    return OPTForCausalLM(config).eval()


def tiny_neox(seed: int = 0, max_positions: int = 64) -> torch.nn.Module:
    """A random GPT-NeoX with 2 blocks (rotary: runs silently past its positions)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
    )
    return GPTNeoXForCausalLM(config).eval()


def tiny_gemma(seed: int = 0) -> torch.nn.Module:
    """A random Gemma with 2 blocks (a family that needs BOS at the start of a sequence)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    config = GemmaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        # the ids of tiny_tokenizer()'s specials (real Gemma: bos 2, eos 1, pad 0)
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return GemmaForCausalLM(config).eval()


def tokens(*shape: int, seed: int = 0, low: int = 0) -> torch.Tensor:
    """Random token ids in ``[low, VOCAB)``."""
    return torch.randint(low, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def corpus(words: int = 3000, seed: int = 0) -> str:
    """Pseudo-text of random syllable words (deterministic)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "gu", "he"]
    out = []
    for i in range(words):
        out.append("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))))
        if i % 17 == 16:
            out.append(".")
    return " ".join(out)


def tiny_tokenizer() -> Any:
    """A BPE tokenizer with 128 entries (``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3).

    Token ids 1 and 2 are the BOS/EOS ids of ``LlamaConfig``'s defaults, so the tiny models
    and this tokenizer agree.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special, show_progress=False)
    tok.train_from_iterator([corpus(2000, seed=9)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


# --------------------------------------------------------------------------------------------
# Shared fixtures (built once, on first use)
# --------------------------------------------------------------------------------------------

_FIXTURES: dict[str, Any] = {}
_SESSION: dict[str, Path] = {}


def fixture(builder: Callable[[Path], Any]) -> Any:
    """The value of ``builder(directory)``, built once per run in its own directory."""
    name = builder.__name__
    if name not in _FIXTURES:
        directory = _SESSION["root"] / "fixtures" / name
        directory.mkdir(parents=True)
        try:
            _FIXTURES[name] = builder(directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)  # the next case builds it again
            raise
    return _FIXTURES[name]


def model_dir(directory: Path) -> Path:
    """A tiny LLaMA and its tokenizer saved with ``save_pretrained`` (what the CLI loads)."""
    model = tiny_llama()
    model.save_pretrained(directory / "model")
    tiny_tokenizer().save_pretrained(directory / "model")
    return directory / "model"


def text_file(directory: Path) -> Path:
    """A ``.txt`` calibration file of pseudo-text."""
    path = directory / "calibration.txt"
    path.write_text(corpus())
    return path


def jsonl_file(directory: Path) -> Path:
    """A ``.jsonl`` calibration file: 20 documents of pseudo-text."""
    path = directory / "calibration.jsonl"
    docs = [json.dumps({"text": corpus(150, seed=i)}) for i in range(20)]
    path.write_text("\n".join(docs) + "\n")
    return path


def search_fixture(directory: Path) -> SimpleNamespace:
    """One tiny search with a state file and its saved result."""
    from optishear_lightning.search import optishear_search

    state = directory / "state.json"
    model = tiny_llama()
    result = optishear_search(model, tokens(8, 32), 0.5, **tiny_search_args(), state_path=state)
    result.save(directory / "result.json")
    return SimpleNamespace(state=state, result=result, path=directory / "result.json")


def checkpoint_fixture(directory: Path) -> SimpleNamespace:
    """A checkpoint of a Wanda-pruned tiny LLaMA after 2 fine-tuning steps (with the
    callback's state: packed masks, summary, per-layer sparsity)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from optishear_lightning import CausalLMModule, OptiShearCallback

    module = CausalLMModule(tiny_llama(), learning_rate=1e-2)
    cb = OptiShearCallback(method="wanda", sparsity=0.5, progress=False)
    ckpt = ModelCheckpoint(dirpath=directory / "ckpt", save_last=True, every_n_train_steps=1)
    trainer(directory, cb, ckpt, max_steps=2).fit(module, datamodule=datamodule())
    path = directory / "ckpt" / "last.ckpt"
    return SimpleNamespace(
        path=path, masks={n: cb.masks.keep_mask(n).clone() for n in cb.masks.names}
    )


# --------------------------------------------------------------------------------------------
# Lightning and search helpers
# --------------------------------------------------------------------------------------------


def datamodule(**overrides: Any) -> Any:
    """A ``TextDataModule`` on random token tensors (no tokenizer needed)."""
    from optishear_lightning import TextDataModule

    args = dict(
        tokenizer=None,
        train_data=tokens(16, 32, seed=1),
        val_data=tokens(128, seed=2),
        test_data=None,
        calibration_data=tokens(8, 32, seed=3),
        seq_len=32,
        batch_size=2,
    )
    return TextDataModule(**(args | overrides))


def trainer(root: Path, *callbacks: Any, **overrides: Any) -> Any:
    """A quiet CPU ``Trainer`` for a few steps."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    args = dict(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    return Trainer(**(args | overrides))


def tiny_search_config(**changes: Any) -> Any:
    """A search of about a second on a tiny model."""
    from optishear_lightning.search import SearchConfig

    base = dict(
        budget=6,
        pop_size=4,
        proxy_blocks=1,
        metric_topk=1,
        objective_samples=2,
        objective_seq_len=16,
        validation_samples=2,
    )
    return SearchConfig(**(base | changes))


def tiny_search_args() -> dict[str, Any]:
    """``optishear_search`` keywords of a tiny search over three metrics (no output)."""
    from optishear_lightning.search import MAGNITUDE, WANDA, MetaMetric

    metrics = [WANDA, MAGNITUDE, MetaMetric("sqrt", "identity", "column_sum", "none")]
    return dict(config=tiny_search_config(), metric_candidates=metrics, progress=False)


def callback_state(ckpt: dict) -> dict:
    """The ``OptiShearCallback`` entry of a loaded checkpoint."""
    key = next(k for k in ckpt.get("callbacks", {}) if "OptiShearCallback" in k)
    return ckpt["callbacks"][key]


def resume(
    root: Path, mutate: Callable[[dict], None] | None = None, **callback_args: Any
) -> SimpleNamespace:
    """Resume the fixture checkpoint (after ``mutate`` edits it) for 2 more steps.

    Returns the error (or ``None``), the warnings and log lines, the step reached, the
    callback and the module.
    """
    from optishear_lightning import CausalLMModule, OptiShearCallback

    source = fixture(checkpoint_fixture)
    ckpt = torch.load(source.path, weights_only=False)
    if mutate is not None:
        mutate(ckpt)
    path = root / "edited.ckpt"
    torch.save(ckpt, path)
    module = CausalLMModule(tiny_llama(), learning_rate=1e-2)
    cb = OptiShearCallback(
        **({"method": "wanda", "sparsity": 0.5, "progress": False} | callback_args)
    )
    tr = trainer(root, cb, max_steps=4)
    with captured() as seen:
        err = call(lambda: tr.fit(module, datamodule=datamodule(), ckpt_path=path))
    return SimpleNamespace(
        error=err if isinstance(err, BaseException) else None,
        warnings=seen.warnings,
        logs=seen.logs,
        step=tr.global_step,
        cb=cb,
        module=module,
        saved_masks=source.masks,
    )


def masks_equal(cb: Any, saved: dict[str, torch.Tensor]) -> bool:
    """The callback holds exactly ``saved`` (same names, same bits)."""
    if cb.masks is None or set(cb.masks.names) != set(saved):
        return False
    return all(torch.equal(cb.masks.keep_mask(n).cpu(), m.cpu()) for n, m in saved.items())


def resume_refused(run: SimpleNamespace, *needles: str) -> Outcome:
    """A resume must fail with a ``ValueError`` naming ``needles`` before any new step."""
    notes, ok = [], True
    if run.error is None:
        notes.append(f"no error; trained to step {run.step}")
        if run.cb.masks is not None:
            notes.append(f"mask sparsity {run.cb.masks.sparsity():.4f}")
        return Outcome("; ".join(notes), False)
    notes.append(first_line(run.error))
    ok &= isinstance(run.error, ValueError)
    missing = [n for n in needles if n.lower() not in str(run.error).lower()]
    if missing:
        notes.append(f"message lacks {missing}")
        ok = False
    trained = run.step > 2
    notes.append(f"no training step ran (step {run.step})" if not trained else "TRAINED ON")
    return Outcome("; ".join(notes), ok and not trained)


# --------------------------------------------------------------------------------------------
# Child processes (this script with --child): killed or interrupted for real
# --------------------------------------------------------------------------------------------


def spawn(kind: str, *args: str, **popen: Any) -> subprocess.Popen:
    """Start ``python bench_reliability.py --child kind args...``."""
    cmd = script_command(__file__, "--child", kind, *args)
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, **popen
    )


def wait_for(check: Callable[[], bool], proc: subprocess.Popen, timeout: float) -> bool:
    """Poll ``check`` every 10 ms until it holds; ``False`` if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        if proc.poll() is not None:
            return check()
        time.sleep(0.01)
    return False


def child_failure(proc: subprocess.Popen, what: str) -> Outcome:
    """The child never reached the point where the fault was to be injected."""
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate(timeout=30)
    tail = short(err.strip().splitlines()[-1]) if err.strip() else f"exit {proc.returncode}"
    return Outcome(f"child never reached {what} ({tail})", False)


def kill9(proc: subprocess.Popen) -> int:
    """``SIGKILL`` the child and reap it; its exit status."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    return proc.returncode


def read_json(path: Path) -> Any:
    """JSON of ``path``, or ``None`` while it is missing or being written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def entries(state: Any, kind: str) -> list[dict]:
    """History entries of ``kind`` in a search state (``[]`` for no state)."""
    if not isinstance(state, dict):
        return []
    return [h for h in state.get("history", []) if isinstance(h, dict) and h.get("kind") == kind]


KILL_SEARCH = {
    # phase -> the search settings of the child (a 4-block model)
    "ratios": dict(search_metric=False, budget=40, pop_size=4, baselines=[]),
    "screen": dict(proxy_blocks=None, budget=4, pop_size=4, baselines=[]),
}


def kill_search_config(phase: str) -> Any:
    return tiny_search_config(**KILL_SEARCH[phase])


def child_search(state: str, phase: str) -> None:
    """A search whose candidates are slowed (50 ms each; 10 ms per screened metric), so that
    the parent's ``kill -9`` lands in the middle of ``phase``."""
    from optishear_lightning.search import optishear_search
    from optishear_lightning.search.context import SearchContext

    name = "evaluate" if phase == "ratios" else "proxy_error"
    original = getattr(SearchContext, name)
    pause = 0.05 if phase == "ratios" else 0.01

    def slowed(self: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(pause)
        return original(self, *args, **kwargs)

    setattr(SearchContext, name, slowed)
    model = tiny_llama(layers=4)
    config = kill_search_config(phase)
    optishear_search(model, tokens(8, 32), 0.5, config=config, state_path=state, progress=False)


def child_sigint_prune(ready: str, out: str) -> None:
    """A prune that waits in block 2 of 4 (blocks 0-1 already pruned) for the parent's
    ``SIGINT``; writes whether the weights came back bit-exactly."""
    from optishear_lightning import prune

    model = tiny_llama(layers=4)
    before = model_digest(model)
    seen: dict[str, float] = {}

    def wait_here(module: Any, args: Any, output: Any) -> None:
        q = model.model.layers[0].self_attn.q_proj.weight
        seen["block0_zeros"] = float((q == 0).float().mean())
        Path(ready).touch()
        time.sleep(60)

    model.model.layers[2].register_forward_hook(wait_here)
    try:
        prune(model, tokens(8, 32), "wanda", 0.5, atomic=True)
        outcome = {"interrupted": False}
    except KeyboardInterrupt:
        outcome = {"interrupted": True}
    outcome |= {"restored": model_digest(model) == before} | seen
    Path(out).write_text(json.dumps(outcome))


def child_save(dest: str, ready: str, overwrite: str) -> None:
    """``save_pruned_model`` that stops after the weights are written, for ``kill -9``."""
    from optishear_lightning import save_pruned_model

    model = tiny_llama(seed=1)
    original = model.save_pretrained

    def stalled(path: Any, **kwargs: Any) -> None:
        original(path, **kwargs)
        Path(ready).touch()
        time.sleep(60)

    model.save_pretrained = stalled
    save_pruned_model(model, dest, overwrite=overwrite == "1")


def child_fit(root: str, ready: str) -> None:
    """Wanda + sparse fine-tuning with a checkpoint every step; stalls after step 3."""
    from lightning.pytorch import Callback
    from lightning.pytorch.callbacks import ModelCheckpoint

    from optishear_lightning import CausalLMModule, OptiShearCallback

    class Stall(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step >= 3:
                Path(ready).touch()
                time.sleep(60)

    module = CausalLMModule(tiny_llama(), learning_rate=1e-2)
    cb = OptiShearCallback(method="wanda", sparsity=0.5, progress=False)
    ckpt = ModelCheckpoint(dirpath=Path(root) / "ckpt", save_last=True, every_n_train_steps=1)
    trainer(Path(root), cb, ckpt, Stall(), max_steps=100).fit(module, datamodule=datamodule())


def child_hub(model_path: str, out: str) -> None:
    """``calibration_windows("c4")`` with the Hub unreachable (offline, empty cache)."""
    from transformers import AutoTokenizer

    from optishear_lightning.data import calibration_windows

    tok = AutoTokenizer.from_pretrained(model_path)
    err = call(lambda: calibration_windows("c4", tok, n_samples=2, seq_len=16))
    text = str(err) if isinstance(err, BaseException) else "no error"
    Path(out).write_text(json.dumps({"type": type(err).__name__, "message": text}))


CHILDREN = {
    "search": child_search,
    "sigint-prune": child_sigint_prune,
    "save": child_save,
    "fit": child_fit,
    "hub": child_hub,
}


def run_cli(*args: str, cwd: Path, umask: int = 0o022) -> subprocess.CompletedProcess:
    """The ``optishear`` console script (or ``python -m optishear_lightning.cli``)."""
    script = Path(sys.executable).with_name("optishear")
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "optishear_lightning.cli"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [*head, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        umask=umask,
        timeout=CHILD_TIMEOUT_S,
    )


def cli_error(proc: subprocess.CompletedProcess) -> str:
    """The last line of a failed CLI run's stderr (where the error is)."""
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return short(lines[-1], 240) if lines else f"exit {proc.returncode}, no stderr"


def cli_refused(proc: subprocess.CompletedProcess, needle: str) -> Outcome:
    """A CLI run must fail with an error naming ``needle`` before it loads the model.

    The runs pass ``--model.model <tmp>/no_model_here``: an error about that path (or none
    about ``needle``) means the check came too late, or not at all.
    """
    named = needle in proc.stderr
    late = "no_model_here" in proc.stderr
    observed = f"exit {proc.returncode}: {cli_error(proc)}"
    if late:
        observed += "; AFTER LOADING THE MODEL"
    elif named:
        observed += "; before the model loaded"
    else:
        observed += f"; the error does not name {needle}"
    return Outcome(observed, proc.returncode != 0 and named and not late)


def cli_prune_args(root: Path, export: Path, *extra: str) -> list[str]:
    """A Wanda prune of the tiny model directory from a ``.txt`` file, exported to ``export``."""
    return [
        "prune",
        "--model.model", str(fixture(model_dir)),
        "--data.calibration_data", str(fixture(jsonl_file)),
        "--data.train_data", "null",
        "--data.val_data", "null",
        "--data.test_data", "null",
        "--data.calibration_samples", "4",
        "--data.calibration_seq_len", "32",
        "--data.seq_len", "32",
        "--optishear.method", "wanda",
        "--optishear.sparsity", "0.5",
        "--optishear.calibration_batch_size", "4",
        "--optishear.progress", "false",
        "--optishear.export_dir", str(export),
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(root / "run"),
        *extra,
    ]  # fmt: skip


def user_dir(path: Path) -> Path:
    """A user's own folder: a file and a subfolder with a file."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "sub" / "data.bin").write_bytes(os.urandom(256))
    return path


def export_modes(out: Path) -> tuple[str, set[str]]:
    """Mode of an export directory and the set of modes of its files."""
    return mode(out), {mode(p) for p in out.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------
# Issue 11, item 1 (and 13): overwrite never deletes what is not an earlier export
# --------------------------------------------------------------------------------------------


@case("1 overwrite", "FileExistsError naming the folder; the user's files and subfolder kept")
def case_save_overwrite_user_dir(tmp: Path) -> Outcome:
    from optishear_lightning import save_pruned_model

    mine = user_dir(tmp / "mine")
    action = lambda: save_pruned_model(tiny_llama(), mine, overwrite=True)  # noqa: E731
    return refused(action, FileExistsError, (str(mine),), keep=(mine,))


@case("1 overwrite", "an earlier export is replaced by the new model; no temporary leftovers")
def case_save_overwrite_earlier_export(tmp: Path) -> Outcome:
    from transformers import AutoModelForCausalLM

    from optishear_lightning import save_pruned_model
    from optishear_lightning.pruning import EXPORT_MARKER

    out = tmp / "export"
    save_pruned_model(tiny_llama(seed=0), out)
    new = tiny_llama(seed=1)
    result = call(lambda: save_pruned_model(new, out, overwrite=True))
    if isinstance(result, BaseException):
        return Outcome(first_line(result), False)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    same = model_digest(reloaded) == model_digest(new)
    rest = leftovers(tmp, "export")
    marker = (out / EXPORT_MARKER).is_file()
    observed = (
        f"replaced: reloaded weights {'= new model' if same else 'DIFFER'}; marker "
        f"{'present' if marker else 'MISSING'}; leftovers {rest or 'none'}"
    )
    return Outcome(observed, same and marker and not rest)


@case("1 overwrite", "without overwrite an existing export is refused (FileExistsError), kept")
def case_save_existing_export_without_overwrite(tmp: Path) -> Outcome:
    from optishear_lightning import save_pruned_model

    out = tmp / "export"
    save_pruned_model(tiny_llama(), out)
    action = lambda: save_pruned_model(tiny_llama(seed=1), out)  # noqa: E731
    return refused(action, FileExistsError, ("overwrite",), keep=(out,))


@case("13 overwrite", "overwrite=True on a file: a clear FileExistsError (not NotADirectoryError)")
def case_save_overwrite_file_path(tmp: Path) -> Outcome:
    from optishear_lightning import save_pruned_model

    target = tmp / "model.safetensors"
    target.write_bytes(os.urandom(128))
    action = lambda: save_pruned_model(tiny_llama(), target, overwrite=True)  # noqa: E731
    return refused(action, FileExistsError, (str(target), "not a directory"), keep=(target,))


@case("1 overwrite", "overwrite=True on a symlink to a user folder: refused, target kept")
def case_save_overwrite_symlink(tmp: Path) -> Outcome:
    from optishear_lightning import save_pruned_model

    mine = user_dir(tmp / "mine")
    link = tmp / "link"
    link.symlink_to(mine, target_is_directory=True)
    action = lambda: save_pruned_model(tiny_llama(), link, overwrite=True)  # noqa: E731
    return refused(action, FileExistsError, (str(link),), keep=(mine,))


@case(
    "1 overwrite",
    "callback export_dir = the run's root, overwrite_export=True: refused naming the path; "
    "every checkpoint kept",
)
def case_callback_export_to_run_root(tmp: Path) -> Outcome:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from optishear_lightning import CausalLMModule, OptiShearCallback

    root = tmp / "run"
    module = CausalLMModule(tiny_llama(), learning_rate=1e-2)
    ckpt = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_top_k=-1)

    def fit() -> None:
        cb = OptiShearCallback(
            method="wanda", progress=False, export_dir=str(root), overwrite_export=True
        )
        trainer(root, cb, ckpt, max_steps=2).fit(module, datamodule=datamodule())

    with captured():
        err = call(fit)
    saved = sorted(p.name for p in (root / "checkpoints").glob("*.ckpt"))
    notes = [first_line(err) if isinstance(err, BaseException) else "no error"]
    notes.append(f"checkpoints kept: {len(saved)}")
    ok = isinstance(err, FileExistsError) and str(root) in str(err) and len(saved) == 2
    return Outcome("; ".join(notes), ok)


@case(
    "1 overwrite",
    "callback export_dir = an earlier run's root with checkpoints: refused in __init__, kept",
)
def case_callback_export_to_old_run_root(tmp: Path) -> Outcome:
    from optishear_lightning import OptiShearCallback

    root = tmp / "run"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "epoch=0-step=100.ckpt").write_bytes(os.urandom(512))
    action = lambda: OptiShearCallback(  # noqa: E731
        method="wanda", export_dir=str(root), overwrite_export=True
    )
    return refused(action, FileExistsError, (str(root),), keep=(root,))


@case("1 overwrite", "CLI export_dir = a user folder + overwrite_export: refused before loading")
def case_cli_export_overwrite_user_dir(tmp: Path) -> Outcome:
    mine = user_dir(tmp / "mine")
    before = tree_digest(mine)
    proc = run_cli(
        "prune", "--model.model", str(tmp / "no_model_here"),
        "--data.calibration_data", str(fixture(jsonl_file)),
        "--optishear.method", "wanda",
        "--optishear.export_dir", str(mine), "--optishear.overwrite_export", "true",
        cwd=tmp,
    )  # fmt: skip
    outcome = cli_refused(proc, str(mine))
    kept = tree_digest(mine) == before
    outcome.observed += "; mine kept" if kept else "; mine CHANGED OR LOST"
    outcome.handled &= kept
    return outcome


# --------------------------------------------------------------------------------------------
# Item 2: exports and saved files follow the umask
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    """Set the process umask for the block."""
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def _umask_export(tmp: Path, value: int, want_dir: str, want_files: str) -> Outcome:
    from optishear_lightning import save_pruned_model

    with umask(value):
        out = save_pruned_model(tiny_llama(), tmp / "export")
    directory, files = export_modes(out)
    ok = directory == want_dir and files == {want_files}
    return Outcome(f"directory {directory}, files {sorted(files)}", ok)


@case("2 umask", "umask 022: export directory 0o755, files 0o644")
def case_umask_022_export(tmp: Path) -> Outcome:
    return _umask_export(tmp, 0o022, "0o755", "0o644")


@case("2 umask", "umask 027: export directory 0o750, files 0o640")
def case_umask_027_export(tmp: Path) -> Outcome:
    return _umask_export(tmp, 0o027, "0o750", "0o640")


@case("2 umask", "umask 022: saved SearchResult and search state files are 0o644")
def case_umask_search_files(tmp: Path) -> Outcome:
    from optishear_lightning.search import SearchState

    found = fixture(search_fixture)
    with umask(0o022):
        found.result.save(tmp / "sub" / "result.json")
        SearchState({"x": 1}).save(tmp / "sub" / "state.json")
    modes = {p.name: mode(p) for p in (tmp / "sub").iterdir()}
    ok = set(modes.values()) == {"0o644"}
    return Outcome(", ".join(f"{k} {v}" for k, v in sorted(modes.items())), ok)


@case("2 umask", "CLI prune under umask 027: exit 0, export 0o750 with 0o640 files")
def case_cli_prune_export_umask_027(tmp: Path) -> Outcome:
    out = tmp / "export"
    proc = run_cli(*cli_prune_args(tmp, out), cwd=tmp, umask=0o027)
    if proc.returncode != 0:
        return Outcome(f"exit {proc.returncode}: {cli_error(proc)}", False)
    directory, files = export_modes(out)
    ok = directory == "0o750" and files == {"0o640"} and (out / "config.json").is_file()
    return Outcome(f"exit 0; directory {directory}, files {sorted(files)}", ok)


@case("1 overwrite", "CLI prune twice into one export_dir with overwrite_export: replaced, exit 0")
def case_cli_prune_overwrites_its_export(tmp: Path) -> Outcome:
    out = tmp / "export"
    first = run_cli(*cli_prune_args(tmp, out), cwd=tmp)
    if first.returncode != 0:
        return Outcome(f"first run: exit {first.returncode}: {cli_error(first)}", False)
    stamp = (out / "config.json").stat().st_mtime_ns
    second = run_cli(*cli_prune_args(tmp, out, "--optishear.overwrite_export", "true"), cwd=tmp)
    if second.returncode != 0:
        return Outcome(f"second run: exit {second.returncode}: {cli_error(second)}", False)
    replaced = (out / "config.json").stat().st_mtime_ns != stamp
    rest = leftovers(tmp, "export")
    observed = f"exit 0 twice; export {'replaced' if replaced else 'NOT REPLACED'}; "
    observed += f"leftovers {rest or 'none'}"
    return Outcome(observed, replaced and not rest)


# --------------------------------------------------------------------------------------------
# Items 3-4: a search state or result of another model or other data
# --------------------------------------------------------------------------------------------


def _reuse_state(tmp: Path, model: torch.nn.Module, ids: torch.Tensor) -> Any:
    from optishear_lightning.search import optishear_search

    state = tmp / "state.json"
    shutil.copy(fixture(search_fixture).state, state)
    return state, lambda: optishear_search(model, ids, 0.5, **tiny_search_args(), state_path=state)


@case("3 state reuse", "state of another model (same shapes): ValueError naming weights_digest")
def case_state_of_other_weights(tmp: Path) -> Outcome:
    model = tiny_llama(seed=1)
    state, action = _reuse_state(tmp, model, tokens(8, 32))
    return refused(action, ValueError, ("weights_digest", str(state)), model=model, keep=(state,))


@case("3 state reuse", "state of other calibration text: ValueError naming calibration_digest")
def case_state_of_other_calibration(tmp: Path) -> Outcome:
    model = tiny_llama()
    state, action = _reuse_state(tmp, model, tokens(8, 32, seed=5))
    return refused(action, ValueError, ("calibration_digest",), model=model, keep=(state,))


@case("3 state reuse", "same model, same data: the rerun takes everything from the state (0 evals)")
def case_state_rerun_same_search(tmp: Path) -> Outcome:
    model = tiny_llama()
    _, action = _reuse_state(tmp, model, tokens(8, 32))
    result = call(action)
    if isinstance(result, BaseException):
        return Outcome(first_line(result), False)
    first = fixture(search_fixture).result
    evals = result.timing["model_evaluations"]
    same = result.ratios == first.ratios and result.metric == first.metric
    observed = f"{evals} new evaluations; result {'identical' if same else 'DIFFERS'}"
    return Outcome(observed, evals == 0 and same)


@case("4 saved result", "SearchResult applied to other weights: UserWarning, then prunes")
def case_result_on_other_weights_warns(tmp: Path) -> Outcome:
    from optishear_lightning.search import optishear_prune

    found = fixture(search_fixture)
    with captured() as seen:
        out = call(
            lambda: optishear_prune(
                tiny_llama(seed=1), tokens(8, 32), 0.5, search_result=found.path, progress=False
            )
        )
    if isinstance(out, BaseException):
        return Outcome(first_line(out), False)
    warning = mentions(seen.warnings, "other weights")
    pruned = abs(out[0].overall_sparsity - found.result.achieved_sparsity) < 1e-6
    observed = f"warning: {short(warning) if warning else 'NONE'}; "
    observed += f"pruned to {out[0].overall_sparsity:.4f}"
    return Outcome(observed, warning is not None and pruned)


@case("4 saved result", "SearchResult applied to the weights it was found on: no warning")
def case_result_on_same_weights_is_quiet(tmp: Path) -> Outcome:
    from optishear_lightning.search import optishear_prune

    found = fixture(search_fixture)
    with captured() as seen:
        out = call(
            lambda: optishear_prune(
                tiny_llama(), tokens(8, 32), 0.5, search_result=found.path, progress=False
            )
        )
    if isinstance(out, BaseException):
        return Outcome(first_line(out), False)
    warning = mentions(seen.warnings, "other weights")
    observed = f"warning: {short(warning) if warning else 'none'}; "
    observed += f"pruned to {out[0].overall_sparsity:.4f}"
    return Outcome(observed, warning is None)


@case("4 saved result", "SearchResult for 3 blocks on a 2-block model: ValueError, untouched")
def case_result_on_other_shapes(tmp: Path) -> Outcome:
    from optishear_lightning.search import optishear_prune

    found = fixture(search_fixture)
    model = tiny_llama(layers=3)
    action = lambda: optishear_prune(  # noqa: E731
        model, tokens(8, 32), 0.5, search_result=found.path, progress=False
    )
    return refused(action, ValueError, ("decoder blocks",), model=model)


@case("4 saved result", "callback with a saved result on other weights: warns, fits, sparse")
def case_callback_result_on_other_weights(tmp: Path) -> Outcome:
    from optishear_lightning import CausalLMModule, OptiShearCallback

    found = fixture(search_fixture)
    module = CausalLMModule(tiny_llama(seed=1), learning_rate=1e-2)
    cb = OptiShearCallback(search_result=str(found.path), progress=False)
    with captured() as seen:
        err = call(lambda: trainer(tmp, cb, max_steps=1).fit(module, datamodule=datamodule()))
    if isinstance(err, BaseException):
        return Outcome(first_line(err), False)
    warning = mentions(seen.warnings, "other weights")
    sparsity = cb.masks.sparsity()
    observed = f"warning: {short(warning) if warning else 'NONE'}; fitted at {sparsity:.4f}"
    ok = warning is not None and abs(sparsity - found.result.achieved_sparsity) < 1e-6
    return Outcome(observed, ok)


# --------------------------------------------------------------------------------------------
# Items 5-6, 12: checkpoint resume
# --------------------------------------------------------------------------------------------


@case("5 resume", "an intact checkpoint resumes: same masks, no new pruning, trains on")
def case_resume_intact_checkpoint(tmp: Path) -> Outcome:
    run = resume(tmp)
    if run.error is not None:
        return Outcome(first_line(run.error), False)
    same = masks_equal(run.cb, run.saved_masks)
    violations = run.cb.masks.violations()
    observed = f"step 2 -> {run.step}; masks {'identical' if same else 'DIFFER'}; "
    observed += f"{violations} violations; sparsity {run.cb.masks.sparsity():.4f}"
    return Outcome(observed, same and violations == 0 and run.step == 4)


def _first_mask(ckpt: dict) -> dict:
    masks = callback_state(ckpt)["masks"]
    return masks[sorted(masks)[0]]


def _swap_bits(ckpt: dict) -> None:
    """Swap one kept and one pruned entry of a mask: the same sparsity, other positions."""
    from optishear_lightning.finetuning import pack_bits, unpack_bits

    entry = _first_mask(ckpt)
    keep = unpack_bits(entry["bits"], tuple(entry["shape"])).clone()
    flat = keep.view(-1)
    kept, pruned = int(flat.nonzero()[0]), int((~flat).nonzero()[0])
    flat[kept], flat[pruned] = False, True
    entry["bits"] = pack_bits(keep)


def _flip_bits(ckpt: dict) -> None:
    """Flip 5% of one mask's bits (its sparsity changes)."""
    entry = _first_mask(ckpt)
    bits = entry["bits"].clone()
    picked = torch.arange(0, bits.numel(), 20)
    bits[picked] ^= 0b1000_0000
    entry["bits"] = bits


def _all_ones(ckpt: dict) -> None:
    for entry in callback_state(ckpt)["masks"].values():
        entry["bits"] = torch.full_like(entry["bits"], 255)


def _drop_mask(ckpt: dict) -> None:
    masks = callback_state(ckpt)["masks"]
    del masks[sorted(masks)[-1]]


def _reshape_mask(ckpt: dict) -> None:
    entry = _first_mask(ckpt)
    entry["shape"] = [entry["shape"][0] // 2, entry["shape"][1]]


@case("5 resume", "one kept and one pruned mask bit swapped (same sparsity): ValueError")
def case_resume_swapped_mask_bits(tmp: Path) -> Outcome:
    return resume_refused(resume(tmp, _swap_bits), "not zero")


@case("5 resume", "5% of one mask's bits flipped: ValueError naming the layer's sparsity")
def case_resume_flipped_mask_bits(tmp: Path) -> Outcome:
    return resume_refused(resume(tmp, _flip_bits), "recorded")


@case("5 resume", "all-ones masks (sparsity 0 while the config says 0.5): ValueError")
def case_resume_all_ones_masks(tmp: Path) -> Outcome:
    return resume_refused(resume(tmp, _all_ones), "0.0000")


@case("5 resume", "a mask entry dropped (that layer would train dense): ValueError naming it")
def case_resume_dropped_mask(tmp: Path) -> Outcome:
    return resume_refused(resume(tmp, _drop_mask), "no mask for")


@case("5 resume", "a mask of the wrong shape: ValueError")
def case_resume_mask_of_wrong_shape(tmp: Path) -> Outcome:
    return resume_refused(resume(tmp, _reshape_mask))


@case("6 resume", "resume with method='ria' over a Wanda checkpoint: says so in the log, keeps")
def case_resume_with_other_method(tmp: Path) -> Outcome:
    run = resume(tmp, method="ria")
    if run.error is not None:
        return Outcome(first_line(run.error), False)
    line = mentions(run.logs, "'wanda'", "ria")
    same = masks_equal(run.cb, run.saved_masks)
    observed = f"log: {short(line) if line else 'NOTHING SAID'}; masks "
    observed += "kept" if same else "CHANGED"
    return Outcome(observed, line is not None and same)


@case("6 resume", "checkpoint without the callback's state: a loud warning that it re-prunes")
def case_resume_without_callback_state(tmp: Path) -> Outcome:
    def drop(ckpt: dict) -> None:
        key = next(k for k in ckpt["callbacks"] if "OptiShearCallback" in k)
        del ckpt["callbacks"][key]

    run = resume(tmp, drop)
    if run.error is not None:
        return Outcome(first_line(run.error), False)
    warning = mentions(run.warnings, "no OptiShearCallback state")
    observed = f"warning: {short(warning) if warning else 'NONE'}; trained to step {run.step}"
    return Outcome(observed, warning is not None)


@case("6 resume", "resume asking for sparsity 0.6 over a 0.5 checkpoint: ValueError")
def case_resume_with_other_sparsity(tmp: Path) -> Outcome:
    return resume_refused(resume(tmp, sparsity=0.6), "0.6")


def _set_config(**changes: Any) -> Callable[[dict], None]:
    def edit(ckpt: dict) -> None:
        state = callback_state(ckpt)
        for key, value in changes.items():
            if value is _DROP:
                state.pop(key, None)
            elif key == "sparsity":
                state["config"]["sparsity"] = value
            else:
                state[key] = value

    return edit


_DROP = object()


@case("12 corrupted", "checkpoint whose callback config has sparsity 'abc': ValueError")
def case_resume_config_sparsity_text(tmp: Path) -> Outcome:
    return resume_refused(resume(tmp, _set_config(sparsity="abc")), "'abc'", "not a number")


@case("12 corrupted", "checkpoint whose callback state has no config: ValueError")
def case_resume_without_config(tmp: Path) -> Outcome:
    return resume_refused(resume(tmp, _set_config(config=_DROP)), "config")


@case("12 corrupted", "checkpoint with a malformed search_result: ValueError naming it")
def case_resume_malformed_search_result(tmp: Path) -> Outcome:
    edit = _set_config(search_result={"metric": {"name": "wanda"}})
    return resume_refused(resume(tmp, edit), "search_result")


@case("corrupted files", "a truncated .ckpt: an error before any training, nothing pruned")
def case_resume_truncated_checkpoint(tmp: Path) -> Outcome:
    from optishear_lightning import CausalLMModule, OptiShearCallback

    data = fixture(checkpoint_fixture).path.read_bytes()
    path = tmp / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    module = CausalLMModule(tiny_llama(), learning_rate=1e-2)
    before = model_digest(module)
    cb = OptiShearCallback(method="wanda", progress=False)
    tr = trainer(tmp, cb, max_steps=4)
    with captured():
        err = call(lambda: tr.fit(module, datamodule=datamodule(), ckpt_path=path))
    if not isinstance(err, BaseException):
        return Outcome(f"no error; trained to step {tr.global_step}", False)
    untouched = model_digest(module) == before
    observed = f"{first_line(err)}; weights {'unchanged' if untouched else 'CHANGED'}"
    return Outcome(observed, untouched and tr.global_step == 0)


# --------------------------------------------------------------------------------------------
# Item 7: calibration windows longer than the model's positions
# --------------------------------------------------------------------------------------------


def _too_long(model: torch.nn.Module) -> Outcome:
    from optishear_lightning import prune

    limit = model.config.max_position_embeddings
    action = lambda: prune(model, tokens(4, limit + 16), "wanda", 0.5)  # noqa: E731
    return refused(action, ValueError, (str(limit), "max_position_embeddings"), model=model)


@case("7 positions", "LLaMA, windows of 80 > max_position_embeddings 64: ValueError naming 64")
def case_long_windows_llama(tmp: Path) -> Outcome:
    return _too_long(tiny_llama(max_positions=64))


@case("7 positions", "GPT-NeoX, windows of 80 > 64: ValueError naming 64 (not silent)")
def case_long_windows_gpt_neox(tmp: Path) -> Outcome:
    return _too_long(tiny_neox())


@case("7 positions", "OPT, windows of 80 > 64: ValueError naming 64 (not a raw IndexError)")
def case_long_windows_opt(tmp: Path) -> Outcome:
    return _too_long(tiny_opt())


@case("7 positions", "optishear_search with windows past the limit: ValueError naming it")
def case_long_windows_search(tmp: Path) -> Outcome:
    from optishear_lightning.search import optishear_search

    model = tiny_llama(max_positions=64)
    action = lambda: optishear_search(model, tokens(8, 80), 0.5, **tiny_search_args())  # noqa: E731
    return refused(action, ValueError, ("64",), model=model)


@case("7 positions", "callback loader with windows past the limit: ValueError before pruning")
def case_long_windows_callback(tmp: Path) -> Outcome:
    from optishear_lightning import CausalLMModule, OptiShearCallback

    module = CausalLMModule(tiny_llama(max_positions=64), learning_rate=1e-2)
    cb = OptiShearCallback(method="wanda", progress=False)
    data = datamodule(calibration_data=tokens(8, 80, seed=3))

    def fit() -> None:
        with captured():
            trainer(tmp, cb, max_steps=1).fit(module, datamodule=data)

    return refused(fit, ValueError, ("64",), model=module)


# --------------------------------------------------------------------------------------------
# Item 8: BOS at the start of every window (Gemma)
# --------------------------------------------------------------------------------------------


def _window_starts(model: torch.nn.Module, run: Callable[[], Any]) -> list[int]:
    """The first token of every sequence ``model`` is called on while ``run`` runs."""
    starts: list[int] = []

    def grab(module: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            starts.extend(int(t) for t in ids[:, 0])

    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return starts


def _has_parameter(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


@case("8 BOS", "Gemma perplexity (default settings): every window starts with BOS")
def case_bos_gemma_perplexity(tmp: Path) -> Outcome:
    from optishear_lightning.evaluation import perplexity

    model = tiny_gemma()
    bos = model.config.bos_token_id
    stream = tokens(4 * 16, seed=4, low=3)
    starts = _window_starts(model, lambda: perplexity(model, stream, seq_len=16))
    with_bos = sum(s == bos for s in starts)
    notes = [f"default: {with_bos}/{len(starts)} windows start with BOS ({bos})"]
    if not _has_parameter(perplexity, "bos_per_window"):
        err = call(lambda: perplexity(model, stream, seq_len=16, bos_per_window=True))
        notes.append(first_line(err) if isinstance(err, BaseException) else "accepted")
    return Outcome("; ".join(notes), bool(starts) and with_bos == len(starts))


@case("8 BOS", "LLaMA perplexity keeps the published protocol: windows cut from the stream")
def case_bos_llama_perplexity_unchanged(tmp: Path) -> Outcome:
    from optishear_lightning.evaluation import perplexity

    model = tiny_llama()
    stream = tokens(4 * 16, seed=4, low=3)
    starts = _window_starts(model, lambda: perplexity(model, stream, seq_len=16))
    expected = [int(t) for t in stream[::16]]
    ok = starts == expected
    observed = f"window starts {'= stream positions 0,16,32,48' if ok else starts}"
    return Outcome(observed, ok)


@case("8 BOS", "calibration_windows(..., bos_per_window=True): every window starts with BOS")
def case_bos_calibration_explicit(tmp: Path) -> Outcome:
    from optishear_lightning.data import calibration_windows

    tok = tiny_tokenizer()
    path = fixture(text_file)
    got = call(lambda: calibration_windows(path, tok, 4, 16, bos_per_window=True))
    if isinstance(got, BaseException):
        return Outcome(first_line(got), False)
    firsts = got[:, 0].tolist()
    ok = all(t == tok.bos_token_id for t in firsts)
    return Outcome(f"window first tokens {firsts} (BOS = {tok.bos_token_id})", ok)


@case("8 BOS", "calibration_windows(model=Gemma), default setting: every window starts with BOS")
def case_bos_gemma_calibration_default(tmp: Path) -> Outcome:
    from optishear_lightning.data import calibration_windows

    tok = tiny_tokenizer()
    model = tiny_gemma()
    got = call(lambda: calibration_windows(fixture(text_file), tok, 4, 16, model=model))
    if isinstance(got, BaseException):
        return Outcome(first_line(got), False)
    firsts = got[:, 0].tolist()
    ok = all(t == tok.bos_token_id for t in firsts)
    return Outcome(f"window first tokens {firsts} (BOS = {tok.bos_token_id})", ok)


@case("8 BOS", "calibration_windows(model=LLaMA), default: the published windows, no BOS added")
def case_bos_llama_calibration_default(tmp: Path) -> Outcome:
    from optishear_lightning.data import calibration_windows

    tok = tiny_tokenizer()
    path = fixture(text_file)
    default = call(lambda: calibration_windows(path, tok, 4, 16, model=tiny_llama()))
    if isinstance(default, BaseException):
        return Outcome(first_line(default), False)
    plain = calibration_windows(path, tok, 4, 16, bos_per_window=False)
    same = torch.equal(default, plain)
    observed = f"windows {'= bos_per_window=False' if same else 'DIFFER from the published'}; "
    observed += f"first tokens {default[:, 0].tolist()}"
    return Outcome(observed, same)


@case("8 BOS", "prune(Gemma, a .txt file, tokenizer=...): its calibration windows start with BOS")
def case_bos_gemma_prune_text_source(tmp: Path) -> Outcome:
    from optishear_lightning import prune

    tok = tiny_tokenizer()
    model = tiny_gemma()
    firsts: list[int] = []

    def grab(module: Any, args: Any) -> None:
        firsts.extend(int(t) for t in args[0][:, 0])

    model.model.embed_tokens.register_forward_pre_hook(grab)
    path = fixture(text_file)
    done = call(lambda: prune(model, path, "wanda", 0.5, tokenizer=tok, n_samples=4, seq_len=16))
    if isinstance(done, BaseException):
        return Outcome(first_line(done), False)
    ok = bool(firsts) and all(t == tok.bos_token_id for t in firsts)
    with_bos = sum(t == tok.bos_token_id for t in firsts)
    return Outcome(f"{with_bos}/{len(firsts)} calibration windows start with BOS", ok)


@case("8 BOS", "TextDataModule(bos_per_window=True): validation windows start with BOS")
def case_bos_datamodule(tmp: Path) -> Outcome:
    tok = tiny_tokenizer()
    build = lambda: datamodule(  # noqa: E731
        tokenizer=tok, val_data=tokens(64, seed=4, low=3), seq_len=16, bos_per_window=True
    )
    dm = call(build)
    if isinstance(dm, BaseException):
        return Outcome(first_line(dm), False)
    firsts = dm.split("val")[:, 0].tolist()
    ok = all(t == tok.bos_token_id for t in firsts)
    return Outcome(f"window first tokens {firsts} (BOS = {tok.bos_token_id})", ok)


# --------------------------------------------------------------------------------------------
# Item 9 and the passing families: sparsity values, patterns, methods, groups
# --------------------------------------------------------------------------------------------


def _bad_prune(tmp: Path, *needles: str, **kwargs: Any) -> Outcome:
    from optishear_lightning import prune

    model = tiny_llama()
    args = dict(calibration=tokens(4, 32), method="wanda", sparsity=0.5) | kwargs
    return refused(lambda: prune(model, **args), ValueError, needles, model=model)


def _good_prune(sparsity: Any) -> Outcome:
    from optishear_lightning import prune

    result = call(lambda: prune(tiny_llama(), tokens(4, 32), "wanda", sparsity))
    if isinstance(result, BaseException):
        return Outcome(first_line(result), False)
    blocks = [round(float(r), 6) for r in result.block_sparsity]
    ok = blocks == [0.5, 0.5] and abs(result.overall_sparsity - 0.5) < 1e-6
    return Outcome(f"accepted: block ratios {blocks}, achieved {result.overall_sparsity:.4f}", ok)


@case("9 sparsity", "sparsity 'abc': ValueError saying a number is needed (not 'Got 3 ...')")
def case_sparsity_text_abc(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "'abc'", "number", sparsity="abc")


@case("9 sparsity", "sparsity '0.5' (text): ValueError saying write 0.5, not '0.5'")
def case_sparsity_text_number(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "'0.5'", sparsity="0.5")


@case("9 sparsity", "sparsity np.float32(0.5): accepted, prunes to 0.5")
def case_sparsity_numpy_float32(tmp: Path) -> Outcome:
    return _good_prune(np.float32(0.5))


@case("9 sparsity", "sparsity torch.tensor(0.5): accepted, prunes to 0.5")
def case_sparsity_torch_scalar(tmp: Path) -> Outcome:
    return _good_prune(torch.tensor(0.5))


@case("9 sparsity", "sparsity {'abc': 0.5, ...}: ValueError naming the key")
def case_sparsity_dict_text_key(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "'abc'", sparsity={"abc": 0.5, 0: 0.5, 1: 0.5})


@case("9 sparsity", "sparsity {1.5: 0.5, ...}: ValueError naming the key")
def case_sparsity_dict_float_key(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "1.5", sparsity={1.5: 0.5, 0: 0.5})


@case("9 sparsity", "sparsity {'0': 0.5, '1': 0.5} (keys as YAML gives them): accepted")
def case_sparsity_dict_digit_keys(tmp: Path) -> Outcome:
    return _good_prune({"0": 0.5, "1": 0.5})


@case("9 sparsity", "OptiShearCallback(sparsity='abc'): ValueError in __init__")
def case_sparsity_text_callback(tmp: Path) -> Outcome:
    from optishear_lightning import OptiShearCallback

    return refused(lambda: OptiShearCallback(sparsity="abc"), ValueError, ("'abc'",))


@case("9 sparsity", "optishear_search(sparsity='0.5'): ValueError before any work")
def case_sparsity_text_search(tmp: Path) -> Outcome:
    from optishear_lightning.search import optishear_search

    model = tiny_llama()
    action = lambda: optishear_search(model, tokens(8, 32), "0.5", **tiny_search_args())  # noqa: E731
    return refused(action, ValueError, ("'0.5'",), model=model)


@case("sparsity", "sparsity -0.1: ValueError naming [0, 1), weights untouched")
def case_sparsity_negative(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "[0, 1)", sparsity=-0.1)


@case("sparsity", "sparsity 1.0: ValueError naming [0, 1), weights untouched")
def case_sparsity_one(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "[0, 1)", sparsity=1.0)


@case("sparsity", "sparsity 1.5: ValueError naming [0, 1), weights untouched")
def case_sparsity_above_one(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "[0, 1)", sparsity=1.5)


@case("sparsity", "sparsity NaN: ValueError, weights untouched")
def case_sparsity_nan(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "nan", sparsity=float("nan"))


@case("sparsity", "3 per-block ratios for a 2-block model: ValueError naming both counts")
def case_sparsity_list_wrong_length(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "3", "2", sparsity=[0.5, 0.5, 0.5])


@case("pattern", "pattern '3:2' (N > M): ValueError, weights untouched")
def case_pattern_n_above_m(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "'3:2'", pattern="3:2", sparsity=None)


@case("pattern", "pattern '0:4': ValueError, weights untouched")
def case_pattern_zero_n(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "'0:4'", pattern="0:4", sparsity=None)


@case("pattern", "pattern '2:0': ValueError, weights untouched")
def case_pattern_zero_m(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "'2:0'", pattern="2:0", sparsity=None)


@case("pattern", "pattern 'x:y': ValueError naming the accepted forms")
def case_pattern_text(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "'x:y'", "N:M", pattern="x:y", sparsity=None)


@case("pattern", "pattern '2:3' on 64 input features: ValueError naming the layer and M=3")
def case_pattern_not_dividing(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "M=3", "64", pattern="2:3", sparsity=None)


@case("pattern", "pattern '2:4' with sparsity 0.6: ValueError (2:4 fixes 0.5)")
def case_pattern_conflicting_sparsity(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "0.5", pattern="2:4", sparsity=0.6)


@case("method/group", "method 'foo': ValueError listing the methods")
def case_unknown_method(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "'foo'", "wanda", method="foo")


@case("method/group", "group 'column': ValueError naming row/layer")
def case_unknown_group(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "'column'", "'row'", group="column")


@case("method/group", "pattern '2:4' with group='layer': ValueError")
def case_nm_with_layer_group(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "group", pattern="2:4", sparsity=None, group="layer")


@case("method/group", "CLI --optishear.method foo: error naming it, before the model loads")
def case_cli_unknown_method(tmp: Path) -> Outcome:
    proc = run_cli(
        "prune", "--model.model", str(tmp / "no_model_here"),
        "--data.calibration_data", str(fixture(jsonl_file)),
        "--optishear.method", "foo", cwd=tmp,
    )  # fmt: skip
    return cli_refused(proc, "'foo'")


# --------------------------------------------------------------------------------------------
# Item 10: calibration token ids
# --------------------------------------------------------------------------------------------


@case("10 token ids", "token id 128 with a vocabulary of 128: ValueError naming the range")
def case_token_ids_past_vocab(tmp: Path) -> Outcome:
    ids = tokens(4, 32)
    ids[1, 5] = VOCAB
    return _bad_prune(tmp, "vocabulary", "127", calibration=ids)


@case("10 token ids", "a negative token id: ValueError naming the range")
def case_token_ids_negative(tmp: Path) -> Outcome:
    ids = tokens(4, 32)
    ids[0, 0] = -3
    return _bad_prune(tmp, "vocabulary", "-3", calibration=ids)


@case("10 token ids", "a list of calibration tensors with an empty one: ValueError naming it")
def case_token_ids_empty_item(tmp: Path) -> Outcome:
    items = [tokens(32), torch.empty(0, dtype=torch.long), tokens(32, seed=1)]
    return _bad_prune(tmp, "item 1", "empty", calibration=items)


@case("10 token ids", "an empty calibration list: ValueError saying it is empty")
def case_token_ids_empty_list(tmp: Path) -> Outcome:
    return _bad_prune(tmp, "empty", calibration=[])


@case("10 token ids", "optishear_search with token ids past the vocabulary: ValueError")
def case_token_ids_past_vocab_search(tmp: Path) -> Outcome:
    from optishear_lightning.search import optishear_search

    model = tiny_llama()
    ids = tokens(8, 32)
    ids[3, 3] = VOCAB + 10
    action = lambda: optishear_search(model, ids, 0.5, **tiny_search_args())  # noqa: E731
    return refused(action, ValueError, ("vocabulary",), model=model)


# --------------------------------------------------------------------------------------------
# Item 11 and read-only paths: checked before any heavy work
# --------------------------------------------------------------------------------------------


@case(
    "11 early checks", "CLI nonexistent calibration file: error naming it, before the model loads"
)
def case_cli_missing_calibration_file(tmp: Path) -> Outcome:
    missing = tmp / "missing.jsonl"
    proc = run_cli(
        "prune", "--data.calibration_data", str(missing),
        "--model.model", str(tmp / "no_model_here"), cwd=tmp,
    )  # fmt: skip
    return cli_refused(proc, "missing.jsonl")


@case(
    "CLI paths",
    "--data.calibration_data notes.txt (plain prose): the data module gets the path, not "
    "the file's text",
)
def case_cli_text_file_path_reaches_data(tmp: Path) -> Outcome:
    import yaml

    path = fixture(text_file)
    proc = run_cli("prune", "--data.calibration_data", str(path), "--print_config", cwd=tmp)
    if proc.returncode != 0:
        return Outcome(f"exit {proc.returncode}: {cli_error(proc)}", False)
    value = (yaml.safe_load(proc.stdout).get("data") or {}).get("calibration_data")
    ok = value == str(path)
    shown = "the path" if ok else f"{type(value).__name__} {short(repr(value), 90)}"
    return Outcome(f"--print_config shows data.calibration_data = {shown}", ok)


@case("11 early checks", "CLI export_dir under a regular file: error before the model loads")
def case_cli_export_under_file(tmp: Path) -> Outcome:
    blocker = tmp / "a_file"
    blocker.write_text("x")
    export = blocker / "export"
    proc = run_cli(
        "prune", "--model.model", str(tmp / "no_model_here"),
        "--data.calibration_data", str(fixture(jsonl_file)),
        "--optishear.method", "wanda", "--optishear.export_dir", str(export), cwd=tmp,
    )  # fmt: skip
    return cli_refused(proc, str(export))


@case("11 early checks", "callback export_dir under a regular file: PermissionError in __init__")
def case_callback_export_under_file(tmp: Path) -> Outcome:
    from optishear_lightning import OptiShearCallback

    blocker = tmp / "a_file"
    blocker.write_text("x")
    export = blocker / "sub" / "export"
    action = lambda: OptiShearCallback(method="wanda", export_dir=str(export))  # noqa: E731
    return refused(action, PermissionError, (str(export),), keep=(blocker,))


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``os.access`` answers as for a non-root user: ``directory`` is not writable."""
    real = os.access

    def access(path: Any, mode_: int, *args: Any, **kwargs: Any) -> bool:
        inside = Path(path).absolute() == directory.absolute()
        if inside and mode_ & os.W_OK:
            return False
        return real(path, mode_, *args, **kwargs)

    with mock.patch("os.access", access):
        yield


@case("11 early checks", "callback export_dir in a read-only folder (simulated): error in __init__")
def case_callback_export_in_read_only_dir(tmp: Path) -> Outcome:
    from optishear_lightning import OptiShearCallback

    locked = tmp / "locked"
    locked.mkdir()
    export = locked / "export"

    def build() -> None:
        with read_only(locked):
            OptiShearCallback(method="wanda", export_dir=str(export))

    return refused(build, PermissionError, (str(export),), absent=(export,))


@case("read-only paths", "save_pruned_model under a regular file: PermissionError, nothing written")
def case_save_under_file(tmp: Path) -> Outcome:
    from optishear_lightning import save_pruned_model

    blocker = tmp / "a_file"
    blocker.write_text("x")
    action = lambda: save_pruned_model(tiny_llama(), blocker / "export")  # noqa: E731
    return refused(action, PermissionError, (str(blocker),), keep=(blocker,))


@case("read-only paths", "save_pruned_model into a read-only folder (simulated): error, no dir")
def case_save_in_read_only_dir(tmp: Path) -> Outcome:
    from optishear_lightning import save_pruned_model

    locked = tmp / "locked"
    locked.mkdir()

    def save() -> None:
        with read_only(locked):
            save_pruned_model(tiny_llama(), locked / "export")

    return refused(save, PermissionError, ("locked",), keep=(locked,))


@case("read-only paths", "SearchResult.save under a regular file: an OSError, no partial file")
def case_result_save_under_file(tmp: Path) -> Outcome:
    blocker = tmp / "a_file"
    blocker.write_text("x")
    found = fixture(search_fixture).result
    action = lambda: found.save(blocker / "result.json")  # noqa: E731
    return refused(action, OSError, (), keep=(blocker,))


@case(
    "read-only paths",
    "state_path under a regular file: an error before the search evaluates anything",
)
def case_state_path_under_file(tmp: Path) -> Outcome:
    from optishear_lightning.search import optishear_search
    from optishear_lightning.search.context import SearchContext

    blocker = tmp / "a_file"
    blocker.write_text("x")
    counted = {"proxy": 0}
    original = SearchContext.proxy_error

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        counted["proxy"] += 1
        return original(self, *args, **kwargs)

    model = tiny_llama()
    args = dict(config=tiny_search_config(), progress=False, state_path=blocker / "state.json")
    with mock.patch.object(SearchContext, "proxy_error", counting):
        outcome = refused(
            lambda: optishear_search(model, tokens(8, 32), 0.5, **args),
            OSError,
            ("a_file",),
            model=model,
        )
    outcome.observed += f"; {counted['proxy']} metrics screened before the error"
    outcome.handled &= counted["proxy"] == 0
    return outcome


@case(
    "read-only paths", "callback search_result that does not exist: FileNotFoundError in __init__"
)
def case_callback_missing_search_result(tmp: Path) -> Outcome:
    from optishear_lightning import OptiShearCallback

    missing = tmp / "nope.json"
    action = lambda: OptiShearCallback(search_result=str(missing))  # noqa: E731
    return refused(action, FileNotFoundError, (str(missing),))


# --------------------------------------------------------------------------------------------
# Item 12 and corrupted files: search state and saved results
# --------------------------------------------------------------------------------------------


def _corrupt_state(tmp: Path, edit: Callable[[dict], None] | None, text: str | None = None):
    from optishear_lightning.search import optishear_search

    state = tmp / "state.json"
    if text is None:
        data = json.loads(fixture(search_fixture).state.read_text())
        edit(data)
        text = json.dumps(data)
    state.write_text(text)
    model = tiny_llama()
    action = lambda: optishear_search(  # noqa: E731
        model, tokens(8, 32), 0.5, **tiny_search_args(), state_path=state
    )
    return refused(action, ValueError, (str(state),), model=model, keep=(state,))


def _first_error_entry(data: dict) -> dict:
    return next(h for h in data["history"] if "error" in h)


@case("12 corrupted", "search state with a non-numeric error: ValueError naming the file")
def case_state_non_numeric_field(tmp: Path) -> Outcome:
    return _corrupt_state(tmp, lambda d: _first_error_entry(d).update(error="oops"))


@case("12 corrupted", "search state whose entries lack 'error': ValueError naming the file")
def case_state_missing_error_keys(tmp: Path) -> Outcome:
    def drop(data: dict) -> None:
        for entry in data["history"]:
            entry.pop("error", None)

    return _corrupt_state(tmp, drop)


@case("12 corrupted", "search state cut in half (truncated JSON): ValueError naming the file")
def case_state_truncated(tmp: Path) -> Outcome:
    text = fixture(search_fixture).state.read_text()
    return _corrupt_state(tmp, None, text[: len(text) // 2])


@case("12 corrupted", "state_path is a directory: ValueError saying so (not 'does not exist')")
def case_state_path_is_directory(tmp: Path) -> Outcome:
    from optishear_lightning.search import optishear_search

    model = tiny_llama()
    action = lambda: optishear_search(  # noqa: E731
        model, tokens(8, 32), 0.5, **tiny_search_args(), state_path=tmp
    )
    return refused(action, ValueError, ("directory",), model=model)


def _bad_result(tmp: Path, text: str, *needles: str) -> Outcome:
    from optishear_lightning.search import SearchResult

    path = tmp / "result.json"
    path.write_text(text)
    return refused(lambda: SearchResult.load(path), ValueError, (str(path), *needles), keep=(path,))


@case("corrupted files", "SearchResult.load of a truncated file: ValueError naming it")
def case_result_truncated(tmp: Path) -> Outcome:
    text = fixture(search_fixture).path.read_text()
    return _bad_result(tmp, text[: len(text) // 3], "truncated")


@case("corrupted files", "SearchResult.load of a search *state* file: ValueError (wrong kind)")
def case_result_wrong_kind(tmp: Path) -> Outcome:
    return _bad_result(tmp, fixture(search_fixture).state.read_text(), "not a search result")


@case("corrupted files", "SearchResult.load of a result without 'ratios': ValueError")
def case_result_missing_key(tmp: Path) -> Outcome:
    data = json.loads(fixture(search_fixture).path.read_text())
    del data["ratios"]
    return _bad_result(tmp, json.dumps(data), "ratios")


# --------------------------------------------------------------------------------------------
# Non-finite values
# --------------------------------------------------------------------------------------------


def _poisoned(value: float) -> torch.nn.Module:
    model = tiny_llama()
    model.model.layers[1].self_attn.q_proj.weight.data[3, 7] = value
    return model


def _nonfinite(model: torch.nn.Module, method: str) -> Outcome:
    from optishear_lightning import prune

    action = lambda: prune(model, tokens(4, 32), method, 0.5)  # noqa: E731
    return refused(action, (ValueError, FloatingPointError), ("nan",), model=model)


@case("non-finite", "a NaN weight, Wanda: error naming NaN, weights as they were")
def case_nan_weight_wanda(tmp: Path) -> Outcome:
    return _nonfinite(_poisoned(float("nan")), "wanda")


@case("non-finite", "a NaN weight, magnitude: error naming NaN, weights as they were")
def case_nan_weight_magnitude(tmp: Path) -> Outcome:
    return _nonfinite(_poisoned(float("nan")), "magnitude")


@case("non-finite", "an Inf weight, Wanda: error naming NaN/infinite, weights as they were")
def case_inf_weight_wanda(tmp: Path) -> Outcome:
    return _nonfinite(_poisoned(float("inf")), "wanda")


@case("non-finite", "NaN calibration activations (block 0 output): error, weights restored")
def case_nan_activations(tmp: Path) -> Outcome:
    model = tiny_llama(layers=3)

    def poison(module: Any, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[..., 0] = float("nan")
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    model.model.layers[0].register_forward_hook(poison)
    return _nonfinite(model, "wanda")


# --------------------------------------------------------------------------------------------
# Interruptions
# --------------------------------------------------------------------------------------------


def _interrupt_prune(exc: BaseException) -> Outcome:
    """Raise ``exc`` from block 2 of 4 (blocks 0-1 pruned by then); atomic restores."""
    from optishear_lightning import prune

    model = tiny_llama(layers=4)
    seen: dict[str, float] = {}

    def boom(module: Any, args: Any, output: Any) -> None:
        q = model.model.layers[0].self_attn.q_proj.weight
        seen["zeros"] = float((q == 0).float().mean())
        raise exc

    model.model.layers[2].register_forward_hook(boom)
    action = lambda: prune(model, tokens(4, 32), "wanda", 0.5, atomic=True)  # noqa: E731
    outcome = refused(action, type(exc), (), model=model)
    zeros = seen.get("zeros", 0.0)
    outcome.observed += f"; block 0 was {zeros:.0%} zeros when it struck"
    outcome.handled &= zeros > 0.4
    return outcome


@case("interruptions", "KeyboardInterrupt in block 2 of 4, atomic=True: weights restored exactly")
def case_ctrl_c_mid_prune(tmp: Path) -> Outcome:
    return _interrupt_prune(KeyboardInterrupt())


@case("interruptions", "RuntimeError in block 2 of 4, atomic=True: raised, weights restored")
def case_exception_mid_prune(tmp: Path) -> Outcome:
    return _interrupt_prune(RuntimeError("injected failure"))


@case("interruptions", "real SIGINT to a child process mid-prune: KeyboardInterrupt, restored")
def case_sigint_mid_prune_child(tmp: Path) -> Outcome:
    ready, out = tmp / "ready", tmp / "out.json"
    proc = spawn("sigint-prune", str(ready), str(out))
    if not wait_for(ready.exists, proc, CHILD_TIMEOUT_S):
        return child_failure(proc, "block 2")
    os.kill(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    got = read_json(out)
    if got is None:
        return Outcome(f"child exit {proc.returncode}, wrote no result", False)
    observed = (
        f"interrupted: {got['interrupted']}; weights "
        f"{'restored bit-exactly' if got['restored'] else 'NOT RESTORED'}; block 0 was "
        f"{got.get('block0_zeros', 0):.0%} zeros at the signal"
    )
    ok = got["interrupted"] and got["restored"] and got.get("block0_zeros", 0) > 0.4
    return Outcome(observed, ok)


@case("interruptions", "KeyboardInterrupt mid-search: dense weights back, state keeps the work")
def case_ctrl_c_mid_search(tmp: Path) -> Outcome:
    from optishear_lightning.search import optishear_search
    from optishear_lightning.search.context import SearchContext

    model = tiny_llama(layers=4)
    state = tmp / "state.json"
    calls = {"n": 0}
    original = SearchContext.evaluate

    def interrupting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    config = kill_search_config("ratios")
    action = lambda: optishear_search(  # noqa: E731
        model, tokens(8, 32), 0.5, config=config, state_path=state, progress=False
    )
    with mock.patch.object(SearchContext, "evaluate", interrupting):
        outcome = refused(action, KeyboardInterrupt, (), model=model)
    saved = len([h for h in entries(read_json(state), "ratios") if "error" in h])
    outcome.observed += f"; state holds {saved} of the 7 evaluations made"
    outcome.handled &= saved == 7
    return outcome


def _clean_search(phase: str) -> Any:
    from optishear_lightning.search import optishear_search

    config = kill_search_config(phase)
    return optishear_search(tiny_llama(layers=4), tokens(8, 32), 0.5, config=config, progress=False)


@case(
    "interruptions",
    "kill -9 mid ratio search, rerun with the state: resumes (only the missing evaluations), "
    "same result as an uninterrupted run",
)
def case_kill9_mid_search_resume(tmp: Path) -> Outcome:
    from optishear_lightning.search import optishear_search

    state = tmp / "state.json"
    proc = spawn("search", str(state), "ratios")
    if not wait_for(lambda: len(entries(read_json(state), "ratios")) >= 8, proc, CHILD_TIMEOUT_S):
        return child_failure(proc, "8 saved evaluations")
    code = kill9(proc)
    saved = len([h for h in entries(read_json(state), "ratios") if "error" in h])
    model = tiny_llama(layers=4)
    config = kill_search_config("ratios")
    resumed = call(
        lambda: optishear_search(
            model, tokens(8, 32), 0.5, config=config, state_path=state, progress=False
        )
    )
    if isinstance(resumed, BaseException):
        return Outcome(f"killed ({code}) with {saved} saved; rerun: {first_line(resumed)}", False)
    clean = _clean_search("ratios")
    total, new = clean.timing["model_evaluations"], resumed.timing["model_evaluations"]
    same = resumed.ratios == clean.ratios and resumed.metric == clean.metric
    observed = (
        f"killed (exit {code}) with {saved} evaluations saved; rerun made {new} new of "
        f"{total}; result {'= uninterrupted run' if same else 'DIFFERS from uninterrupted run'}"
    )
    return Outcome(observed, saved > 0 and new == total - saved and same)


@case(
    "14 screening",
    "kill -9 during metric screening: the state holds the screened metrics, the rerun "
    "screens only the rest",
)
def case_kill9_mid_screening_resume(tmp: Path) -> Outcome:
    from optishear_lightning.search import effective_space, optishear_search
    from optishear_lightning.search.context import SearchContext

    state = tmp / "state.json"
    proc = spawn("search", str(state), "screen")
    if not wait_for(lambda: entries(read_json(state), "metric_proxy"), proc, CHILD_TIMEOUT_S):
        return child_failure(proc, "a saved screening state")
    code = kill9(proc)
    saved = len(entries(read_json(state), "metric_proxy"))
    pool = len(effective_space("row"))
    counted = {"proxy": 0}
    original = SearchContext.proxy_error

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        counted["proxy"] += 1
        return original(self, *args, **kwargs)

    config = kill_search_config("screen")
    with mock.patch.object(SearchContext, "proxy_error", counting):
        resumed = call(
            lambda: optishear_search(
                tiny_llama(layers=4), tokens(8, 32), 0.5, config=config, state_path=state,
                progress=False,
            )
        )  # fmt: skip
    if isinstance(resumed, BaseException):
        return Outcome(f"killed with {saved} screened; rerun: {first_line(resumed)}", False)
    observed = (
        f"killed (exit {code}) after {saved} of {pool} metrics were saved; rerun screened "
        f"{counted['proxy']}"
    )
    ok = 0 < saved < pool and counted["proxy"] == pool - saved
    return Outcome(observed, ok)


@case("interruptions", "kill -9 mid fine-tuning, resume from last.ckpt: same masks, trains on")
def case_kill9_mid_fit_resume(tmp: Path) -> Outcome:
    from optishear_lightning import CausalLMModule, OptiShearCallback
    from optishear_lightning.finetuning import unpack_bits

    ready = tmp / "ready"
    proc = spawn("fit", str(tmp), str(ready))
    if not wait_for(ready.exists, proc, CHILD_TIMEOUT_S):
        return child_failure(proc, "step 3")
    code = kill9(proc)
    last = tmp / "ckpt" / "last.ckpt"
    ckpt = call(lambda: torch.load(last, weights_only=False))
    if isinstance(ckpt, BaseException):
        return Outcome(f"killed (exit {code}); last.ckpt unreadable: {first_line(ckpt)}", False)
    packed = callback_state(ckpt)["masks"]
    saved = {n: unpack_bits(e["bits"], tuple(e["shape"])) for n, e in packed.items()}
    step = ckpt["global_step"]
    module = CausalLMModule(tiny_llama(), learning_rate=1e-2)
    cb = OptiShearCallback(method="wanda", progress=False)
    tr = trainer(tmp / "resume", cb, max_steps=step + 2)
    with captured():
        err = call(lambda: tr.fit(module, datamodule=datamodule(), ckpt_path=last))
    if isinstance(err, BaseException):
        return Outcome(f"killed (exit {code}); resume: {first_line(err)}", False)
    same = masks_equal(cb, saved)
    violations = cb.masks.violations()
    observed = (
        f"killed (exit {code}) at step {step}; resumed to step {tr.global_step}; masks "
        f"{'identical' if same else 'DIFFER'}; {violations} violations"
    )
    return Outcome(observed, same and violations == 0 and tr.global_step == step + 2)


# --------------------------------------------------------------------------------------------
# Crashes while saving
# --------------------------------------------------------------------------------------------


def _crashing_save(tmp: Path, exc: BaseException, overwrite: bool) -> Outcome:
    """``save_pretrained`` writes its files and then raises ``exc``."""
    from optishear_lightning import save_pruned_model

    out = tmp / "export"
    if overwrite:
        save_pruned_model(tiny_llama(seed=0), out)
    model = tiny_llama(seed=1)
    original = model.save_pretrained

    def crash(path: Any, **kwargs: Any) -> None:
        original(path, **kwargs)
        raise exc

    model.save_pretrained = crash
    action = lambda: save_pruned_model(model, out, overwrite=overwrite)  # noqa: E731
    keep, absent = ((out,), ()) if overwrite else ((), (out,))
    outcome = refused(action, type(exc), (), keep=keep, absent=absent)
    rest = leftovers(tmp, "export")
    outcome.observed += f"; leftovers {rest or 'none'}"
    outcome.handled &= not rest
    return outcome


@case("save crash", "OSError midway through a new export: nothing at the destination, no debris")
def case_crash_during_save(tmp: Path) -> Outcome:
    return _crashing_save(tmp, OSError(28, "No space left on device"), overwrite=False)


@case("save crash", "OSError midway through overwriting an export: the old export kept intact")
def case_crash_during_overwrite_keeps_old(tmp: Path) -> Outcome:
    return _crashing_save(tmp, OSError(28, "No space left on device"), overwrite=True)


@case("save crash", "Ctrl-C midway through overwriting an export: the old export kept intact")
def case_ctrl_c_during_overwrite_keeps_old(tmp: Path) -> Outcome:
    return _crashing_save(tmp, KeyboardInterrupt(), overwrite=True)


def _kill9_save(tmp: Path, overwrite: bool) -> Outcome:
    from optishear_lightning import save_pruned_model

    out, ready = tmp / "export", tmp / "ready"
    if overwrite:
        save_pruned_model(tiny_llama(seed=0), out)
    before = tree_digest(out)
    proc = spawn("save", str(out), str(ready), "1" if overwrite else "0")
    if not wait_for(ready.exists, proc, CHILD_TIMEOUT_S):
        return child_failure(proc, "the middle of the save")
    code = kill9(proc)
    kept = tree_digest(out) == before
    debris = leftovers(tmp, "export")
    again = call(lambda: save_pruned_model(tiny_llama(seed=2), out, overwrite=overwrite))
    state = (
        ("old export intact" if overwrite else "nothing at the destination")
        if kept
        else ("DESTINATION CHANGED")
    )
    observed = (
        f"killed (exit {code}); {state}; debris left by the killed process: "
        f"{len(debris)} temp dir(s); next save "
        f"{'works' if not isinstance(again, BaseException) else first_line(again)}"
    )
    return Outcome(observed, kept and not isinstance(again, BaseException))


@case("save crash", "kill -9 during a new export: nothing half-written at the destination")
def case_kill9_during_save(tmp: Path) -> Outcome:
    return _kill9_save(tmp, overwrite=False)


@case("save crash", "kill -9 during an overwrite: the old export intact, the next save works")
def case_kill9_during_overwrite(tmp: Path) -> Outcome:
    return _kill9_save(tmp, overwrite=True)


# --------------------------------------------------------------------------------------------
# Item 15: determinism; item 16: example configs a user can run
# --------------------------------------------------------------------------------------------


def _sparsegpt_masks(threads: int) -> dict[str, torch.Tensor]:
    from optishear_lightning import prune

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = tiny_llama(layers=4)
        result = prune(model, tokens(8, 32), "sparsegpt", 0.5)
        return result.masks | {"_weights": torch.tensor([int(model_digest(model)[:12], 16)])}
    finally:
        torch.set_num_threads(previous)


@case("15 determinism", "SparseGPT twice with the same thread count: bit-identical masks, weights")
def case_sparsegpt_same_threads_identical(tmp: Path) -> Outcome:
    first, second = _sparsegpt_masks(1), _sparsegpt_masks(1)
    same = all(torch.equal(first[k], second[k]) for k in first)
    return Outcome(f"two runs: {'identical' if same else 'DIFFERENT'}", same)


@case(
    "15 determinism",
    "1 vs 2 threads: identical, or the README says what differs and to pin the thread count",
)
def case_sparsegpt_thread_count_documented(tmp: Path) -> Outcome:
    one, two = _sparsegpt_masks(1), _sparsegpt_masks(2)
    names = [k for k in one if k != "_weights"]
    differ = sum(int((one[k] != two[k]).sum()) for k in names)
    total = sum(one[k].numel() for k in names)
    readme = (REPO_ROOT / "README.md").read_text()
    documented = "thread count" in readme and "set_num_threads" in readme
    observed = f"{differ}/{total} mask entries differ on this tiny model; README "
    observed += "documents thread dependence" if documented else "SAYS NOTHING"
    return Outcome(observed, differ == 0 or documented)


@case("16 examples", "example configs name data as c4 / wikitext2 (no ../shared paths)")
def case_example_configs_name_public_data(tmp: Path) -> Outcome:
    import yaml

    from optishear_lightning.data import CALIBRATION_SOURCES, EVALUATION_SOURCES

    known = set(CALIBRATION_SOURCES) | set(EVALUATION_SOURCES)
    bad, named = [], 0
    for path in sorted((REPO_ROOT / "examples" / "configs").glob("*.yaml")):
        data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
        for key, value in data.items():
            if not key.endswith("_data") or value is None:
                continue
            named += 1
            if str(value) not in known:
                bad.append(f"{path.name}:{key}={value}")
    observed = f"{named} data sources checked; not a public name: {bad or 'none'}"
    return Outcome(observed, named > 0 and not bad)


@case("16 examples", "Hub unreachable for 'c4': an error saying how to use a local file")
def case_unreachable_hub_says_local_file(tmp: Path) -> Outcome:
    out = tmp / "out.json"
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf"),
        "HF_DATASETS_CACHE": str(tmp / "hf" / "datasets"),
    }
    proc = spawn("hub", str(fixture(model_dir)), str(out), env=env)
    proc.communicate(timeout=CHILD_TIMEOUT_S)
    got = read_json(out)
    if got is None:
        return Outcome(f"child exit {proc.returncode}, wrote no result", False)
    message = got["message"]
    ok = got["type"] != "NoneType" and "local" in message.lower() and ".jsonl" in message
    hint = message[message.find("Without") :] if "Without" in message else message
    return Outcome(f"{got['type']}: ... {short(hint, 160)}", ok)


# --------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------


def run_case(number: int, item: Case) -> Record:
    """Run one case in a fresh temporary directory with a time limit; never raises."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{number:02d}-", dir=_SESSION["root"]))
    buffer = io.StringIO()
    started = time.perf_counter()
    signal.alarm(CASE_TIMEOUT_S)
    crashed, detail = False, ""
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer), captured():
            outcome = item.fn(tmp)
    except Exception as err:  # a bug in the case or an unexpected crash: not handled
        crashed = True
        detail = traceback.format_exc()
        outcome = Outcome(f"case crashed: {first_line(err)}", False)
    finally:
        signal.alarm(0)
    seconds = time.perf_counter() - started
    shutil.rmtree(tmp, ignore_errors=True)
    observed = outcome.observed.replace(str(tmp), "<tmp>").replace(str(_SESSION["root"]), "<run>")
    outcome = Outcome(observed, outcome.handled)
    return Record(
        number, item.id, item.group, item.expected, outcome.observed, bool(outcome.handled),
        seconds, crashed, detail,
    )  # fmt: skip


def machine() -> dict[str, Any]:
    """Where and with what the cases ran."""
    import lightning
    import transformers

    import optishear_lightning

    return {
        "date": utc_now("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "euid": os.geteuid(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "optishear_lightning": optishear_lightning.__version__,
        "git_commit": git_revision(abbrev=None) or "",
    }


def print_table(records: list[Record]) -> None:
    """The table on stdout: case, expected, observed, handled."""
    for r in records:
        mark = "ok " if r.handled else "NOT"
        print(f"[{mark}] {r.number:3d} {r.group:<15} {r.id}")
        print(f"        expected: {r.expected}")
        print(f"        observed: {r.observed}  ({r.seconds:.1f} s)")


def group_summary(records: list[Record]) -> list[str]:
    """Markdown lines: cases and handled cases per issue item or family."""
    counts: dict[str, list[int]] = {}
    for r in records:
        counts.setdefault(r.group, [0, 0])
        counts[r.group][0] += 1
        counts[r.group][1] += r.handled

    def order(group: str) -> tuple[int, str]:  # issue items by number, then the families
        head = group.split(" ")[0]
        return (int(head), group) if head.isdigit() else (100, group)

    rows = [(g, counts[g][0], counts[g][1]) for g in sorted(counts, key=order)]
    return [*md_table(("Item / family", "Cases", "Handled"), rows, "lrr"), ""]


def not_handled(records: list[Record]) -> list[str]:
    """Markdown lines listing the cases that were not handled (none: a line saying so)."""
    missed = [r for r in records if not r.handled]
    if not missed:
        return ["Every case was handled.", ""]
    lines = ["## Not handled", ""]
    for r in missed:
        lines.append(f"* `{r.id}` ({r.group}). Expected: {r.expected}. Observed: {r.observed}")
    return [*lines, ""]


def case_row(r: Record) -> tuple:
    """A case's cells in the table of every case."""
    handled = "yes" if r.handled else "**NO**"
    return (
        r.number,
        md_cell(r.group),
        f"`{r.id}`",
        md_cell(r.expected),
        md_cell(r.observed),
        handled,
    )


def markdown(records: list[Record], info: dict[str, Any], seconds: float, command: str) -> str:
    """The Markdown report."""
    handled = sum(r.handled for r in records)
    lines = [
        "# Reliability: fault injection (issue 11)",
        "",
        f"`{command}` on {info['date']}: **{handled} of {len(records)} cases handled**, "
        f"{len(records) - handled} not, in {seconds:.0f} s.",
        "",
        f"Machine: {info['platform']}, {info['cpu']}, {info['cpu_count']} CPUs "
        f"({info['cpus_usable']} usable), torch threads {info['torch_threads']}, "
        f"effective uid {info['euid']}. Versions: Python {info['python']}, torch "
        f"{info['torch']}, transformers {info['transformers']}, lightning "
        f"{info['lightning']}, optishear-lightning {info['optishear_lightning']} "
        f"(git {info['git_commit']}).",
        "",
        "Each case injects one fault on a tiny random model (LLaMA-shaped, hidden 64, vocabulary "
        "128; OPT, GPT-NeoX, Gemma where family specific) in a fresh temporary directory and "
        "measures what happened: the exception and the first line of its message, whether the "
        "weights are bit-identical (SHA-256 of every parameter), whether files are still there "
        "byte for byte, permissions, mask sparsities, evaluations redone. *Handled* means every "
        "measured check matched the expectation. `kill -9` and `SIGINT` are real signals sent "
        "to child processes; the read-only folders are simulated (`os.access` patched, as a "
        "non-root user sees it; the run is as root) or are paths under a regular file.",
        "",
        "Paths in messages: `<tmp>` is the case's temporary directory, `<run>` the run's.",
        "",
        *group_summary(records),
        *not_handled(records),
        "## Every case",
        "",
        *md_table(
            ("#", "Item / family", "Case", "Expected", "Observed", "Handled"),
            [case_row(r) for r in records],
            "rllllc",
        ),
        "",
    ]
    return "\n".join(lines)


def write_results(
    out: Path, records: list[Record], info: dict[str, Any], seconds: float, command: str
) -> None:
    """``reliability_cpu.md`` and ``reliability_cpu.json`` in ``out``."""
    data = {
        "machine": info,
        "command": command,
        "seconds": round(seconds, 1),
        "cases_total": len(records),
        "cases_handled": sum(r.handled for r in records),
        "cases": [
            {
                "number": r.number,
                "id": r.id,
                "group": r.group,
                "expected": r.expected,
                "observed": r.observed,
                "handled": r.handled,
                "seconds": round(r.seconds, 2),
                **({"traceback": r.detail} if r.crashed else {}),
            }
            for r in records
        ],
    }
    write_report(out / "reliability_cpu", data, markdown(records, info, seconds, command))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument("--only", default=None, help="run the cases whose id contains this")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny models: thread hand-offs cost more than the work
    if args.child:
        CHILDREN[args.child[0]](*args.child[1:])
        return 0
    if args.list:
        for i, item in enumerate(CASES, 1):
            print(f"{i:3d} {item.group:<15} {item.id}: {item.expected}")
        return 0
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    signal.signal(signal.SIGALRM, _on_alarm)
    chosen = [c for c in CASES if args.only is None or args.only in c.id]
    out = (
        args.out
        if args.out is not None
        else (None if args.only else REPO_ROOT / "benchmarks" / "results")
    )
    command = "python benchmarks/bench_reliability.py" + (
        f" --only {args.only}" if args.only else ""
    )
    started = time.perf_counter()
    records: list[Record] = []
    with tempfile.TemporaryDirectory(prefix="reliability-") as root:
        _SESSION["root"] = Path(root)
        for number, item in enumerate(CASES, 1):
            if item in chosen:
                record = run_case(number, item)
                records.append(record)
                print_table([record])
                sys.stdout.flush()
    seconds = time.perf_counter() - started
    handled = sum(r.handled for r in records)
    print(f"\n{handled} of {len(records)} cases handled in {seconds:.0f} s")
    for r in records:
        if not r.handled:
            print(f"  NOT handled: {r.id}: {r.observed}")
    if out is not None:
        write_results(out, records, machine(), seconds, command)
        print(f"results written to {out}")
    return 0 if handled == len(records) else 1


if __name__ == "__main__":
    sys.exit(main())
