"""Sharded delta packets on 2 processes (torchrun, gloo, CPU): FSDP2 and DDP models trained for a
few steps; each rank encodes its shards, rank 0 reassembles, and the result must equal the
single-process packet of the full weights byte for byte and bring a full replica to bit-equality
after every sync; broken sets of shard packets must be refused. The worker
(``tests/distributed/run_deltas.py``) asserts all of that and exits non-zero on a failure; this test
also checks, from what it wrote, that the run covered what it claims (deltas with changes, anchors,
every refusal case, every encoding)."""

from __future__ import annotations

import json

import pytest
from torchrun import run_torchrun

pytestmark = pytest.mark.skipif(
    not __import__("torch").distributed.is_available(), reason="torch built without distributed"
)

CASES = (
    "missing rank 1",
    "rank 0 twice",
    "rank 1 from the previous sync",
    "payload bytes flipped in transit",
    "header bytes flipped in transit",
    "payload corrupted in memory",
)


def test_shard_packets_reassemble_bit_exact_under_fsdp2_and_ddp(tmp_path):
    run_torchrun("run_deltas.py", tmp_path, timeout=240)
    report = json.loads((tmp_path / "deltas.json").read_text())
    fsdp = report["fsdp2"]
    for encoding in ("sparse", "tiles", "auto"):
        syncs = fsdp[encoding]
        assert [s["step"] for s in syncs] == list(range(7))
        assert [s["anchor"] for s in syncs] == [True, False, False, True, False, False, True]
        deltas = [s for s in syncs if not s["anchor"]]
        assert all(s["changed"] > 0 for s in deltas), encoding  # training moved weights on both ranks
        for case in CASES:
            assert f"{encoding}: {case}" in fsdp["refused"], (encoding, case)
    for sparse in (s for s in fsdp["sparse"] if not s["anchor"]):
        # What travels: the changes of each shard, compressed (a little more than the full packet's
        # changes: each rank compresses its two streams per tensor on its own, some 12 bytes of
        # framing each, for the 8 tensors on 2 ranks), far below the weights.
        assert sparse["shard_bytes"] <= sparse["full_packet_bytes"] + 8 * 2 * 2 * 12
        assert sparse["shard_bytes"] * 3 < fsdp["sparse"][0]["full_packet_bytes"]
    assert report["ddp"]["changed"][0] == 0 and all(c > 0 for c in report["ddp"]["changed"][1:])
