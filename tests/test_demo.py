"""End to end: ``python -m sparse_rl_optim.demo`` in a subprocess, tiny and offline on CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--max-operand", "19", "--warm-start-steps", "300", "--hidden-size", "32"]  # a model that is sometimes right


def run_demo(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "sparse_rl_optim.demo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def table_rows(stdout: str) -> tuple[str, list[list[str]]]:
    """The per-step table: its header line and the whitespace-split data rows under it."""
    lines = stdout.splitlines()
    header_index = next(
        i for i, line in enumerate(lines) if "reward" in line and "changed/step" in line and "swallowed" in line
    )
    assert set(lines[header_index + 1]) == {"-"}
    rows = []
    for line in lines[header_index + 2 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return lines[header_index], rows


@pytest.fixture(scope="module")
def rlsgd_demo(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path]:
    root = tmp_path_factory.mktemp("demo_rlsgd")
    output_dir = root / "out"
    result = run_demo(["--steps", "3", *TINY, "--output-dir", str(output_dir)], cwd=root)
    return result, output_dir


HEADER = ["step", "reward", "changed/step", "cumulative", "swallowed/updates", "swallowed/weights", "time"]


def test_demo_rlsgd_runs_and_prints_table_and_state_bytes(rlsgd_demo):
    result, output_dir = rlsgd_demo
    assert result.returncode == 0, result.stderr[-4000:]
    header, rows = table_rows(result.stdout)
    assert header.split() == HEADER
    assert [row[0] for row in rows] == ["1", "2", "3"]
    summary = json.loads((output_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (output_dir / "gate_history.jsonl").read_text().splitlines()]
    for row, reward, record in zip(rows, summary["rewards"], records, strict=True):
        assert len(row) == 7
        assert all(cell.endswith("%") for cell in row[2:6])  # RLSGD reports both swallowed figures
        assert row[6].endswith("s")
        assert float(row[1]) == pytest.approx(reward, abs=5e-4)  # one step per row here
        assert float(row[2].rstrip("%")) == pytest.approx(100 * record["changed"] / record["total"], abs=5e-4)
        assert record["intended"] > 0  # the tiny warm start leaves a model that is sometimes right
        assert float(row[4].rstrip("%")) == pytest.approx(100 * record["swallowed"] / record["intended"], abs=5e-4)
        assert float(row[5].rstrip("%")) == pytest.approx(100 * record["swallowed"] / record["total"], abs=5e-4)
    assert re.search(r"^optimizer state: 0 bytes \(0\.00 B/param\) vs AdamW [\d,]+ bytes", result.stdout, re.M)
    swallowed = sum(r["swallowed"] for r in records)
    of_updates = 100 * swallowed / sum(r["intended"] for r in records)
    of_weights = 100 * swallowed / sum(r["total"] for r in records)
    assert (
        f"precision gate: over the run, swallowed {of_updates:.2f}% of the non-zero updates "
        f"({of_weights:.2f}% of all weight updates, zeros included)"
    ) in result.stdout.splitlines()
    assert re.search(r"^warm start: 300 supervised steps, validation accuracy [\d.]+", result.stdout, re.M)
    assert re.search(r"^held-out accuracy \(\d+ problems never trained on\): greedy [\d.]+ -> [\d.]+, sampled", result.stdout,
                     re.M)  # fmt: skip


def test_demo_rlsgd_writes_plot_history_and_summary(rlsgd_demo):
    result, output_dir = rlsgd_demo
    assert result.returncode == 0, result.stderr[-4000:]

    png = (output_dir / "gate.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    assert len(png) > 5_000
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 2.5 * height  # the reward panel beside the two gate panels

    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["optimizer"] == "rlsgd"
    assert summary["optimizer_state_bytes"] == 0
    assert summary["adamw_state_bytes"] > 0
    # AdamW keeps two moments per weight: at least 2 bytes each for bf16 weights.
    assert summary["adamw_state_bytes"] >= 4 * summary["params"]
    assert 0.0 <= summary["swallowed_of_weights"] <= summary["swallowed_of_updates"] <= 1.0
    assert len(summary["rewards"]) == 3 and all(0.0 <= r <= 1.0 for r in summary["rewards"])
    assert summary["rounding"] == "stochastic" and summary["lr"] == 0.1  # the demo's defaults
    for key in ("greedy_accuracy_before", "greedy_accuracy_after", "sampled_accuracy_before", "sampled_accuracy_after"):
        assert 0.0 <= summary[key] <= 1.0

    lines = (output_dir / "gate_history.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3
    assert [record["step"] for record in records] == [1, 2, 3]
    for record in records:
        assert {"step", "changed", "total", "per_param"} <= record.keys()
        assert record["total"] == summary["params"]
        assert record["changed"] == sum(record["per_param"].values())
        assert 0 <= record["changed"] <= record["total"]
    assert summary["cumulative_changed_fraction"] == pytest.approx(
        records[-1]["cumulative_changed"] / summary["params"]
    )


def test_demo_adamw_reports_state_bytes_and_no_swallowed(tmp_path):
    output_dir = tmp_path / "out"
    result = run_demo(["--optimizer", "adamw", "--steps", "2", *TINY, "--output-dir", str(output_dir)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]

    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["optimizer"] == "adamw"
    assert summary["optimizer_state_bytes"] > 0
    # The measured AdamW figure is what the AdamW run actually holds.
    assert summary["optimizer_state_bytes"] == summary["adamw_state_bytes"]
    assert summary["swallowed_of_weights"] is None
    assert summary["swallowed_of_updates"] is None

    _, rows = table_rows(result.stdout)
    assert [row[0] for row in rows] == ["1", "2"]
    assert all(row[4:6] == ["n/a", "n/a"] for row in rows)
    assert "precision gate:" not in result.stdout
    assert f"optimizer state: {summary['optimizer_state_bytes']:,} bytes" in result.stdout
    assert len((output_dir / "gate_history.jsonl").read_text().splitlines()) == 2


def test_demo_dense_block_adamw_reports_its_state_breakdown(tmp_path):
    output_dir = tmp_path / "out"
    # hidden size 64: the 64x64 attention matrices are large enough to be blocked (dense_below=4096)
    args = [
        "--optimizer",
        "dense-block-adamw",
        "--steps",
        "2",
        *TINY,
        "--hidden-size",
        "64",
        "--output-dir",
        str(output_dir),
    ]
    result = run_demo(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]

    summary = json.loads((output_dir / "summary.json").read_text())
    report = summary["optimizer_state_report"]
    assert summary["optimizer"] == "dense-block-adamw"
    assert report["total"] == summary["optimizer_state_bytes"] > 0
    assert report["total"] <= report["budget"] + report["overhead"]
    assert report["blocked_numel"] > 0 and report["blocked_numel"] + report["dense_numel"] == summary["params"]
    # Moments for 5% of the blocked weights: far below AdamW's state.
    assert report["rows"] <= 0.05 * 8 * report["blocked_numel"] + 8 * 64 * 16
    assert summary["optimizer_state_bytes"] < summary["adamw_state_bytes"] / 2
    assert "dense-block state:" in result.stdout
    _, rows = table_rows(result.stdout)
    assert [row[0] for row in rows] == ["1", "2"]


def test_demo_delta_sync_and_checkpoints_for_relex(tmp_path):
    output_dir = tmp_path / "out"
    args = ["--steps", "3", *TINY, "--delta-sync", "--save-every", "1", "--output-dir", str(output_dir)]
    result = run_demo(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    delta = json.loads((output_dir / "summary.json").read_text())["delta_sync"]
    assert delta["syncs"] == 3 and delta["anchors"] == 1 and delta["deltas"] == 2
    # (a sync after a step that changed nothing ships an empty packet: a header only)
    assert all(0 <= r["packet_bytes"] < r["file_bytes"] for r in delta["records"])
    assert any(r["packet_bytes"] > 0 for r in delta["records"] if not r["anchor"])
    assert delta["delta_packet_bytes"] < delta["delta_full_bytes"]
    assert "syncs verified bit-exact on the replica" in result.stdout, result.stdout[-3000:]
    checkpoints = sorted((output_dir / "trainer").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    relex = subprocess.run(
        [str(Path(sys.executable).parent / "sparse-rl-optim-relex"), *map(str, checkpoints), "--predict-step", "6",
         "--out", str(tmp_path / "predicted.safetensors")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert relex.returncode == 0, relex.stderr[-2000:]
    assert (tmp_path / "predicted.safetensors").stat().st_size > 0


def test_demo_prints_progress_rows_while_it_trains(tmp_path):
    """The first row arrives while the process still runs (it is flushed, not buffered to the end)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    args = ["--steps", "4", *TINY, "--log-every", "2", "--output-dir", str(tmp_path / "out")]
    summary = tmp_path / "out" / "summary.json"
    still_running = summary_written = False
    with subprocess.Popen(
        [sys.executable, "-m", "sparse_rl_optim.demo", *args],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.split()[:1] == ["2"]:
                still_running, summary_written = proc.poll() is None, summary.exists()
                break
        lines += proc.stdout.readlines()
        stderr = proc.stderr.read()
        assert proc.wait(timeout=300) == 0, stderr[-4000:]
    assert still_running and not summary_written  # the row came before the end of the run
    _, rows = table_rows("".join(lines))
    assert [row[0] for row in rows] == ["2", "4"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--optimizer", "lion"], "invalid choice"),
        (["--generations", "1"], "--generations must be >= 2"),
        (["--warm-start-target", "0"], "--warm-start-target must be in (0, 1]"),
        (["--init-std", "-1"], "--init-std must be a finite number > 0"),
        (["--log-every", "0"], "--log-every must be >= 1"),
        (["--optimizer", "adamw", "--momentum", "0.9"], "--momentum"),
        (["--optimizer", "adamw", "--rounding", "nearest"], "--rounding"),
        (["--hidden-size", "30"], "--hidden-size"),
        (["--delta-sync", "--master-weights", "fp32"], "--delta-sync"),
        (["--lr", "inf"], "--lr must be a finite number > 0"),
        (["--momentum", "1"], "--momentum must be in [0, 1)"),
        (["--hidden-size", "12"], "--hidden-size must be a multiple of 8"),
        (["--optimizer", "dense-block-adamw", "--density", "2"], "--density must be in (0, 1]"),
        (["--optimizer", "dense-block-adamw", "--rest-lr", "0.1"], "--rest-lr"),
        (["--rounding", "nearest", "--master-weights", "fp32"], "--rounding"),
        (["--max-operand", "1"], "--max-operand must be >= 2"),
    ],
    ids=[
        "steps-0",
        "unknown-optimizer",
        "one-generation",
        "target-0",
        "negative-init",
        "log-every-0",
        "momentum-with-adamw",
        "rounding-with-adamw",
        "hidden-size-not-heads",
        "delta-sync-fp32",
        "lr-inf",
        "momentum-1",
        "odd-head-width",
        "density-2",
        "rest-lr-freeze",
        "rounding-fp32",
        "max-operand-1",
    ],
)
def test_demo_rejects_bad_arguments(tmp_path, args, message):
    result = run_demo([*args, "--output-dir", str(tmp_path / "out")], cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_warm_start_passed_in_gives_the_same_run_and_must_match_the_flags(tmp_path, capsys):
    """``run(warm=...)``, how the benchmarks share one warm start between optimizers, equals the run
    that makes its own warm start; a warm start made with other flags is refused."""
    from dataclasses import replace

    from sparse_rl_optim.demo import __main__ as demo
    from sparse_rl_optim.demo.task import build_tokenizer

    def args(name: str, *extra: str):
        return demo.parse_args(
            ["--steps", "2", *TINY, "--prompts-per-step", "4", *extra, "--output-dir", str(tmp_path / name)]
        )

    own = demo.run(args("own"))
    model, warm = demo.build_warm_model(args("shared"), build_tokenizer(), "cpu")
    shared = demo.run(args("shared"), warm=(model.state_dict(), warm))
    for key in ("rewards", "changed_fraction_per_step", "greedy_accuracy_before", "greedy_accuracy_after",
                "sampled_accuracy_after"):  # fmt: skip
        assert shared[key] == own[key], key
    assert 0 < own["greedy_accuracy_before"] < 1
    for other in (replace(warm, seed=1), replace(warm, max_operand=49), replace(warm, target_accuracy=0.5)):
        with pytest.raises(ValueError, match="made with"):
            demo.run(args("other"), warm=(model.state_dict(), other))
    capsys.readouterr()
