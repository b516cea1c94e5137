"""Does RLSGD match AdamW here? GRPO on the demo task with five optimizers, an lr sweep, several seeds.

    python bench/rl_quality.py [--seeds 0,1,2,3,4] [--steps 150] [--arms adamw,rlsgd-nearest,...]
                               [--workers 2] [--quick] [--out-dir bench/results/rl_quality]

Every run is the demo (``sparse-rl-optim-demo``; task and setup in ``docs/rl_task.md``) from the warm
start of its seed, shared by every optimizer and lr. Per run: held-out accuracy before and after RL
(greedy, and sampled at the training temperature), the sampled reward per step, the fraction of bf16
weights changed per step and over the run, and the optimizer state bytes. Per optimizer the best lr is
the one with the highest training reward over the last quarter (the held-out figures are not used to
choose); for it, the gain's mean, std and 95% t interval over seeds, and a verdict: is the gain
distinguishable from 0 (at least 3 standard errors), and is it within AdamW's 95% interval (with the
paired difference to AdamW, seed by seed). Writes ``rl_quality.json``, ``rl_quality.md`` and
``rl_quality.png``. ``--quick`` (for the tests): 2 seeds, one lr each, 4 steps of 4 prompts, tiny model.
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

from sparse_rl_optim.demo import __main__ as demo
from sparse_rl_optim.demo.evaluate import SAMPLES_PER_PROMPT
from sparse_rl_optim.demo.plot import rolling_mean

ARMS = {
    arm.key: arm
    for arm in (
        Arm("adamw", "AdamW (torch)", ("--optimizer", "adamw"), (1e-4, 3e-4, 1e-3)),
        Arm("rlsgd-nearest", "RLSGD nearest", ("--optimizer", "rlsgd", "--rounding", "nearest"), (0.03, 0.1, 0.3)),
        Arm(
            "rlsgd-stochastic",
            "RLSGD stochastic",
            ("--optimizer", "rlsgd", "--rounding", "stochastic"),
            (0.03, 0.1, 0.3),
        ),
        Arm(
            "sgd-momentum-fp32",
            "SGD momentum 0.9, fp32 master",
            ("--optimizer", "sgd", "--momentum", "0.9", "--master-weights", "fp32"),
            (5e-3, 1e-2, 2e-2),
        ),
        Arm(
            "dense-block-adamw",
            "DenseBlockAdamW 5%",
            ("--optimizer", "dense-block-adamw", "--density", "0.05"),
            (1e-3, 3e-3, 1e-2),
        ),
    )
}
BASELINE = "adamw"
QUICK_FLAGS = ("--max-operand", "19", "--warm-start-steps", "300", "--hidden-size", "32", "--prompts-per-step", "4")
LEARNS_AT_SE = 3.0  # a gain is "distinguishable from 0" when its mean is at least this many standard errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="GRPO steps per run")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {list(ARMS)}")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (1 torch thread each)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 1 lr, 4 steps, tiny model")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results" / "rl_quality")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the .md and .png from the .json in --out-dir; run nothing"
    )
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    keys = [key.strip() for key in args.arms.split(",") if key.strip()]
    unknown = [key for key in keys if key not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    args.arms = [ARMS[key] for key in keys]
    args.common_flags = ["--steps", str(args.steps)]
    if args.quick:
        args.seeds = args.seeds[:2]
        args.steps = 4
        args.common_flags = ["--steps", "4", *QUICK_FLAGS]
        args.arms = [Arm(a.key, a.label, a.flags, a.lrs[len(a.lrs) // 2 : len(a.lrs) // 2 + 1]) for a in args.arms]
    return args


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (arm, lr): statistics over seeds of every figure; the best lr of each arm marked."""
    rows = []
    for (arm, lr), group in group_runs(runs).items():
        row: dict[str, Any] = {"arm": arm, "label": group[0]["label"], "lr": lr, "seeds": [r["seed"] for r in group]}
        for key in (
            "greedy_accuracy_before",
            "greedy_accuracy_after",
            "sampled_accuracy_before",
            "sampled_accuracy_after",
            "mean_reward_first_quarter",
            "mean_reward_last_quarter",
            "mean_changed_fraction",
            "cumulative_changed_fraction",
            "seconds",
        ):
            row[key] = stats([r[key] for r in group])
        row["greedy_gain"] = stats([r["greedy_accuracy_after"] - r["greedy_accuracy_before"] for r in group])
        row["sampled_gain"] = stats([r["sampled_accuracy_after"] - r["sampled_accuracy_before"] for r in group])
        row["state_bytes_per_param"] = statistics.fmean(r["optimizer_state_bytes"] / r["params"] for r in group)
        row["weight_bytes_per_param"] = statistics.fmean(r["weight_bytes"] / r["params"] for r in group)
        rows.append(row)
    for arm in dict.fromkeys(row["arm"] for row in rows):
        mine = [row for row in rows if row["arm"] == arm]
        best = max(mine, key=lambda row: row["mean_reward_last_quarter"]["mean"])
        for row in mine:
            row["best_lr"] = row is best
    return rows


def verdicts(summary: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm at its best lr: does it learn, and how does it compare with AdamW's best lr."""
    best = {row["arm"]: row for row in summary if row["best_lr"]}
    baseline = best.get(BASELINE)
    groups = group_runs(runs)
    out = []
    for arm, row in best.items():
        gain = row["greedy_gain"]
        verdict: dict[str, Any] = {
            "arm": arm,
            "label": row["label"],
            "lr": row["lr"],
            "greedy_gain": gain,
            "sampled_gain": row["sampled_gain"],
            "greedy_gain_in_se": _in_standard_errors(gain),
        }
        verdict["learns"] = gain["n"] > 1 and gain["mean"] > 0 and gain["mean"] >= LEARNS_AT_SE * gain["se"]
        if baseline is not None:
            low, high = baseline["greedy_gain"]["ci95_low"], baseline["greedy_gain"]["ci95_high"]
            verdict["within_adamw_interval"] = None if low is None else bool(low <= gain["mean"] <= high)
            mine = {r["seed"]: r for r in groups[(arm, row["lr"])]}
            theirs = {r["seed"]: r for r in groups[(BASELINE, baseline["lr"])]}
            seeds = sorted(mine.keys() & theirs.keys())
            differences = [
                (mine[s]["greedy_accuracy_after"] - mine[s]["greedy_accuracy_before"])
                - (theirs[s]["greedy_accuracy_after"] - theirs[s]["greedy_accuracy_before"])
                for s in seeds
            ]
            verdict["paired_difference_to_adamw"] = stats(differences) if len(differences) > 1 else None
            verdict["against_adamw"] = _against_adamw(verdict["paired_difference_to_adamw"])
            for key, figure in (("per_step", "mean_changed_fraction"), ("total", "cumulative_changed_fraction")):
                mine_changed = row[figure]["mean"]
                verdict[f"changed_{key}_adamw_over_this"] = (
                    baseline[figure]["mean"] / mine_changed if mine_changed > 0 else None
                )
        out.append(verdict)
    return out


def _in_standard_errors(s: dict[str, float]) -> float | None:
    """How many standard errors the mean lies from 0 (``None`` without a spread)."""
    return s["mean"] / s["se"] if s["se"] > 0 else None


def _against_adamw(difference: dict[str, float] | None) -> str:
    """The paired difference's verdict: its 95% interval above 0, below 0, or around it."""
    if difference is None or difference["ci95_low"] is None:
        return "not comparable (one seed)"
    if difference["ci95_low"] > 0:
        return "better than AdamW"
    if difference["ci95_high"] < 0:
        return "worse than AdamW"
    return "matches AdamW (the paired difference's 95% interval includes 0)"


def _ratio(value: float | None) -> str:
    return "n/a (this optimizer changed no weight)" if value is None else f"{value:.2g}x"


def _pm(s: dict[str, float], scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def _ci(s: dict[str, float], scale: float = 100.0) -> str:
    if s["ci95_low"] is None:
        return "[n/a]"
    return f"[{scale * s['ci95_low']:+.1f}, {scale * s['ci95_high']:+.1f}]"


def _verdict_line(v: dict[str, Any]) -> str:
    gain = v["greedy_gain"]
    parts = [
        f"**{v['label']}** (lr {v['lr']:g}): greedy gain {100 * gain['mean']:+.1f} pp, 95% CI {_ci(gain)}, "
        + ("no spread over seeds" if v["greedy_gain_in_se"] is None else f"{v['greedy_gain_in_se']:.1f} SE from 0")
        + ": "
        + ("learns (distinguishable from 0)" if v["learns"] else "**not distinguishable from 0**")
    ]
    if v["arm"] != BASELINE and "within_adamw_interval" in v:
        diff = v["paired_difference_to_adamw"]
        if diff is not None:
            parts.append(
                f"**{v['against_adamw']}**: paired difference to AdamW {100 * diff['mean']:+.1f} pp, 95% CI {_ci(diff)}"
            )
        if v["within_adamw_interval"] is not None:
            parts.append(f"its mean is {'inside' if v['within_adamw_interval'] else 'outside'} AdamW's 95% interval")
        parts.append(
            f"AdamW changes {_ratio(v['changed_per_step_adamw_over_this'])} as many bf16 weights per step and "
            f"{_ratio(v['changed_total_adamw_over_this'])} as many over the run"
        )
    return "- " + "; ".join(parts) + "."


def write_markdown(result: dict[str, Any], path: Path) -> None:
    env, config = result["environment"], result["config"]
    before = [r["greedy_accuracy_before"] for r in result["runs"] if r["arm"] == result["runs"][0]["arm"]]
    warm = {r["seed"]: r for r in result["runs"]}
    spread = 100 * (max(before) - min(before))
    lines = [
        "# RL quality: does RLSGD match AdamW on the demo task?",
        "",
        f"`{result['command']}`: {result['wall_seconds']:.0f} s wall on {env['machine']} ({env['cpu_count']} cores, "
        f"{env['workers']} runs at a time, {env['torch_threads_per_worker']} thread each, {env['device']}), torch "
        f"{env['torch']}, transformers {env['transformers']}, trl {env['trl']}, commit {env['git_commit']}.",
        "",
        f"Setup: the demo (`sparse-rl-optim-demo {' '.join(config['common_flags'])}`, task in "
        f"[docs/rl_task.md](../../../docs/rl_task.md)): a {result['runs'][0]['params']:,}-param Llama warm-started "
        f"until it solves {100 * config['warm_start_target']:g}% of the validation problems, then "
        f"{config['steps']} GRPO steps (TRL, beta 0, constant lr, {config['prompts_per_step']} prompts x "
        f"{config['generations']} completions per step, temperature {config['temperature']:g}). Seeds "
        f"{', '.join(map(str, config['seeds']))}; each seed's warm start is shared by every optimizer and lr. "
        f"Warm-start held-out greedy accuracy per seed: "
        + ", ".join(f"{100 * warm[s]['greedy_accuracy_before']:.1f}%" for s in sorted(warm))
        + f" (spread {spread:.1f} points).",
        "",
        f"Accuracy on the {result['runs'][0]['held_out_prompts']} held-out problems (never trained on): greedy, "
        f"and sampled at temperature {config['temperature']:g} "
        f"({SAMPLES_PER_PROMPT} samples per problem), before → after RL. Mean ± std over seeds; gain with its 95% t interval. "
        "Changed: bf16 weights changed per step (mean) and differing from the start of RL at the end. "
        "★: the lr with the highest training reward in the last quarter (chosen without the held-out figures).",
        "",
        "## Verdicts (best lr per optimizer)",
        "",
        *[_verdict_line(v) for v in result["verdicts"]],
        "",
        "## Every run",
        "",
        "| optimizer | lr | greedy before → after (%) | greedy gain (pp), 95% CI | sampled before → after (%) "
        "| sampled gain (pp) | reward first → last q. | changed/step (%) | changed total (%) | state B/param "
        "| weights B/param | s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        lines.append(
            f"| {row['label']}{' ★' if row['best_lr'] else ''} | {row['lr']:g} "
            f"| {_pm(row['greedy_accuracy_before'])} → {_pm(row['greedy_accuracy_after'])} "
            f"| {_pm(row['greedy_gain'])} {_ci(row['greedy_gain'])} "
            f"| {_pm(row['sampled_accuracy_before'])} → {_pm(row['sampled_accuracy_after'])} "
            f"| {_pm(row['sampled_gain'])} {_ci(row['sampled_gain'])} "
            f"| {row['mean_reward_first_quarter']['mean']:.3f} → {row['mean_reward_last_quarter']['mean']:.3f} "
            f"| {_pm(row['mean_changed_fraction'], 100, 2)} | {_pm(row['cumulative_changed_fraction'])} "
            f"| {row['state_bytes_per_param']:.2f} | {row['weight_bytes_per_param']:.0f} "
            f"| {row['seconds']['mean']:.0f} |"
        )
    lines += [
        "",
        f"n = {len(config['seeds'])} seeds per row. The 95% interval is mean ± t(n-1) x std/sqrt(n). The paired "
        "difference to AdamW compares the two gains seed by seed (same warm start, same prompts). Memory per "
        "parameter: the optimizer state, and the trained weights themselves (bf16: 2 B; the fp32 master weights "
        "of SGD-momentum hold 4 B, and an engine or the forward pass needs a bf16 copy besides). torch AdamW "
        "here steps bf16 weights with bf16 moments (4 B/param of state); the usual mixed-precision AdamW keeps "
        "fp32 master weights and fp32 moments (12 B/param besides the bf16 copy).",
        "",
        "![reward curves, changed fraction and accuracy gain](rl_quality.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = [row for row in result["summary"] if row["best_lr"]]
    groups = group_runs(result["runs"])
    figure, (reward_axis, changed_axis, gain_axis) = plt.subplots(1, 3, figsize=(17, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    window = min(10, result["config"]["steps"])
    for index, row in enumerate(best):
        color = colors[index % len(colors)]
        group = groups[(row["arm"], row["lr"])]
        label = f"{row['label']}, lr {row['lr']:g}"
        curves = [rolling_mean(r["rewards"], window) for r in group]
        columns = list(zip(*curves, strict=True))
        steps = range(1, len(columns) + 1)
        reward_axis.plot(steps, [statistics.fmean(c) for c in columns], color=color, label=label)
        reward_axis.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], color=color, alpha=0.15)
        changed = list(zip(*[r["changed_fraction_per_step"] for r in group], strict=True))
        changed_axis.plot(steps, [max(statistics.fmean(c), 1e-9) for c in changed], color=color)
        for offset, key in ((-0.2, "greedy_gain"), (0.2, "sampled_gain")):
            gain = row[key]
            gain_axis.bar(
                index + offset,
                100 * gain["mean"],
                width=0.38,
                color=color,
                alpha=0.9 if key == "greedy_gain" else 0.45,
                yerr=[[100 * (gain["mean"] - gain["ci95_low"])], [100 * (gain["ci95_high"] - gain["mean"])]]
                if gain["n"] > 1
                else None,
                capsize=3,
            )
            values = [r[key.replace("_gain", "_accuracy_after")] - r[key.replace("_gain", "_accuracy_before")]
                      for r in group]  # fmt: skip
            gain_axis.scatter([index + offset] * len(values), [100 * v for v in values], color="black", s=8, zorder=3)
    reward_axis.set_xlabel("GRPO step")
    reward_axis.set_ylabel(f"sampled reward ({window}-step rolling mean)")
    reward_axis.set_title("training reward: mean over seeds, min-max band")
    reward_axis.grid(alpha=0.3)
    changed_axis.set_yscale("log")
    changed_axis.set_xlabel("GRPO step")
    changed_axis.set_ylabel("fraction of bf16 weights changed by the step")
    changed_axis.set_title("changed per step (mean over seeds)")
    changed_axis.grid(alpha=0.3, which="both")
    gain_axis.axhline(0, color="gray", linewidth=0.8)
    gain_axis.set_xticks(range(len(best)), [row["label"].replace(", ", ",\n") for row in best], fontsize=7)
    gain_axis.set_ylabel("held-out accuracy gain (pp)")
    gain_axis.set_title("gain: greedy (dark), sampled (light); 95% CI, seeds")
    gain_axis.grid(alpha=0.3, axis="y")
    handles, labels = reward_axis.get_legend_handles_labels()
    figure.tight_layout()
    figure.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(labels), fontsize=8)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def write_reports(result: dict[str, Any], out_dir: Path) -> None:
    write_markdown(result, out_dir / "rl_quality.md")
    write_plot(result, out_dir / "rl_quality.png")
    print((out_dir / "rl_quality.md").read_text())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report_only:
        result = json.loads((args.out_dir / "rl_quality.json").read_text())
        write_reports(result, args.out_dir)
        return result
    started = time.perf_counter()
    runs = run_grid(args.arms, args.seeds, args.common_flags, workers=args.workers)
    summary = summarize(runs)
    setup = demo.parse_args(args.common_flags)
    result = {
        "command": ("python bench/rl_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip(),
        "environment": environment(args.workers, 1),
        "config": {
            "steps": args.steps,
            "seeds": args.seeds,
            "common_flags": args.common_flags,
            "warm_start_target": setup.warm_start_target,
            "prompts_per_step": setup.prompts_per_step,
            "generations": setup.generations,
            "temperature": setup.temperature,
            "arms": [{"key": a.key, "label": a.label, "flags": list(a.flags), "lrs": list(a.lrs)} for a in args.arms],
            "quick": args.quick,
        },
        "wall_seconds": time.perf_counter() - started,
        "summary": summary,
        "verdicts": verdicts(summary, runs),
        "runs": runs,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "rl_quality.json").write_text(json.dumps(result, indent=1))
    write_reports(result, args.out_dir)
    print(f"wrote {args.out_dir}/rl_quality.{{json,md,png}} in {result['wall_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
