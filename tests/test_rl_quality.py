"""``python bench/rl_quality.py --quick`` in a subprocess: every figure recomputed from the runs it
recorded, the statistics against the formulas written out, and the report files."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ARMS = ("adamw", "rlsgd-nearest", "rlsgd-stochastic", "sgd-momentum-fp32", "dense-block-adamw")
LABELS = ("AdamW (torch)", "RLSGD nearest", "RLSGD stochastic", "SGD momentum 0.9, fp32 master", "DenseBlockAdamW 5%")

sys.path.insert(0, str(REPO / "bench"))
from rl_runs import stats, t95  # noqa: E402


def _t_cdf(x: float, df: int, intervals: int = 20_000) -> float:
    """Student's t CDF by Simpson's rule on the density (the reference for the tabulated values)."""
    norm = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    h = x / intervals
    density = [norm * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(intervals + 1)]
    area = h / 3 * (density[0] + density[-1] + 4 * sum(density[1:-1:2]) + 2 * sum(density[2:-1:2]))
    return 0.5 + area


@pytest.mark.parametrize("df", [1, 2, 4, 9, 14, 29])
def test_t95_is_the_two_sided_95_percent_point(df):
    assert _t_cdf(t95(df), df) == pytest.approx(0.975, abs=5e-4)


def test_stats_match_the_written_out_formulas():
    values = [0.12, 0.31, 0.18, 0.25, 0.09]
    s = stats(values)
    mean = sum(values) / 5
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    assert s["mean"] == pytest.approx(mean) and s["std"] == pytest.approx(std)
    assert s["se"] == pytest.approx(std / math.sqrt(5))
    assert s["ci95_low"] == pytest.approx(mean - 2.776 * std / math.sqrt(5), abs=1e-4)
    assert s["ci95_high"] == pytest.approx(mean + 2.776 * std / math.sqrt(5), abs=1e-4)
    assert (s["min"], s["max"], s["n"]) == (0.09, 0.31, 5)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl_quality")
    env = {**os.environ, "PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "bench/rl_quality.py", "--quick", "--out-dir", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, out, json.loads((out / "rl_quality.json").read_text())


def test_quick_runs_every_arm_on_every_seed_from_one_warm_start(quick):
    proc, _, result = quick
    assert "[10/10]" in proc.stderr
    assert result["config"]["quick"] is True and result["config"]["steps"] == 4
    assert result["command"].startswith("python bench/rl_quality.py")
    assert result["environment"]["torch"] and result["environment"]["workers"] == 2
    runs = result["runs"]
    assert sorted({r["arm"] for r in runs}) == sorted(ARMS)
    assert sorted(r["seed"] for r in runs) == [0] * 5 + [1] * 5
    for seed in (0, 1):
        mine = [r for r in runs if r["seed"] == seed]
        # One warm start per seed: the same weights before RL (the fp32-master arm holds the same bf16 values).
        assert (
            len({(r["warm_start_steps"], r["greedy_accuracy_before"], r["sampled_accuracy_before"]) for r in mine}) == 1
        )
    for run in runs:
        assert len(run["rewards"]) == 4 and all(0.0 <= r <= 1.0 for r in run["rewards"])
        assert len(run["changed_fraction_per_step"]) == 4
        assert run["mean_changed_fraction"] == pytest.approx(statistics.fmean(run["changed_fraction_per_step"]))
        assert run["mean_reward_first_quarter"] == pytest.approx(run["rewards"][0])
        assert run["mean_reward_last_quarter"] == pytest.approx(run["rewards"][-1])
    by_arm = {r["arm"]: r for r in runs if r["seed"] == 0}
    assert by_arm["rlsgd-stochastic"]["optimizer_state_bytes"] == 0
    assert by_arm["rlsgd-nearest"]["optimizer_state_bytes"] == 0
    assert by_arm["adamw"]["optimizer_state_bytes"] == by_arm["adamw"]["adamw_state_bytes"]
    assert by_arm["sgd-momentum-fp32"]["optimizer_state_bytes"] == 4 * by_arm["sgd-momentum-fp32"]["params"]


def test_quick_summary_and_verdicts_follow_from_the_runs(quick):
    _, _, result = quick
    runs = result["runs"]
    assert sorted(row["arm"] for row in result["summary"]) == sorted(ARMS)
    for row in result["summary"]:
        group = sorted((r for r in runs if r["arm"] == row["arm"] and r["lr"] == row["lr"]), key=lambda r: r["seed"])
        gains = [r["greedy_accuracy_after"] - r["greedy_accuracy_before"] for r in group]
        assert row["greedy_gain"]["mean"] == pytest.approx(statistics.fmean(gains))
        assert row["greedy_gain"]["std"] == pytest.approx(statistics.stdev(gains))
        assert row["best_lr"] is True  # one lr per arm in --quick
    adamw = next(v for v in result["verdicts"] if v["arm"] == "adamw")["greedy_gain"]
    for verdict in result["verdicts"]:
        gain = verdict["greedy_gain"]
        assert verdict["learns"] == (gain["mean"] > 0 and gain["mean"] >= 3 * gain["se"])
        if verdict["arm"] != "adamw":
            assert verdict["within_adamw_interval"] == (adamw["ci95_low"] <= gain["mean"] <= adamw["ci95_high"])
            mine = {r["seed"]: r for r in runs if r["arm"] == verdict["arm"]}
            theirs = {r["seed"]: r for r in runs if r["arm"] == "adamw"}
            differences = [
                (mine[s]["greedy_accuracy_after"] - mine[s]["greedy_accuracy_before"])
                - (theirs[s]["greedy_accuracy_after"] - theirs[s]["greedy_accuracy_before"])
                for s in (0, 1)
            ]
            difference = verdict["paired_difference_to_adamw"]
            assert difference["mean"] == pytest.approx(statistics.fmean(differences))
            half = 12.706 * statistics.stdev(differences) / math.sqrt(2)  # t(0.975, df=1)
            low, high = statistics.fmean(differences) - half, statistics.fmean(differences) + half
            assert (difference["ci95_low"], difference["ci95_high"]) == (pytest.approx(low), pytest.approx(high))
            expected = "better than AdamW" if low > 0 else "worse than AdamW" if high < 0 else "matches AdamW"
            assert verdict["against_adamw"].startswith(expected)


def test_quick_writes_the_markdown_table_verdicts_and_plot(quick):
    _, out, result = quick
    markdown = (out / "rl_quality.md").read_text()
    verdict_lines = [line for line in markdown.splitlines() if line.startswith("- **")]
    assert [line.split("**")[1] for line in verdict_lines] == list(LABELS)
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| optimizer | lr | greedy before")
    assert len(table) - 1 == len(result["summary"]) == 5
    for label, row in zip(LABELS, table[1:], strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[0].removesuffix(" ★") == label and len(cells) == 12
        assert cells[10] == ("4" if label.endswith("fp32 master") else "2")  # weights B/param
    assert "spread" in markdown and "rl_quality.png" in markdown
    assert (out / "rl_quality.png").read_bytes()[:8] == PNG_MAGIC


def _run(arm: str, seed: int, gain: float, *, before: float = 0.3, lr: float = 1.0, reward: float = 0.5) -> dict:
    """One run record with the figures ``summarize`` reads; the held-out gain is ``gain``."""
    return {
        "arm": arm, "label": arm, "lr": lr, "seed": seed, "params": 100, "optimizer_state_bytes": 0,
        "weight_bytes": 200, "greedy_accuracy_before": before, "greedy_accuracy_after": before + gain,
        "sampled_accuracy_before": 0.2, "sampled_accuracy_after": 0.2 + gain / 2,
        "mean_reward_first_quarter": 0.3, "mean_reward_last_quarter": reward,
        "mean_changed_fraction": 0.1, "cumulative_changed_fraction": 0.5, "seconds": 1.0,
    }  # fmt: skip


def test_verdicts_on_runs_with_known_outcomes():
    """Five seeds with chosen gains: the verdicts that follow from them, worked out by hand."""
    import rl_quality

    adamw = [0.20, 0.22, 0.18, 0.21, 0.19]  # mean 0.20
    arms = {
        "better": [g + d for g, d in zip(adamw, [0.05, 0.06, 0.04, 0.05, 0.05], strict=True)],  # +0.05 each seed
        "worse": [g - d for g, d in zip(adamw, [0.05, 0.06, 0.04, 0.05, 0.05], strict=True)],
        "same": [g + d for g, d in zip(adamw, [0.02, -0.02, 0.01, -0.01, 0.0], strict=True)],  # differences mean 0
        "flat": [0.01, -0.02, 0.0, 0.02, -0.01],  # gain mean 0: does not learn
    }
    runs = [_run("adamw", seed, gain) for seed, gain in enumerate(adamw)]
    # A second lr of AdamW with a lower training reward: not its best lr, so not the baseline.
    runs += [_run("adamw", seed, 0.5, lr=2.0, reward=0.1) for seed in range(5)]
    for arm, gains in arms.items():
        runs += [_run(arm, seed, gain) for seed, gain in enumerate(gains)]
    verdicts = {v["arm"]: v for v in rl_quality.verdicts(rl_quality.summarize(runs), runs)}
    assert verdicts["adamw"]["lr"] == 1.0 and verdicts["adamw"]["learns"]
    assert verdicts["better"]["against_adamw"] == "better than AdamW"
    assert verdicts["worse"]["against_adamw"] == "worse than AdamW"
    assert verdicts["same"]["against_adamw"].startswith("matches AdamW")
    assert verdicts["same"]["paired_difference_to_adamw"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert not verdicts["flat"]["learns"] and verdicts["flat"]["greedy_gain"]["mean"] == pytest.approx(0.0, abs=1e-12)
    # AdamW's own interval: 0.20 ± 2.776 * 0.0158 / sqrt(5) = [0.180, 0.220]; 0.25 and 0.15 lie outside.
    assert verdicts["same"]["within_adamw_interval"] and not verdicts["better"]["within_adamw_interval"]
    line = rl_quality._verdict_line(verdicts["worse"])
    assert "**worse than AdamW**: paired difference to AdamW -5.0 pp" in line
    assert "its mean is outside AdamW's 95% interval" in line
