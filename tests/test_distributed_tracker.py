"""PrecisionGateTracker under FSDP2 (``fully_shard``) and DDP on 2 CPU processes (gloo).

One ``torchrun`` launch of ``tests/distributed/run_tracker.py``; the worker checks, on every rank
and every step, that the records of a tracker over a sharded (or replicated) model equal those of a
tracker over a plain copy stepped with the same gradients in the same process, that the plain ones
equal a naive bitwise diff, and that a step costs exactly one all-reduce where params are DTensors
(none under DDP). This test reads back what rank 0 wrote and checks the run was not vacuous.
"""

from __future__ import annotations

import json

import pytest
from torchrun import run_torchrun

SCENARIOS = ("fsdp2_sgd", "ddp_sgd", "fsdp2_rlsgd", "fsdp2_rlsgd_triton")
STEPS = 4


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracker")
    run_torchrun("run_tracker.py", out, timeout=240)
    return json.loads((out / "tracker.json").read_text())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_global_records_equal_single_process(results, scenario):
    run = results[scenario]
    history, plain = run["history"], run["plain_history"]
    assert len(history) == len(plain) == STEPS
    assert history == plain
    assert all(r["total"] == 499 for r in history)  # the full model's elements, on every rank
    assert all(0 < r["changed"] < r["total"] for r in history)
    assert history[2]["changed_outside_step"] == ["layers.1.mlp.up_proj.weight"]  # edited on rank 1 only
    assert [r["nonfinite"] for r in history] == [0, 0, 0, 1]  # became inf on rank 1's shard
    assert run["shipped"] == [history[1]["changed_since_sync"]] and run["shipped"][0] > 0
    if "rlsgd" in scenario:
        assert all(0 < r["swallowed"] < r["intended"] for r in history)
    else:
        assert all(r["intended"] is None and r["swallowed"] is None for r in history)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_one_all_reduce_per_step_where_sharded(results, scenario):
    want = 0 if scenario.startswith("ddp") else 1
    assert results[scenario]["all_reduces"] == {
        "step": [want] * STEPS,
        "plain_step": [0] * STEPS,
        "mark_synced": [want],
        "changed_since_sync": [want],
    }


def test_memory_is_per_rank_and_the_kernel_fed_path_takes_no_snapshot(results):
    for scenario in ("fsdp2_sgd", "fsdp2_rlsgd"):
        memory, plain = results[scenario]["memory"], results[scenario]["plain_memory"]
        assert 0 < memory["step_snapshot_bytes"] < plain["step_snapshot_bytes"]  # rank 0's shards only
        assert memory["step_snapshot_bytes_per_param"] == plain["step_snapshot_bytes_per_param"] == 2.0
    assert results["ddp_sgd"]["memory"] == results["ddp_sgd"]["plain_memory"]
    assert results["fsdp2_rlsgd_triton"]["memory"]["step_snapshot_bytes"] == 0
