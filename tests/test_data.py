"""Tests for optishear_lightning.data: calibration windows and evaluation tokens (offline)."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch

from optishear_lightning.data import (
    CALIBRATION_SOURCES,
    calibration_windows,
    evaluation_tokens,
    evaluation_windows,
)

from .conftest import WORD_BOS, word_text, word_tokenizer
from .test_models import BOS_FAMILIES, FAMILY_NAMES, make_model

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
C4_TRAIN = DATA_ROOT / "c4" / "c4-train.00000-of-01024.head1041.jsonl"
C4_VALIDATION = DATA_ROOT / "c4" / "c4-validation.00000-of-00008.head1025.jsonl"
WIKI_TEST = DATA_ROOT / "wikitext2" / "wiki.test.raw"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

needs_data = pytest.mark.skipif(
    not DATA_ROOT.is_dir(), reason=f"shared data directory {DATA_ROOT} is absent"
)


@pytest.fixture(scope="module")
def c4_docs() -> list[str]:
    if not C4_TRAIN.is_file():
        pytest.skip(f"{C4_TRAIN} is absent")
    with open(C4_TRAIN, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging if the body loops forever (Unix only; a no-op elsewhere)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------------
# Calibration: documents (C4 convention)
# ----------------------------------------------------------------------------------------------


@needs_data
def test_c4_jsonl_windows_shape_dtype_and_seeding(tokenizer, c4_docs):
    windows = calibration_windows(str(C4_TRAIN), tokenizer, n_samples=8, seq_len=256, seed=0)
    assert windows.shape == (8, 256)
    assert windows.dtype == torch.long
    again = calibration_windows(C4_TRAIN, tokenizer, n_samples=8, seq_len=256, seed=0)
    assert torch.equal(windows, again)
    other = calibration_windows(C4_TRAIN, tokenizer, n_samples=8, seq_len=256, seed=1)
    assert not torch.equal(windows, other)


@needs_data
def test_c4_jsonl_matches_wanda_get_c4_loop(tokenizer, c4_docs):
    n_samples, seq_len, seed = 6, 512, 0
    # Wanda's lib/data.py get_c4, verbatim apart from reading the documents from a list.
    random.seed(seed)
    expected = []
    for _ in range(n_samples):
        while True:
            i = random.randint(0, len(c4_docs) - 1)
            trainenc = tokenizer(c4_docs[i], return_tensors="pt")
            if trainenc.input_ids.shape[1] > seq_len:
                break
        i = random.randint(0, trainenc.input_ids.shape[1] - seq_len - 1)
        j = i + seq_len
        expected.append(trainenc.input_ids[:, i:j])
    expected = torch.cat(expected)

    random.seed(12345)
    global_state = random.getstate()
    got = calibration_windows(C4_TRAIN, tokenizer, n_samples, seq_len, seed)
    assert torch.equal(got, expected)
    # The sampler uses its own random.Random, so the caller's global RNG is left alone.
    assert random.getstate() == global_state
    # A list of strings is the same document source.
    assert torch.equal(calibration_windows(c4_docs, tokenizer, n_samples, seq_len, seed), expected)


def test_json_list_parquet_and_gzip_documents_agree(tokenizer, tmp_path):
    docs = [f"document {k}: " + " ".join(f"word{k}_{n}" for n in range(60)) for k in range(5)]
    (tmp_path / "docs.json").write_text(json.dumps([{"body": d} for d in docs]), encoding="utf-8")
    lines = "\n".join(json.dumps({"body": d}) for d in docs) + "\n"
    (tmp_path / "docs.jsonl").write_text(lines, encoding="utf-8")
    import gzip

    with gzip.open(tmp_path / "docs.json.gz", "wt", encoding="utf-8") as handle:
        handle.write(lines)  # C4 shards are JSON lines despite the .json.gz name
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet")

    expected = calibration_windows(docs, tokenizer, n_samples=4, seq_len=16, seed=3)
    for name in ("docs.json", "docs.jsonl", "docs.json.gz", "docs.parquet"):
        got = calibration_windows(
            tmp_path / name, tokenizer, n_samples=4, seq_len=16, seed=3, text_field="body"
        )
        assert torch.equal(got, expected), name
    with pytest.raises(ValueError, match="text_field"):
        calibration_windows(tmp_path / "docs.jsonl", tokenizer, n_samples=4, seq_len=16)


# ----------------------------------------------------------------------------------------------
# Calibration: one text stream (WikiText-2 convention)
# ----------------------------------------------------------------------------------------------


@needs_data
def test_txt_stream_windows_are_contiguous_slices(tokenizer):
    if not WIKI_TEST.is_file():
        pytest.skip(f"{WIKI_TEST} is absent")
    n_samples, seq_len, seed = 5, 128, 0
    windows = calibration_windows(WIKI_TEST, tokenizer, n_samples, seq_len, seed)
    assert windows.shape == (n_samples, seq_len)
    assert windows.dtype == torch.long

    full = tokenizer(WIKI_TEST.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    for window in windows:
        candidates = torch.nonzero(full[: full.numel() - seq_len + 1] == window[0]).flatten()
        assert any(torch.equal(full[s : s + seq_len], window) for s in candidates.tolist())
    # And the starts are Wanda's get_wikitext2 draws.
    random.seed(seed)
    starts = [random.randint(0, full.numel() - seq_len - 1) for _ in range(n_samples)]
    assert torch.equal(windows, torch.stack([full[s : s + seq_len] for s in starts]))


def test_stream_shorter_than_seq_len_is_rejected(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("only a handful of words here", encoding="utf-8")
    with pytest.raises(ValueError, match="seq_len"):
        calibration_windows(path, tokenizer, n_samples=2, seq_len=64)


# ----------------------------------------------------------------------------------------------
# Calibration: data-free (self-generated)
# ----------------------------------------------------------------------------------------------


class _EosBiasedHead(torch.nn.Module):
    """LM head that makes EOS by far the likeliest token, so any early stop would show."""

    def __init__(self, head: torch.nn.Module, eos_id: int) -> None:
        super().__init__()
        self.head = head
        self.eos_id = eos_id

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        logits[..., self.eos_id] += 50.0
        return logits


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.lm_head = _EosBiasedHead(model.lm_head, eos_id=2)
    return model


def test_self_generated_windows_exact_length_and_deterministic(tokenizer, tiny_llama):
    assert len(tokenizer) == 49152
    torch_state = torch.get_rng_state()
    windows = calibration_windows(
        "self",
        tokenizer,
        n_samples=3,
        seq_len=24,
        seed=0,
        model=tiny_llama,
        generation_batch_size=2,
    )
    assert windows.shape == (3, 24)  # EOS is 50 logits ahead yet no row stopped early
    assert windows.dtype == torch.long
    assert torch.all(windows[:, 0] == 1)  # each sample starts from BOS
    assert not torch.any(windows[:, 1:] == 2)
    assert torch.equal(torch.get_rng_state(), torch_state)  # the caller's RNG is untouched
    assert tiny_llama.training  # train/eval mode restored (a fresh model is in train mode)

    again = calibration_windows(
        "generated",
        tokenizer,
        n_samples=3,
        seq_len=24,
        seed=0,
        model=tiny_llama,
        generation_batch_size=2,
    )
    assert torch.equal(windows, again)
    other = calibration_windows(
        None, tokenizer, n_samples=3, seq_len=24, seed=1, model=tiny_llama, generation_batch_size=2
    )
    assert not torch.equal(windows, other)


def test_self_generated_needs_a_model(tokenizer):
    with pytest.raises(ValueError, match="model"):
        calibration_windows("self", tokenizer, n_samples=2, seq_len=8)


# ----------------------------------------------------------------------------------------------
# Calibration: other sources and errors
# ----------------------------------------------------------------------------------------------


def test_token_tensor_is_returned_as_is():
    tokens = torch.randint(0, 100, (4, 16))
    assert calibration_windows(tokens, None) is tokens
    with pytest.raises(ValueError, match="shape"):
        calibration_windows(torch.arange(10), None)


def test_seq_len_longer_than_every_document_fails_fast(tokenizer):
    docs = ["A short document."] * 500 + ["Another, slightly longer, but still short one."]
    start = time.monotonic()
    with time_limit(30), pytest.raises(ValueError, match="seq_len"):
        calibration_windows(docs, tokenizer, n_samples=4, seq_len=64)
    assert time.monotonic() - start < 30


@needs_data
def test_seq_len_longer_than_every_c4_document_fails_fast(tokenizer, c4_docs):
    with time_limit(60), pytest.raises(ValueError, match=r"seq_len=100000.*lower seq_len"):
        calibration_windows(C4_TRAIN, tokenizer, n_samples=2, seq_len=100_000)


def test_unknown_name_lists_accepted_sources(tokenizer):
    with pytest.raises(ValueError, match="file") as info:
        calibration_windows("openwebtext", tokenizer)
    for name in CALIBRATION_SOURCES:
        assert repr(name) in str(info.value)


@pytest.mark.parametrize(
    ("source", "kwargs", "match"),
    [
        ([], {}, "empty"),
        ("", {}, "empty"),
        (["some text"], {"n_samples": 0}, "n_samples"),
        (["some text"], {"seq_len": 1}, "seq_len"),
    ],
)
def test_invalid_arguments_raise(tokenizer, source, kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibration_windows(source, tokenizer, **kwargs)


def test_directory_and_unsupported_files_are_rejected(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="directory"):
        calibration_windows(tmp_path, tokenizer)
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\.jsonl"):
        calibration_windows(csv, tokenizer)
    with pytest.raises(FileNotFoundError):
        calibration_windows(tmp_path / "missing.jsonl", tokenizer)


# ----------------------------------------------------------------------------------------------
# Evaluation tokens
# ----------------------------------------------------------------------------------------------


@needs_data
def test_evaluation_tokens_of_wiki_test_raw(tokenizer):
    if not WIKI_TEST.is_file():
        pytest.skip(f"{WIKI_TEST} is absent")
    ids = evaluation_tokens(str(WIKI_TEST), tokenizer)
    with open(WIKI_TEST, encoding="utf-8") as handle:
        expected = torch.tensor(tokenizer(handle.read()).input_ids)
    assert ids.dim() == 1
    assert ids.dtype == torch.long
    assert torch.equal(ids, expected)
    assert torch.equal(evaluation_tokens(WIKI_TEST, tokenizer, max_tokens=1000), expected[:1000])


@needs_data
def test_evaluation_tokens_of_c4_jsonl_join_max_docs(tokenizer):
    if not C4_VALIDATION.is_file():
        pytest.skip(f"{C4_VALIDATION} is absent")
    with open(C4_VALIDATION, encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line, _ in zip(handle, range(10), strict=False)]
    expected = torch.tensor(tokenizer(" ".join(texts)).input_ids)
    ids = evaluation_tokens(C4_VALIDATION, tokenizer, max_docs=10)
    assert torch.equal(ids, expected)
    assert torch.equal(
        evaluation_tokens(C4_VALIDATION, tokenizer, max_docs=10, max_tokens=7), ids[:7]
    )
    assert torch.equal(evaluation_tokens(texts, tokenizer), expected)


def test_evaluation_tokens_of_raw_text_without_truncation_or_warning(tokenizer):
    text = " ".join(f"token{n}" for n in range(400))
    expected = torch.tensor(tokenizer(text).input_ids)
    saved_max = tokenizer.model_max_length
    flag = "sequence-length-is-longer-than-the-specified-maximum"
    saved_flag = tokenizer.deprecation_warnings.pop(flag, None)
    tokenizer.model_max_length = 16  # the text is far longer than the "model" accepts
    try:
        ids = evaluation_tokens(None, tokenizer, text=text)
        warned = flag in tokenizer.deprecation_warnings
    finally:
        tokenizer.model_max_length = saved_max
        if saved_flag is not None:
            tokenizer.deprecation_warnings[flag] = saved_flag
    assert torch.equal(ids, expected)
    assert ids.numel() > 16
    assert not warned


def test_evaluation_tokens_errors(tokenizer):
    with pytest.raises(ValueError, match="text="):
        evaluation_tokens("this is some prose, not a source", tokenizer)
    with pytest.raises(ValueError, match="wikitext2"):
        evaluation_tokens("self", tokenizer)
    with pytest.raises(ValueError, match="not both"):
        evaluation_tokens("wikitext2", tokenizer, text="hello")
    with pytest.raises(ValueError):
        evaluation_tokens(None, tokenizer)
    tokens = torch.arange(12).unsqueeze(0)
    assert torch.equal(evaluation_tokens(tokens, None), torch.arange(12))


def test_few_long_documents_warn(tokenizer):
    docs = ["short text"] * 20 + ["a much longer document " * 40]
    with pytest.warns(UserWarning, match="Only 1 distinct documents"):
        windows = calibration_windows(docs, tokenizer, n_samples=8, seq_len=32, seed=0)
    assert windows.shape == (8, 32)
    many = [f"document number {i} " * 40 for i in range(64)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibration_windows(many, tokenizer, n_samples=8, seq_len=32, seed=0)


def test_unreachable_hub_dataset_says_how_to_use_a_local_file(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    from optishear_lightning.data import _load_c4

    with pytest.raises(RuntimeError, match=r"allenai/c4.*local copy.*\.jsonl"):
        _load_c4("train", "en/c4-train.00000-of-01024.json.gz")


# ----------------------------------------------------------------------------------------------
# A BOS token at the start of every window (bos_per_window)
# ----------------------------------------------------------------------------------------------


def wanda_windows(ids_of, n_items, n_samples, seq_len, seed, bos=None, documents=True):
    """Wanda's get_c4 (documents) / get_wikitext2 (one stream) loops, optionally BOS + body.

    Off (``bos=None``) this is the published code, the behaviour before bos_per_window existed.
    On, a leading BOS is dropped from the token ids, the loop runs on ``seq_len - 1`` tokens and
    every window gets BOS in front.
    """
    body = seq_len - (bos is not None)

    def ids(i):
        out = ids_of(i)
        return out[1:] if bos is not None and out[0] == bos else out

    rng = random.Random(seed)
    windows = []
    for _ in range(n_samples):
        if documents:
            while True:
                tokens = ids(rng.randint(0, n_items - 1))
                if tokens.numel() > body:
                    break
        else:
            tokens = ids(0)
        start = rng.randint(0, tokens.numel() - body - 1)
        window = tokens[start : start + body]
        windows.append(window if bos is None else torch.cat([torch.tensor([bos]), window]))
    return torch.stack(windows)


BOS_DOCS = [word_text(n, seed=k) for k, n in enumerate([5, 40, 60, 12, 80, 33, 9, 50])]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bos_per_window_calibration_windows_every_family(family, tmp_path):
    tok = word_tokenizer()  # puts BOS in front of every text, as LLaMA and Gemma tokenizers do
    model = make_model(family)
    stream_file = tmp_path / "stream.txt"
    stream_file.write_text(word_text(300, seed=99), encoding="utf-8")
    n, seq_len = 6, 16

    def doc_ids(i):
        return tok(BOS_DOCS[i], return_tensors="pt").input_ids[0]

    def stream_ids(_):
        return tok(stream_file.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]

    for source, ids_of, documents in ((BOS_DOCS, doc_ids, True), (stream_file, stream_ids, False)):
        args = (source, tok, n, seq_len, 0)
        plain = wanda_windows(ids_of, len(BOS_DOCS), n, seq_len, 0, None, documents)
        with_bos = wanda_windows(ids_of, len(BOS_DOCS), n, seq_len, 0, WORD_BOS, documents)
        default = calibration_windows(*args, model=model)
        # The family default: BOS per window for Gemma, the published windows bit for bit for
        # every other family.
        assert torch.equal(default, with_bos if family in BOS_FAMILIES else plain)
        assert torch.equal(calibration_windows(*args, model=model, bos_per_window=False), plain)
        on = calibration_windows(*args, model=model, bos_per_window=True)
        assert torch.equal(on, with_bos)
        assert on.shape == (n, seq_len)
        assert torch.all(on[:, 0] == WORD_BOS) and not torch.any(on[:, 1:] == WORD_BOS)


def test_bos_per_window_without_bos_token_fails_before_any_work(monkeypatch):
    import optishear_lightning.data as data

    def no_work(*args, **kwargs):
        raise AssertionError("tokenised text before checking the setting")

    monkeypatch.setattr(data, "encode_text", no_work)
    tok = word_tokenizer(bos=False)
    with pytest.raises(ValueError, match=r"bos_per_window=True.*bos_per_window=False"):
        calibration_windows(BOS_DOCS, tok, 2, 8, bos_per_window=True)
    with pytest.raises(ValueError, match=r"gemma2 family.*bos_per_window=False"):
        calibration_windows(BOS_DOCS, tok, 2, 8, model=make_model("gemma2"))
    monkeypatch.undo()
    # The other families need no BOS: windows are cut as before.
    assert calibration_windows(BOS_DOCS, tok, 2, 8, model=make_model("llama")).shape == (2, 8)


def test_bos_per_window_text_too_short_says_so(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text(word_text(8), encoding="utf-8")  # 9 tokens with the tokenizer's BOS
    tok = word_tokenizer()
    assert calibration_windows(path, tok, 2, 8).shape == (2, 8)
    with pytest.raises(ValueError, match="less the BOS"):
        calibration_windows(path, tok, 2, 9, bos_per_window=True)


def test_bos_per_window_self_generated_windows_start_with_bos():
    gemma = make_model("gemma")
    default = calibration_windows("self", None, 2, 8, seed=0, model=gemma)
    assert torch.all(default[:, 0] == WORD_BOS)
    # Generation starts from BOS anyway: the setting only checks that there is one.
    off = calibration_windows("self", None, 2, 8, seed=0, model=gemma, bos_per_window=False)
    assert torch.equal(default, off)
    no_bos = make_model("llama")
    no_bos.config.bos_token_id = None
    no_bos.generation_config.bos_token_id = None
    with pytest.raises(ValueError, match="bos_per_window=False"):
        calibration_windows("self", None, 2, 8, model=no_bos, bos_per_window=True)


def test_evaluation_windows_with_and_without_bos():
    seq_len = 8
    stream = torch.cat([torch.tensor([WORD_BOS]), torch.arange(10, 10 + 42)])  # 43 tokens
    plain = evaluation_windows(stream, seq_len)
    assert torch.equal(plain, stream[: 5 * seq_len].reshape(5, seq_len))  # the literature's cut
    on = evaluation_windows(stream, seq_len, bos_token_id=WORD_BOS)
    # As many windows, each [BOS] + the next seq_len - 1 text tokens: no text token twice.
    assert on.shape == plain.shape
    assert torch.all(on[:, 0] == WORD_BOS)
    assert torch.equal(on[:, 1:].reshape(-1), stream[1 : 1 + 5 * (seq_len - 1)])
    # A stream that does not start with BOS loses no token.
    body = stream[1:]
    assert torch.equal(
        evaluation_windows(body, seq_len, bos_token_id=WORD_BOS)[:, 1:].reshape(-1),
        body[: 5 * (seq_len - 1)],
    )
    assert evaluation_windows(stream, seq_len, max_windows=2, bos_token_id=WORD_BOS).shape == (
        2,
        seq_len,
    )
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluation_windows(stream[:7], seq_len, bos_token_id=WORD_BOS)
