"""``python bench/rl_quality.py --quick`` in a subprocess: JSON, Markdown table and PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OPTIMIZERS = ("rlsgd", "adamw", "dense-block-adamw")
LABELS = ("RLSGD", "AdamW (torch)", "DenseBlockAdamW")


def test_rl_quality_quick(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "bench/rl_quality.py", "--quick", "--out-dir", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[3/3]" in proc.stderr

    result = json.loads((tmp_path / "rl_quality.json").read_text())
    assert result["config"]["quick"] is True
    assert result["config"]["steps"] == 5
    assert result["environment"]["torch"]
    assert result["command"].startswith("python bench/rl_quality.py")
    assert sorted(run["optimizer"] for run in result["runs"]) == sorted(OPTIMIZERS)
    assert sorted(row["optimizer"] for row in result["summary"]) == sorted(OPTIMIZERS)
    for run in result["runs"]:
        assert 0.0 <= run["greedy_accuracy_before"] <= 1.0
        assert 0.0 <= run["greedy_accuracy_after"] <= 1.0
        assert len(run["reward_curve"]) == 5
        assert all(0.0 <= r <= 1.0 for r in run["reward_curve"])
        assert len(run["changed_fraction_curve"]) == 5
        assert all(0.0 <= c <= 1.0 for c in run["changed_fraction_curve"])
        assert run["state_bytes_per_param"] >= 0.0
    for row in result["summary"]:
        assert row["greedy_accuracy_after"]["n"] == 1
        assert row["greedy_accuracy_after"]["std"] == 0.0
        assert row["best_lr"] is True

    markdown = (tmp_path / "rl_quality.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| optimizer | lr | accuracy before")
    rows = table[1:]
    assert len(rows) == 3
    for label, row in zip(LABELS, rows, strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[0] == label
        assert len(cells) == 11
        assert "±" in cells[2] and "±" in cells[3]
    assert "rl_quality.png" in markdown

    assert (tmp_path / "rl_quality.png").read_bytes()[:8] == PNG_MAGIC
