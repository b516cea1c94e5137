"""RLSGD on shards (FSDP2) and replicas (DDP).

Single process: a tensor stepped shard by shard, each shard with its ``element_offsets``, equals the
whole tensor stepped at once, bit for bit, on every path (the stochastic-rounding stream is indexed
by global element). Under ``torchrun --nproc_per_node 2`` (gloo, CPU): see
``tests/distributed/run_rlsgd.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrun import run_torchrun

from sparse_rl_optim.optim.sgd import rlsgd


def _row_chunks(rows: int, world: int) -> list[tuple[int, int]]:
    """FSDP2's dim-0 split: chunks of ceil(rows / world) rows, the last ones shorter or empty."""
    chunk = math.ceil(rows / world)
    return [(min(rank * chunk, rows), min((rank + 1) * chunk, rows)) for rank in range(world)]


def _step_whole_and_sharded(shape, dtype, world, steps, path, momentum, seed):
    generator = torch.Generator().manual_seed(seed)
    whole = (torch.randn(shape, generator=generator) * 2).to(dtype)
    grads = [(torch.randn(shape, generator=generator) * 0.05).to(dtype) for _ in range(steps)]
    options = dict(lr=0.1, momentum=momentum, rounding="stochastic", weight_decay=0.01, **path)
    chunks = _row_chunks(shape[0], world)
    inner = math.prod(shape[1:])
    shards = [whole[start:stop].clone() for start, stop in chunks]
    whole_buffer: list = [None]
    shard_buffers: list = [[None] for _ in chunks]
    for step in range(steps):
        torch.manual_seed(100 + step)
        rlsgd([whole], [grads[step]], whole_buffer, **options)
        for rank, (start, stop) in enumerate(chunks):
            torch.manual_seed(100 + step)  # every rank draws the same step seed
            rlsgd(
                [shards[rank]],
                [grads[step][start:stop].clone()],
                shard_buffers[rank],
                element_offsets=[start * inner],
                **options,
            )
    return whole, torch.cat(shards)


PATHS = {
    "reference": dict(foreach=False, backend="torch"),
    "foreach": dict(foreach=True, backend="torch"),
    "triton": dict(backend="triton"),
}


@settings(max_examples=15)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 70),
    world=st.integers(2, 3),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    path=st.sampled_from(sorted(PATHS)),
    momentum=st.sampled_from([0.0, 0.9]),
    seed=st.integers(0, 2**16),
)
def test_shards_with_element_offsets_equal_the_whole_tensor(rows, cols, world, dtype, path, momentum, seed):
    whole, sharded = _step_whole_and_sharded((rows, cols), dtype, world, 3, PATHS[path], momentum, seed)
    assert torch.equal(whole.view(torch.int16), sharded.view(torch.int16))


def test_shards_without_offsets_would_differ():
    """The check above can fail: without offsets every shard reuses the first elements' random bits."""
    generator = torch.Generator().manual_seed(0)
    whole = torch.randn(8, 64, generator=generator).to(torch.bfloat16)
    grad = (torch.randn(8, 64, generator=generator) * 0.05).to(torch.bfloat16)
    torch.manual_seed(1)
    expected = whole.clone()
    rlsgd([expected], [grad], [None], lr=0.1, rounding="stochastic")
    torch.manual_seed(1)
    second_half = whole[4:].clone()
    rlsgd([second_half], [grad[4:].clone()], [None], lr=0.1, rounding="stochastic")
    assert not torch.equal(second_half, expected[4:])


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_fused_path_with_element_offsets_equals_the_whole_tensor():
    whole, sharded = _step_whole_and_sharded((6, 48), torch.bfloat16, 2, 2, dict(fused=True), 0.9, 3)
    assert torch.equal(whole.view(torch.int16), sharded.view(torch.int16))


def test_rlsgd_under_fsdp2_and_ddp_equals_single_process_and_resumes_from_dcp(tmp_path):
    """Two torchrun jobs: training (same gradients: bit-identical; real data parallelism: within the
    stated tolerance; a DCP checkpoint mid-run), then a fresh job resuming from the checkpoint."""
    run_torchrun("run_rlsgd.py", tmp_path, "--scenario", "train")
    train = json.loads((tmp_path / "rlsgd_train.json").read_text())
    assert set(train["explicit"]) == {"nearest", "stochastic_momentum", "stochastic_reference", "triton_stochastic"}
    assert all(entry["changed_elements"] > 0 for entry in train["explicit"].values())
    for label, entry in train["real"].items():
        limit = 1e-4 if label.endswith("float32") else 0.1
        assert 0 < entry["moved_by_training"] and entry["relative"] <= limit, (label, entry)
    run_torchrun("run_rlsgd.py", tmp_path, "--scenario", "resume")
    assert json.loads((tmp_path / "rlsgd_resume.json").read_text()) == {"resumed_equal": True}
