"""``bench/gpu_check.py`` (what ``make gpu-check`` runs on a GPU machine) runs end to end here in
its CPU smoke mode, so the script cannot rot between the sessions that have a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
        timeout=300,
    )
    result = json.loads(out.read_text())
    expected_rows = {"copy", "rlsgd_triton", "kernel_plain", "kernel_all_writes", "kernel_counts_pack"}
    expected_rows |= {"rlsgd_triton_tracker", "dense_block_adamw_0.05", "dense_block_adamw_1"}
    assert expected_rows | {"rlsgd_torch", "sgd_fused", "adamw_fused"} == set(result["rows"])
    assert all(row["median_ms"] > 0 for row in result["rows"].values())
    counts = result["rows"]["kernel_counts_pack"]
    assert 0 < counts["changed_fraction"] < 0.2  # RL-scale gradients: few weights change
    assert counts["changed_fraction"] <= counts["active_tile_fraction"] <= 1
    assert result["rows"]["rlsgd_triton_tracker"]["tracker_snapshot_bytes"] == 0
    # Dense-block state: ~8 B per active element (0.4 B/param at density 0.05), 8 at density 1.
    assert 0.3 < result["rows"]["dense_block_adamw_0.05"]["state_bytes_per_param"] < 0.6
    assert 8.0 <= result["rows"]["dense_block_adamw_1"]["state_bytes_per_param"] < 8.5
    assert set(result["targets"]["met"]) == {
        "bandwidth_ge_85pct",
        "adamw_speedup_ge_3x",
        "counts_pack_overhead_le_10pct",
        "params_ge_1e8",
    }
