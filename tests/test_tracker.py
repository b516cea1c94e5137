"""PrecisionGateTracker against a naive before/after bitwise diff."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sparse_rl_optim import RLSGD, PrecisionGateTracker
from sparse_rl_optim.tracker import module_kind, unwrap_optimizer
from sparse_rl_optim.tracker.reference import SparseReference


class TinyBlock(nn.Module):
    """Names like a Llama layer, so grouping by module kind has something to group."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width // 2, bias=False)
        self.v_proj = nn.Linear(width, width // 2, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.input_layernorm = nn.LayerNorm(width)


class TinyModel(nn.Module):
    def __init__(self, width: int, layers: int, vocab: int = 11) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(TinyBlock(width) for _ in range(layers))
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(tokens)
        for layer in self.layers:
            hidden = hidden + layer.o_proj(layer.q_proj(hidden)) + layer.mlp(layer.input_layernorm(hidden))
        return self.lm_head(hidden)


def bits_of(param: torch.Tensor) -> torch.Tensor:
    view = param.detach() if param.dtype in (torch.bfloat16, torch.float16) else param.detach().to(torch.bfloat16)
    return view.contiguous().view(torch.int16).clone()


def make_optimizer(name: str, params, lr_scale: float):
    if name == "rlsgd":
        return RLSGD(params, lr=0.05 * lr_scale)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05 * lr_scale, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-3 * lr_scale)


def train_step(model: TinyModel, optimizer, generator: torch.Generator) -> None:
    tokens = torch.randint(0, 11, (4, 6), generator=generator)
    loss = model(tokens).float().logsumexp(-1).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@given(
    optimizer_name=st.sampled_from(["rlsgd", "sgd", "adamw"]),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    width=st.sampled_from([8, 16]),
    lr_scale=st.sampled_from([0.1, 1.0, 10.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_counts_equal_naive_bitwise_diff(optimizer_name, dtype, width, lr_scale, seed):
    torch.manual_seed(seed)
    model = TinyModel(width, layers=2).to(dtype)
    optimizer = make_optimizer(optimizer_name, model.parameters(), lr_scale)
    tracker = PrecisionGateTracker(model).attach(optimizer)
    named = list(model.named_parameters())
    reference = {name: bits_of(p) for name, p in named}
    sync_point = dict(reference)
    generator = torch.Generator().manual_seed(seed)
    for step in range(4):
        if step == 2:
            shipped = tracker.mark_synced()  # what this sync ships: the diff against the previous one
            assert shipped == sum(int((bits_of(p) != sync_point[n]).sum()) for n, p in named)
            sync_point = {name: bits_of(p) for name, p in named}
        before = {name: bits_of(p) for name, p in named}
        train_step(model, optimizer, generator)
        record = tracker.history[-1]
        per_param = {name: int((bits_of(p) != before[name]).sum()) for name, p in named}
        assert record["per_param"] == per_param
        assert record["changed_outside_step"] == []  # the running checksum stays exact
        assert record["changed"] == sum(per_param.values())
        assert record["total"] == sum(p.numel() for _, p in named)
        assert record["cumulative_changed"] == sum(int((bits_of(p) != reference[n]).sum()) for n, p in named)
        assert record["changed_since_sync"] == sum(int((bits_of(p) != sync_point[n]).sum()) for n, p in named)
    assert tracker.changed_since_sync == sum(int((bits_of(p) != sync_point[n]).sum()) for n, p in named)
    masks = tracker.changed_masks("reference")
    for name, param in named:
        assert torch.equal(masks[name], bits_of(param) != reference[name])
    if optimizer_name == "rlsgd":
        assert all(r["swallowed"] is not None for r in tracker.history)
    else:
        assert all(r["swallowed"] is None for r in tracker.history)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swallowed_equals_naive_count(dtype):
    """For fp32 params "swallowed" is judged on the bf16 view, what a bf16 inference engine loads."""
    torch.manual_seed(0)
    param = nn.Parameter((0.05 * torch.randn(200, 50)).to(dtype))
    optimizer = RLSGD([param], lr=0.1)
    tracker = PrecisionGateTracker([("w", param)]).attach(optimizer)
    for _ in range(3):
        grad = (0.002 * torch.randn(200, 50)).to(dtype)
        grad[:20] = 0
        param.grad = grad
        before = bits_of(param)
        optimizer.step()
        intended = (grad.float() * np.float32(0.1)) != 0
        swallowed = int((intended & (bits_of(param) == before)).sum())
        record = tracker.history[-1]
        assert record["intended"] == int(intended.sum())
        assert record["swallowed"] == swallowed > 0
        assert record["changed"] == int(intended.sum()) - swallowed  # nothing changes without an update


class SetValues(torch.optim.Optimizer):
    """Writes prescribed values: lets a test move a weight away and back."""

    def __init__(self, params):
        super().__init__(params, {})
        self.next_values: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure=None):
        for param, value in zip(self.param_groups[0]["params"], self.next_values, strict=True):
            param.copy_(value)


def test_cumulative_is_exact_when_a_weight_moves_and_moves_back():
    param = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16))
    optimizer = SetValues([param])
    tracker = PrecisionGateTracker([("w", param)]).attach(optimizer)
    sequence = [[1.5, 2.0, 3.0, 4.0], [1.0, 2.5, 3.0, 4.0], [1.0, 2.5, 3.0, 4.0]]
    for values in sequence:
        optimizer.next_values = [torch.tensor(values, dtype=torch.bfloat16)]
        optimizer.step()
    assert [r["changed"] for r in tracker.history] == [1, 2, 0]
    assert [r["cumulative_changed"] for r in tracker.history] == [1, 1, 1]


def test_sparse_reference_switches_to_dense_and_stays_exact():
    generator = torch.Generator().manual_seed(3)
    reference_bits = torch.randint(-(2**15), 2**15, (1000,), generator=generator, dtype=torch.int32).to(torch.int16)
    store = SparseReference(reference_bits)
    current = reference_bits.clone()
    for step in range(5):
        before = current.clone()
        flip = torch.rand(1000, generator=generator) < 0.1
        current = torch.where(flip, current ^ 1, current)
        changed_indices = (before != current).nonzero().squeeze(1)
        store.record(changed_indices, before[changed_indices], current)
        assert int(store.count_differing(current)) == int((current != reference_bits).sum())
        assert torch.equal(store.differing_mask(current), current != reference_bits)
        if step == 0:
            assert not store.is_dense
    assert store.is_dense  # >20% touched: a dense copy is smaller than index + value pairs
    held = sum(
        t.untyped_storage().nbytes() for t in (store._touched, store._indices, store._reference_values, store._dense)
    )
    assert store.nbytes() == held == 1000 * 2  # the sparse storage was freed, not kept behind a view


def test_groups_summary_exports_and_memory(tmp_path):
    torch.manual_seed(1)
    model = TinyModel(16, layers=2).to(torch.bfloat16)
    optimizer = RLSGD(model.parameters(), lr=0.05)
    stream = tmp_path / "stream.jsonl"
    tracker = PrecisionGateTracker(model, jsonl_path=stream).attach(optimizer)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        train_step(model, optimizer, generator)
    record = tracker.history[-1]
    assert set(record["by_kind"]) == {"attn_q", "attn_k", "attn_v", "attn_o", "mlp", "embed", "norm", "lm_head"}
    assert sum(entry["total"] for entry in record["by_kind"].values()) == tracker.total
    assert sum(entry["changed"] for entry in record["by_kind"].values()) == record["changed"]
    assert set(record["by_layer"]) == {"0", "1", "None"}
    assert record["by_kind"]["attn_q"]["total"] == 2 * 16 * 16

    summary = tracker.summary()
    assert summary["steps"] == 3
    assert summary["cumulative_changed"] == record["cumulative_changed"]
    assert 0 < summary["mean_changed_fraction"] <= 1
    assert 0 <= summary["swallowed_of_weights"] <= 1 and 0 <= summary["swallowed_of_updates"] <= 1
    assert set(summary["by_kind"]) == set(record["by_kind"])

    saved = tmp_path / "history.jsonl"
    tracker.save_history(saved)
    for path in (saved, stream):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [line["step"] for line in lines] == [1, 2, 3]
        assert lines[-1]["changed"] == record["changed"]

    png = tmp_path / "gate.png"
    tracker.plot(png, title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    memory = tracker.memory_bytes()
    assert memory["step_snapshot_bytes_per_param"] == 2.0
    expected_persistent = sum(t.reference.nbytes() + t.since_sync.nbytes() for t in tracker._params)
    assert memory["persistent_bytes"] == expected_persistent > 0


def test_nonfinite_weights_are_counted_and_warned():
    param = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    optimizer = RLSGD([param], lr=0.5)
    tracker = PrecisionGateTracker([("layers.0.mlp.weight", param)]).attach(optimizer)
    param.grad = torch.tensor([float("nan"), float("inf"), 1.0, 0.0], dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="2 weights became NaN/inf"):
        optimizer.step()
    assert tracker.history[-1]["nonfinite"] == 2


def test_attach_detach_and_wrappers():
    param = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    optimizer = RLSGD([param], lr=0.5)

    class Wrapper(torch.optim.Optimizer):  # shaped like accelerate's AcceleratedOptimizer
        def __init__(self, inner):
            self.optimizer = inner

    assert unwrap_optimizer(Wrapper(Wrapper(optimizer))) is optimizer
    tracker = PrecisionGateTracker([("w", param)]).attach(Wrapper(optimizer))
    assert optimizer.gate_stats_enabled
    with pytest.raises(RuntimeError, match="already attached"):
        tracker.attach(optimizer)
    param.grad = torch.ones(4, dtype=torch.bfloat16)
    optimizer.step()
    tracker.detach()
    assert not optimizer.gate_stats_enabled
    optimizer.step()
    assert len(tracker.history) == 1
    with pytest.raises(ValueError, match="no parameters"):
        PrecisionGateTracker([])
    with pytest.raises(TypeError, match="floating-point"):
        PrecisionGateTracker([("i", torch.ones(2, dtype=torch.int64))])


def test_module_kinds_of_common_architectures():
    cases = {
        "model.layers.3.self_attn.q_proj.weight": "attn_q",
        "model.layers.3.self_attn.k_proj.weight": "attn_k",
        "model.layers.3.self_attn.v_proj.weight": "attn_v",
        "model.layers.3.self_attn.o_proj.weight": "attn_o",
        "model.layers.3.mlp.down_proj.weight": "mlp",
        "transformer.h.0.mlp.c_proj.weight": "mlp",
        "transformer.h.0.attn.c_proj.weight": "attn_o",
        "transformer.h.0.attn.c_attn.weight": "attn_q",
        "model.embed_tokens.weight": "embed",
        "model.norm.weight": "norm",
        "model.layers.0.post_attention_layernorm.weight": "norm",
        "lm_head.weight": "lm_head",
        "score.weight": "other",
    }
    assert {name: module_kind(name) for name in cases} == cases


def test_tracker_warns_nothing_in_normal_use():
    param = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    optimizer = RLSGD([param], lr=0.5)
    PrecisionGateTracker([("w", param)]).attach(optimizer)
    param.grad = torch.ones(4, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()


def test_records_are_numbered_from_start_step():
    param = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    optimizer = RLSGD([param], lr=0.5)
    tracker = PrecisionGateTracker([("w", param)]).attach(optimizer, start_step=7)
    for _ in range(2):
        param.grad = torch.ones(4, dtype=torch.bfloat16)
        optimizer.step()
    assert [record["step"] for record in tracker.history] == [8, 9]


def test_changes_outside_the_step_are_detected_and_warned():
    param = nn.Parameter(torch.ones(100, dtype=torch.bfloat16))
    optimizer = RLSGD([param], lr=0.5)
    tracker = PrecisionGateTracker([("w", param)]).attach(optimizer)
    param.grad = torch.zeros(100, dtype=torch.bfloat16)
    param.grad[0] = 1.0
    optimizer.step()
    assert tracker.history[-1]["changed_outside_step"] == []
    with torch.no_grad():
        param[10:20] = 3.0  # e.g. an EMA or a load_state_dict between steps
    with pytest.warns(RuntimeWarning, match="changed outside optimizer.step") as caught:
        optimizer.step()
    assert caught[0].filename == __file__  # attributed to the caller's optimizer.step() line
    assert tracker.history[-1]["changed_outside_step"] == ["w"]
    tracker.reset_reference()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    assert tracker.history[-1]["changed_outside_step"] == []
    # mark_synced() does not hide an edit: it is still reported at the next step
    with torch.no_grad():
        param[30] = -1.0
    tracker.mark_synced()
    with pytest.warns(RuntimeWarning, match="changed outside optimizer.step"):
        optimizer.step()
    assert tracker.history[-1]["changed_outside_step"] == ["w"]


def test_outside_edit_detection_can_be_turned_off():
    param = nn.Parameter(torch.ones(100, dtype=torch.bfloat16))
    optimizer = RLSGD([param], lr=0.5)
    tracker = PrecisionGateTracker([("w", param)], detect_outside_edits=False).attach(optimizer)
    param.grad = torch.ones(100, dtype=torch.bfloat16)
    with torch.no_grad():
        param[:5] = 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    assert tracker.history[-1]["changed_outside_step"] == []


def test_checksum_is_chunked_and_equal_to_a_plain_sum(monkeypatch):
    from sparse_rl_optim.tracker import tracker as tracker_module

    bits = torch.randint(-(2**15), 2**15, (10_007,), dtype=torch.int32).to(torch.int16)
    monkeypatch.setattr(tracker_module, "_CHECKSUM_CHUNK", 1000)
    assert int(tracker_module._checksum(bits)) == int(bits.numpy().astype(np.int64).sum())


@pytest.mark.parametrize("optimizer_name", ["AdamW8bit", "AdamW", "SGD"])
def test_counts_equal_naive_diff_for_bitsandbytes_optimizers(optimizer_name):
    import bitsandbytes as bnb  # part of the test install: a missing package must fail, not skip

    torch.manual_seed(3)
    model = TinyModel(16, layers=1).to(torch.bfloat16)
    kwargs = {"lr": 0.05, "momentum": 0.9} if optimizer_name == "SGD" else {"lr": 1e-3}
    optimizer = getattr(bnb.optim, optimizer_name)(model.parameters(), **kwargs)
    tracker = PrecisionGateTracker(model).attach(optimizer)
    generator = torch.Generator().manual_seed(4)
    for _ in range(3):
        before = {name: bits_of(p) for name, p in model.named_parameters()}
        train_step(model, optimizer, generator)
        per_param = {name: int((bits_of(p) != before[name]).sum()) for name, p in model.named_parameters()}
        assert tracker.history[-1]["per_param"] == per_param
    assert tracker.history[-1]["cumulative_changed"] > 0
