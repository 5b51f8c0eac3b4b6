"""Tests for optishear_lightning.calibration (and prune() on top of it), offline.

The central check: the sequential, block-by-block pipeline must feed every decoder block
exactly the hidden states (and the statistics of exactly the activations) that one ordinary
forward pass of the dense model produces, for every supported family, including those whose
blocks get different attention masks or rotary tables (sliding-window Qwen2, Gemma-2/3).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optishear_lightning.calibration import (
    LayerStats,
    capture_block_inputs,
    run_sequential,
)
from optishear_lightning.metrics import ScoreMethod, wanda_score
from optishear_lightning.models import find_decoder_blocks, find_prunable_linears
from optishear_lightning.pruning import prune

try:
    from .test_models import FAMILY_NAMES, LAYERS, SEQ_LEN, make_model, token_ids
except ImportError:  # tests/ is not a package
    from test_models import FAMILY_NAMES, LAYERS, SEQ_LEN, make_model, token_ids

RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("single_thread")


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), f"{name} was not restored"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().clamp_min(1e-12)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= RTOL, f"{what}: max error {err:.2e} relative to max |value|"


def dense_reference(model: nn.Module, batches: list[torch.Tensor]):
    """Block inputs and linear-layer statistics of ordinary full forward passes.

    The statistics come from plain forward hooks written here, independent of StatsCollector.
    """
    _, blocks = find_decoder_blocks(model)
    stats: dict[str, LayerStats] = {}

    def hook(name: str):
        def record(module, args, output):
            x = args[0].reshape(-1, module.in_features).float()
            st = stats.setdefault(
                name,
                LayerStats(torch.zeros(module.in_features), 0, torch.zeros(x.shape[1], x.shape[1])),
            )
            st.sq_sum += (x * x).sum(0)
            st.n_tokens += x.shape[0]
            st.gram += x.t() @ x

        return record

    handles = [
        lin.register_forward_hook(hook(f"{i}.{name}"))
        for i, block in enumerate(blocks)
        for name, lin in find_prunable_linears(block).items()
    ]
    hidden: list[list[torch.Tensor]] = [[] for _ in blocks]
    try:
        with torch.no_grad():
            for ids in batches:
                out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
                for i in range(len(blocks)):
                    hidden[i].append(out.hidden_states[i])  # the input of block i
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(h) for h in hidden], stats


def sequential_observations(
    model: nn.Module, batches: list[torch.Tensor], changed: bool = False, **kwargs
) -> tuple[list[torch.Tensor], dict[str, LayerStats]]:
    """Run run_sequential with an on_block that changes nothing; record inputs and stats."""
    _, blocks = find_decoder_blocks(model)
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]

    def record(module, args, kw):
        hidden = args[0] if args else kw["hidden_states"]
        seen[index_of[id(module)]].append(hidden.detach().clone())

    index_of = {id(b): i for i, b in enumerate(blocks)}
    handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks]
    stats: dict[str, LayerStats] = {}
    order: list[int] = []

    def on_block(index, name, block, block_stats):
        assert block is blocks[index]
        assert name.endswith(f".{index}")
        order.append(index)
        for sub, st in block_stats.items():
            stats[f"{index}.{sub}"] = st
        return changed

    try:
        run_sequential(model, batches, on_block, gram_for=lambda n, m: True, **kwargs)
    finally:
        for h in handles:
            h.remove()
    assert order == list(range(len(blocks)))
    # Each block runs once per batch (twice when on_block reports a change).
    per_block = len(batches) * (2 if changed else 1)
    assert all(len(s) == per_block for s in seen)
    return [torch.cat(s[: len(batches)]) for s in seen], stats


# --------------------------------------------------------------------------------------------
# The sequential pipeline reproduces the dense forward pass


@pytest.mark.parametrize("changed", [False, True], ids=["unchanged", "recomputed"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sequential_matches_dense_forward(family, changed):
    model = make_model(family)
    ids = token_ids(4)
    batches = [ids[:2], ids[2:]]
    ref_hidden, ref_stats = dense_reference(model, batches)
    before = snapshot(model)

    hidden, stats = sequential_observations(model, batches, changed=changed)

    assert len(hidden) == LAYERS
    for i, (got, want) in enumerate(zip(hidden, ref_hidden, strict=True)):
        assert got.shape == want.shape == (4, SEQ_LEN, model.config.hidden_size)
        assert_close(got, want, f"{family} block {i} input")
    assert set(stats) == set(ref_stats)
    for name, st in stats.items():
        assert st.n_tokens == ref_stats[name].n_tokens == 4 * SEQ_LEN
        assert_close(st.sq_sum, ref_stats[name].sq_sum, f"{family} {name} sq_sum")
        assert_close(st.gram, ref_stats[name].gram, f"{family} {name} gram")
    assert_unchanged(model, before)
    # The blocks are back in place and the model still runs normally.
    _, blocks = find_decoder_blocks(model)
    assert all(type(b).__name__ != "_BlockRecorder" for b in blocks)
    with torch.no_grad():
        again = model(ids, output_hidden_states=True).hidden_states
    for i in range(LAYERS):
        assert_close(again[i], ref_hidden[i], f"{family} block {i} input after the run")


@pytest.mark.parametrize("family", ["llama", "qwen2_sliding", "gemma3", "gpt_neox"])
def test_changed_block_feeds_its_new_outputs_on(family):
    # When on_block prunes a block, the next block must see the pruned block's outputs.
    model = make_model(family)
    ids = token_ids(4)

    def halve(index, name, block, stats):
        for lin in find_prunable_linears(block).values():
            lin.weight.mul_(torch.rand_like(lin.weight) > 0.5)
        return True

    _, blocks = find_decoder_blocks(model)
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]
    handles = [
        b.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].clone()))
        for i, b in enumerate(blocks)
    ]
    torch.manual_seed(0)
    run_sequential(model, [ids[:2], ids[2:]], halve)
    for h in handles:
        h.remove()
    pruned_hidden, _ = dense_reference(model, [ids[:2], ids[2:]])
    for i in range(1, LAYERS):
        # Calls per block: 2 batches before pruning, 2 after; the next block sees the latter.
        assert_close(torch.cat(seen[i][:2]), pruned_hidden[i], f"{family} block {i} input")


def test_capture_records_per_block_calls():
    # Gemma-3's sliding and full layers get different masks and rotary tables: they must be
    # recorded per block, and identical tensors stored once.
    model = make_model("gemma3")
    ids = token_ids(4)
    inputs = capture_block_inputs(model, [ids[:2], ids[2:]], "cpu")
    assert len(inputs.hidden) == 2 and len(inputs.calls) == LAYERS
    assert all(len(c) == 2 for c in inputs.calls)
    sliding, full = inputs.calls[0][0][1], inputs.calls[1][0][1]
    assert "past_key_values" not in sliding and sliding["use_cache"] is False
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])
    # Blocks 0 and 2 are both sliding: same tensors, stored once.
    assert inputs.calls[2][0][1]["position_embeddings"][0] is sliding["position_embeddings"][0]
    assert inputs.calls[0][1][1]["position_embeddings"][0] is sliding["position_embeddings"][0]


def test_train_mode_model_is_calibrated_without_dropout():
    # OPT has dropout 0.1; a freshly built model (or one from a training loop) is in train mode.
    model = make_model("opt")
    assert model.config.dropout > 0
    ids = token_ids(4)
    ref_hidden, ref_stats = dense_reference(model, [ids])  # eval mode
    model.train()
    model.lm_head.eval()  # a mixed state, to check that each flag is restored
    hidden, stats = sequential_observations(model, [ids])
    for got, want in zip(hidden, ref_hidden, strict=True):
        assert_close(got, want, "block input")
    for name, st in stats.items():
        assert_close(st.sq_sum, ref_stats[name].sq_sum, name)
    assert model.training and model.model.decoder.layers[1].training
    assert not model.lm_head.training


# --------------------------------------------------------------------------------------------
# Batching


@pytest.mark.parametrize("family", ["llama", "qwen2_sliding", "gemma3", "opt"])
def test_batched_calibration_equals_unbatched(family):
    model = make_model(family)
    ids = token_ids(4)
    one = sequential_observations(model, [row.unsqueeze(0) for row in ids])[1]
    four = sequential_observations(model, [ids])[1]
    assert set(one) == set(four)
    for name in one:
        assert one[name].n_tokens == four[name].n_tokens
        assert_close(one[name].sq_sum, four[name].sq_sum, name)
        assert_close(one[name].gram, four[name].gram, name)


# --------------------------------------------------------------------------------------------
# Offload


def track_moves(model: nn.Module, log: list, monkeypatch) -> None:
    """Log every ``block.to(...)`` call as ("to", block index, device)."""
    _, blocks = find_decoder_blocks(model)
    for i, block in enumerate(blocks):

        def to(*args, _i=i, _orig=block.to, **kwargs):
            log.append(("to", _i, torch.device(args[0] if args else kwargs["device"])))
            return _orig(*args, **kwargs)

        monkeypatch.setattr(block, "to", to)


def test_offload_on_cpu(monkeypatch):
    model = make_model("llama")
    ids = token_ids(4)
    ref_hidden, ref_stats = dense_reference(model, [ids])
    log: list = []
    track_moves(model, log, monkeypatch)
    hidden, stats = sequential_observations(model, [ids], device="cpu", offload=True)
    for got, want in zip(hidden, ref_hidden, strict=True):
        assert_close(got, want, "block input")
    for name, st in stats.items():
        assert_close(st.sq_sum, ref_stats[name].sq_sum, name)
    cpu = torch.device("cpu")
    # Each block visits the run device once and is then sent back home.
    assert log == [("to", i, cpu) for i in range(LAYERS) for _ in range(2)]
    assert {p.device for p in model.parameters()} == {cpu}

    before = snapshot(model)
    result = prune(model, ids, "wanda", 0.5, device="cpu", offload=True)
    assert result.overall_sparsity == pytest.approx(0.5)
    assert {p.device for p in model.parameters()} == {cpu}
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_offload_sends_block_home_on_failure(monkeypatch):
    model = make_model("llama")
    log: list = []
    track_moves(model, log, monkeypatch)

    def on_block(index, name, block, stats):
        log.append(("on_block", index))
        if index == 1:
            raise RuntimeError("boom")
        return False

    with pytest.raises(RuntimeError, match="boom"):
        run_sequential(model, [token_ids(2)], on_block, device="cpu", offload=True)
    assert log[-2:] == [("on_block", 1), ("to", 1, torch.device("cpu"))]


# --------------------------------------------------------------------------------------------
# prune() on every family: exact sparsity


def prunable(model: nn.Module) -> dict[str, nn.Linear]:
    blocks_name, blocks = find_decoder_blocks(model)
    return {
        f"{blocks_name}.{i}.{name}.weight": lin
        for i, block in enumerate(blocks)
        for name, lin in find_prunable_linears(block).items()
    }


@pytest.mark.parametrize(
    "method,sparsity,pattern",
    [("wanda", 0.5, "unstructured"), ("sparsegpt", None, "2:4")],
    ids=["wanda-0.5", "sparsegpt-2:4"],
)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prune_exact_sparsity(family, method, sparsity, pattern):
    model = make_model(family)
    ids = token_ids(4)
    result = prune(model, ids, method, sparsity, pattern, batch_size=2)
    linears = prunable(model)
    assert set(result.masks) == set(linears)
    for fqn, lin in linears.items():
        w = lin.weight.detach()
        zeros = w == 0
        rows, cols = w.shape
        if pattern == "2:4":
            per_group = zeros.reshape(rows, cols // 4, 4).sum(-1)
            assert (per_group == 2).all(), fqn
        else:
            assert (zeros.sum(1) == cols // 2).all(), fqn
        assert torch.equal(result.masks[fqn], ~zeros), fqn
        assert result.layer_sparsity[fqn] == pytest.approx(0.5)
    assert result.overall_sparsity == pytest.approx(0.5)
    assert result.n_calibration_samples == 4 and result.calibration_seq_len == SEQ_LEN
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


# --------------------------------------------------------------------------------------------
# Atomicity


class FailingWanda(ScoreMethod):
    """Wanda that raises on its ``fail_at``-th layer (counting from 1)."""

    def __init__(self, fail_at: int, exc: BaseException):
        super().__init__("failing_wanda", wanda_score)
        self.fail_at = fail_at
        self.exc = exc
        self.calls = 0

    def prune_(self, weight, stats, sparsity, pattern, group="row"):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.exc
        return super().prune_(weight, stats, sparsity, pattern, group)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=type)
@pytest.mark.parametrize("offload", [False, True])
def test_failure_mid_prune_restores_dense_weights(exc, offload):
    model = make_model("llama")
    before = snapshot(model)
    per_block = len(find_prunable_linears(find_decoder_blocks(model)[1][0]))
    # Block 0 fully pruned, block 1 half pruned when the failure hits.
    method = FailingWanda(fail_at=per_block + 4, exc=exc)
    with pytest.raises(type(exc)):
        prune(model, token_ids(4), method, 0.5, offload=offload)
    assert method.calls == per_block + 4
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "method,sparsity,pattern", [("wanda", 0.5, "unstructured"), ("sparsegpt", None, "2:4")]
)
def test_nan_activations_raise_and_restore(method, sparsity, pattern):
    model = make_model("llama")
    before = snapshot(model)
    _, blocks = find_decoder_blocks(model)
    # Block 1's own inputs are fine; its output (so block 2's input) is NaN.
    handle = blocks[1].mlp.register_forward_hook(lambda m, a, out: out * float("nan"))
    with pytest.raises(FloatingPointError, match=r"Block 2.*float32 or bfloat16"):
        prune(model, token_ids(4), method, sparsity, pattern)
    handle.remove()
    assert_unchanged(model, before)
