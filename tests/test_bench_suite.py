"""bench/suite.py (``make bench``): a quick run writes consistent JSON, the table and the plot; the Qwen
shape lists have the published parameter counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from shapes import FULL_PARAMS, MODELS, count_params, set_shapes  # noqa: E402

QUICK_OPTIMIZERS = [
    "adamw-foreach",
    "adamw-fused",
    "sgd-foreach",
    "bnb-adamw8bit",
    "bnb-paged-adamw8bit",
    "torchao-adamw8bit",
    "rlsgd-torch",
    "rlsgd-triton",
    "rlsgd-gate-tracking",
    "dense-block-adamw",
    "kernel-gate-counts-compaction",
]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("qwen2.5-0.5b", 494_032_768),  # published, tied embeddings
        ("qwen2.5-1.5b", 1_543_714_304),  # published, tied embeddings
        ("qwen2.5-7b", 7_615_616_512),  # published, untied lm_head
        ("qwen2.5-0.5b-attn-1layer-vocab0", 1_837_952),
        ("qwen2.5-0.5b-attn-3layers-vocab0", 5_512_064),
        ("qwen2.5-0.5b-1layer-vocab4k", 18_583_296),
        ("qwen2.5-7b-4layers", 2_022_229_504),
    ],
)
def test_shape_lists_have_the_documented_counts(name: str, expected: int) -> None:
    assert count_params(set_shapes(name)) == expected
    if name in MODELS:
        assert FULL_PARAMS[name] == expected


def test_shape_lists_are_the_qwen2_layout() -> None:
    shapes = dict(set_shapes("qwen2.5-0.5b-2layers"))
    assert shapes["model.embed_tokens.weight"] == (151936, 896)
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (896, 896)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (128, 896)  # 2 KV heads of 64
    assert shapes["model.layers.1.self_attn.v_proj.bias"] == (128,)
    assert "model.layers.1.self_attn.o_proj.bias" not in shapes
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (896, 4864)
    assert "lm_head.weight" not in shapes  # tied
    assert "model.layers.2.input_layernorm.weight" not in shapes
    assert dict(set_shapes("qwen2.5-7b-1layer"))["lm_head.weight"] == (152064, 3584)
    with pytest.raises(ValueError):
        set_shapes("llama-3-8b")


def test_quick_suite_writes_consistent_results(tmp_path: Path) -> None:
    command = [sys.executable, "bench/suite.py", "--quick", "--device", "cpu", "--out-dir", str(tmp_path)]
    command += ["--optimizers", ",".join(QUICK_OPTIMIZERS)]
    env = {**os.environ, "PYTHONSAFEPATH": "1"}  # the repository's kernels/ folder must not shadow anything
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "timing" in result.stderr  # progress lines

    data = json.loads((tmp_path / "suite.json").read_text())
    assert data["command"].startswith("python bench/suite.py --quick")
    assert data["versions"]["torch"] and "commit" in data["git"] and data["machine"]["device"] == "cpu"
    assert len(data["sets"]) == 1 and data["sets"][0]["copy_gbps"] > 0
    rows = {row["optimizer"]: row for row in data["rows"]}
    assert set(rows) == set(QUICK_OPTIMIZERS)
    for key, row in rows.items():
        assert row["status"] in ("ok", "skipped"), key
        if row["status"] == "skipped":
            assert row["reason"], key
            continue
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"], key
        assert row["ratio_vs_adamw_foreach"] == pytest.approx(row["median_ms"] / rows["adamw-foreach"]["median_ms"])
        assert row["fraction_of_copy_bandwidth"] > 0
    for key in ("adamw-foreach", "adamw-fused", "sgd-foreach", "rlsgd-torch", "rlsgd-gate-tracking"):
        assert rows[key]["status"] == "ok", rows[key]
    for key in ("rlsgd-triton", "kernel-gate-counts-compaction", "bnb-paged-adamw8bit"):
        assert rows[key]["status"] == "skipped"  # CUDA only
    assert rows["adamw-foreach"]["ratio_vs_adamw_foreach"] == pytest.approx(1.0)
    assert rows["rlsgd-torch"]["state_bytes_per_param"] == 0
    assert rows["sgd-foreach"]["state_bytes_per_param"] == 0
    assert rows["adamw-foreach"]["state_bytes_per_param"] == pytest.approx(4.0, abs=1e-3)  # bf16 moments
    assert rows["dense-block-adamw"]["state_bytes_per_param"] < 1
    tracking = rows["rlsgd-gate-tracking"]
    assert tracking["plain_rlsgd_median_ms"] > 0 and 0 < tracking["changed_fraction_per_step"] < 0.1

    table = (tmp_path / "suite.md").read_text()
    assert "| torch AdamW (foreach) |" in table and "Skipped:" in table
    assert (tmp_path / "suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
