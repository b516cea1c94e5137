"""The sweep behind ``make demo``'s defaults: RLSGD's lr, rounding and momentum, and the batch.

    python bench/demo_sweep.py [--seeds 0,1,2] [--steps 150] [--workers 2] [--out-dir bench/results/demo_sweep]

Every run is the demo (``sparse-rl-optim-demo`` with the flags in the table) from the same warm start
per seed. The default is the stateless configuration (no momentum: 0 bytes of optimizer state, what
RLSGD exists for) with the highest mean sampled reward over the last quarter of the steps (the training
signal: the held-out figures it is then judged on are not used to choose); the table also marks the
best configuration overall, stateful ones included.
Writes ``demo_sweep.json`` (every run, with its reward curve), ``demo_sweep.md`` and ``demo_sweep.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ (also under PYTHONSAFEPATH=1)

from rl_runs import REPO, Arm, environment, group_runs, run_grid, stats

from sparse_rl_optim.demo.plot import rolling_mean

ARMS = (
    Arm("stochastic", "RLSGD stochastic", ("--rounding", "stochastic"), (0.03, 0.1, 0.3)),
    Arm("nearest", "RLSGD nearest", ("--rounding", "nearest"), (0.01, 0.03, 0.1, 0.3, 1.0)),
    Arm("stochastic-momentum", "RLSGD stochastic, momentum 0.9", ("--rounding", "stochastic", "--momentum", "0.9"),
        (0.01, 0.03)),
    Arm("stochastic-8-prompts", "RLSGD stochastic, 8 prompts/step", ("--rounding", "stochastic",
        "--prompts-per-step", "8"), (0.1,)),
    Arm("stochastic-16-prompts", "RLSGD stochastic, 16 prompts/step", ("--rounding", "stochastic",
        "--prompts-per-step", "16"), (0.1,)),
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results" / "demo_sweep")
    parser.add_argument("--report-only", action="store_true", help="rewrite the reports from demo_sweep.json")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    return args


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for (arm, lr), group in group_runs(runs).items():
        row = {"arm": arm, "label": group[0]["label"], "lr": lr, "seeds": [r["seed"] for r in group]}
        row["reward_first_quarter"] = stats([r["mean_reward_first_quarter"] for r in group])
        row["reward_last_quarter"] = stats([r["mean_reward_last_quarter"] for r in group])
        row["reward_gain"] = stats([r["mean_reward_last_quarter"] - r["mean_reward_first_quarter"] for r in group])
        row["greedy_gain"] = stats([r["greedy_accuracy_after"] - r["greedy_accuracy_before"] for r in group])
        row["changed_per_step"] = stats([r["mean_changed_fraction"] for r in group])
        row["seconds"] = stats([r["seconds"] for r in group])
        # What a shorter run shows, read off the same curves: quarters of the first 100 steps.
        if len(group[0]["rewards"]) >= 100:
            row["reward_gain_at_100_steps"] = stats(
                [statistics.fmean(r["rewards"][75:100]) - statistics.fmean(r["rewards"][:25]) for r in group]
            )
        rows.append(row)
    stateful = {arm.key for arm in ARMS if "--momentum" in arm.flags}
    best = max(rows, key=lambda r: r["reward_last_quarter"]["mean"])
    chosen = max((r for r in rows if r["arm"] not in stateful), key=lambda r: r["reward_last_quarter"]["mean"])
    for row in rows:
        row["stateless"] = row["arm"] not in stateful
        row["chosen"], row["best_overall"] = row is chosen, row is best
    return rows


def write_markdown(result: dict[str, Any], path: Path) -> None:
    env = result["environment"]
    lines = [
        "# Demo defaults: RLSGD sweep on the demo task",
        "",
        f"`{result['command']}`: {result['wall_seconds']:.0f} s wall on {env['cpu_count']} cores ({env['workers']} "
        f"runs at a time, {env['torch_threads_per_worker']} thread each), torch {env['torch']}, transformers "
        f"{env['transformers']}, trl {env['trl']}, commit {env['git_commit']}.",
        "",
        f"Setup: the demo's defaults but for the flags named; {result['steps']} GRPO steps, seeds "
        f"{', '.join(map(str, result['seeds']))} (one warm start per seed, shared by every row). Mean ± std over "
        "seeds. Reward: mean sampled reward of the first and the last quarter of the steps. Greedy gain: held-out "
        "greedy accuracy after minus before. ★: the demo's default, the highest reward in the last quarter among the "
        "stateless configurations (no momentum: 0 bytes of optimizer state); †: the highest overall (momentum 0.9 "
        "keeps a 4 B/param fp32 buffer).",
        "",
        "| configuration | lr | reward first q. | reward last q. | reward gain | reward gain, 100 steps "
        "| greedy gain (pp) | changed/step (%) | s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        at100 = row.get("reward_gain_at_100_steps")
        at100_cell = "" if at100 is None else f"{at100['mean']:+.3f} ± {at100['std']:.3f}"
        lines.append(
            f"| {row['label']}{' ★' if row['chosen'] else ''}{' †' if row['best_overall'] else ''} | {row['lr']:g} "
            f"| {row['reward_first_quarter']['mean']:.3f} ± {row['reward_first_quarter']['std']:.3f} "
            f"| {row['reward_last_quarter']['mean']:.3f} ± {row['reward_last_quarter']['std']:.3f} "
            f"| {row['reward_gain']['mean']:+.3f} ± {row['reward_gain']['std']:.3f} "
            f"| {at100_cell} "
            f"| {100 * row['greedy_gain']['mean']:+.1f} ± {100 * row['greedy_gain']['std']:.1f} "
            f"| {100 * row['changed_per_step']['mean']:.1f} | {row['seconds']['mean']:.0f} |"
        )
    chosen = next(row for row in result["summary"] if row["chosen"])
    best = next(row for row in result["summary"] if row["best_overall"])
    if best is not chosen:
        groups = group_runs(result["runs"])
        mine = {r["seed"]: r for r in groups[(best["arm"], best["lr"])]}
        default = {r["seed"]: r for r in groups[(chosen["arm"], chosen["lr"])]}
        for figure, name, scale, unit in (
            ("mean_reward_last_quarter", "reward in the last quarter", 1.0, ""),
            ("greedy_gain", "greedy gain", 100.0, " pp"),
        ):

            def value(run: dict[str, Any], figure: str = figure) -> float:
                if figure == "greedy_gain":
                    return run["greedy_accuracy_after"] - run["greedy_accuracy_before"]
                return run[figure]

            d = stats([value(mine[seed]) - value(default[seed]) for seed in sorted(mine)])
            interval = (
                ""
                if d["ci95_low"] is None
                else (f", 95% CI [{scale * d['ci95_low']:+.3g}, {scale * d['ci95_high']:+.3g}]")
            )
            lines.append(
                f"{'' if name.startswith('greedy') else chr(10)}- {best['label']} lr {best['lr']:g} minus the default, "
                f"{name}, paired by seed: {scale * d['mean']:+.3g}{unit}{interval}."
            )
    lines += ["", "![reward curves](demo_sweep.png)", ""]
    path.write_text("\n".join(lines))


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 5))
    for (_, lr), group in group_runs(result["runs"]).items():
        curves = [rolling_mean(r["rewards"], 10) for r in group]
        mean = [statistics.fmean(column) for column in zip(*curves, strict=True)]
        axis.plot(range(1, len(mean) + 1), mean, label=f"{group[0]['label']}, lr {lr:g}")
    axis.set_xlabel("GRPO step")
    axis.set_ylabel("sampled reward (10-step rolling mean, mean over seeds)")
    axis.grid(alpha=0.3)
    figure.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report_only:
        result = json.loads((args.out_dir / "demo_sweep.json").read_text())
        result["summary"] = summarize(result["runs"])
        write_reports(result, args.out_dir)
        return
    started = time.perf_counter()
    runs = run_grid(ARMS, args.seeds, ["--steps", str(args.steps)], workers=args.workers)
    result = {
        "command": "python bench/demo_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(args.workers, 1),
        "steps": args.steps,
        "seeds": args.seeds,
        "wall_seconds": time.perf_counter() - started,
        "summary": summarize(runs),
        "runs": runs,
    }
    write_reports(result, args.out_dir)


def write_reports(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo_sweep.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out_dir / "demo_sweep.md")
    write_plot(result, out_dir / "demo_sweep.png")
    print((out_dir / "demo_sweep.md").read_text())


if __name__ == "__main__":
    main()
