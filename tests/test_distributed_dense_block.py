"""DenseBlockAdamW / DenseBlockSGD on 2 CPU processes (gloo) under FSDP2 and DDP, against a
single-process run computed in the workers (``tests/distributed/run_dense_block.py``, which asserts
bit-identity and writes what it found): two torchrun launches, the second resuming the first's
``torch.distributed.checkpoint``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torchrun import run_torchrun

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dense_block_distributed")


@pytest.fixture(scope="module")
def trained(workdir: Path) -> dict:
    run_torchrun("run_dense_block.py", workdir, "--scenario", "train")
    return json.loads((workdir / "train.json").read_text())


def test_fsdp2_and_ddp_equal_a_single_process_run_bit_for_bit(trained: dict) -> None:
    # The worker compared weights, active tile sets, per-rank rows, state bytes and full state
    # dicts with the single-process run (and exits non-zero on a difference).
    assert trained["failures"] == []
    runs = {tag: run for tag, run in trained.items() if isinstance(run, dict) and "counts" in run}
    # AdamW, SGD; 3 selections; bf16, fp32; rest="sgd"; density and dense_below changed mid-run; HSDP; the
    # Triton kernels
    assert len(runs) == 19
    for tag, run in runs.items():
        assert run["reselection_moved_tiles"], tag  # the runs cover reselection, not one fixed set
        # Each rank holds its share of the rows: never all of them, together exactly all of them.
        row_bytes = [rows for (rows,) in run["rows"]]
        assert sum(row_bytes) == run["ref_rows"], tag
        if run["ref_rows"]:
            assert all(rows < run["ref_rows"] for rows in row_bytes), tag
    # Selection is global: tiles are not split evenly (tensor "b": 3 + 2 rows, all 3 top tiles on rank 0).
    assert runs["cls=adamw,select=grad,dtype=bfloat16"]["counts"]["b"] == [3, 0]
    # "d" has one row: rank 1 holds no part of it, and no tiles.
    assert all(run["counts"]["d"][1] == 0 for run in runs.values())


def test_a_shard_boundary_inside_a_tile_is_refused_with_a_tile_size_that_works(trained: dict) -> None:
    message = trained["misaligned_error"]
    assert message is not None
    assert "(4, 48)" in message and "flat element 96" in message and "tile_size=64" in message
    assert "tile_size=32" in message


def test_dcp_checkpoint_resumes_in_a_new_job_bit_identically(trained: dict, workdir: Path) -> None:
    # AdamW; SGD with momentum, "off_principal" and its density changed before the save
    assert (workdir / "uninterrupted0.pt").exists() and (workdir / "uninterrupted1.pt").exists()
    run_torchrun("run_dense_block.py", workdir, "--scenario", "resume")
    resumed = json.loads((workdir / "resume.json").read_text())
    assert resumed["failures"] == []
    compared = resumed["compared_with_uninterrupted"]
    assert len(compared) == 2
    assert all(names == ["a", "b", "bias", "c", "d", "small"] for names in compared.values())
