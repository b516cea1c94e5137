"""RL quality on CPU: GRPO with AdamW, RLSGD and DenseBlockAdamW, a small lr sweep, several seeds.

    python bench/rl_quality.py [--steps 100] [--seeds 0,1,2] [--optimizers rlsgd,adamw,dense-block-adamw]
                               [--quick] [--out-dir bench/results/rl_quality]

Every run is the demo (``python -m sparse_rl_optim.demo``): a 2-layer, 128-wide Llama warm-started by
a short supervised run on ``a+b=`` (a, b < 50), then GRPO with bf16 weights and an exact-match reward.
The warm start depends only on the seed, so all optimizers and lrs of a seed start RL from the same
weights. Records per run greedy exact-match accuracy on 256 held-out prompts before and after RL, the
per-step mean sampled reward (the reward function is wrapped to record it; the demo is unchanged),
the per-step changed fraction of the bf16 weights, and the optimizer state bytes; writes
``rl_quality.json`` (all runs), ``rl_quality.md`` (mean ± std over seeds, min-max) and ``rl_quality.png``.
``--quick`` (for the test): 1 seed, 1 lr per optimizer, 5 steps, 20 warm-start steps, hidden size 32.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OPTIMIZERS = ("rlsgd", "adamw", "dense-block-adamw")
LRS = {"rlsgd": (0.01, 0.03), "adamw": (1e-4, 3e-4), "dense-block-adamw": (3e-4, 1e-3), "sgd": (0.01, 0.03)}
LABELS = {"rlsgd": "RLSGD", "adamw": "AdamW (torch)", "dense-block-adamw": "DenseBlockAdamW", "sgd": "SGD (torch)"}
SMOOTH = 5  # steps of the rolling mean in the reward plot


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="GRPO steps per run")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma-separated, of {sorted(LRS)}")
    parser.add_argument("--lrs", default=None, help="override the lr sweep for every optimizer, comma-separated")
    parser.add_argument("--warm-start-steps", type=int, default=1000)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 lr, 5 steps, tiny model")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results" / "rl_quality")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = [o for o in args.optimizers if o not in LRS]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {sorted(LRS)}")
    args.lr_sweep = {o: LRS[o] for o in args.optimizers}
    if args.lrs:
        args.lr_sweep = {o: tuple(float(x) for x in args.lrs.split(",")) for o in args.optimizers}
    if args.quick:
        args.seeds = args.seeds[:1]
        args.steps, args.warm_start_steps, args.hidden_size = 5, 20, 32
        args.lr_sweep = {o: lrs[:1] for o, lrs in args.lr_sweep.items()}
    return args


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _environment() -> dict[str, Any]:
    import torch
    import transformers
    import trl

    return {
        "machine": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "git_commit": _git_commit(),
    }


def one_run(optimizer: str, lr: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One demo run; returns its figures plus the per-step reward and changed-fraction curves."""
    from sparse_rl_optim.demo import __main__ as demo

    calls: list[list[float]] = []
    original = demo.addition_reward

    @functools.wraps(original)
    def recording_reward(*a: Any, **k: Any) -> list[float]:
        rewards = original(*a, **k)
        calls.append([float(r) for r in rewards])
        return rewards

    flags = ["--optimizer", optimizer, "--lr", repr(lr), "--seed", str(seed), "--steps", str(args.steps)]
    flags += ["--warm-start-steps", str(args.warm_start_steps), "--hidden-size", str(args.hidden_size)]
    demo.addition_reward = recording_reward  # the demo looks it up at call time: GRPO reward and greedy accuracy
    try:
        with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
            figures = demo.run(demo.parse_args([*flags, "--output-dir", folder]))
            history = [json.loads(line) for line in (Path(folder) / "gate_history.jsonl").read_text().splitlines()]
    finally:
        demo.addition_reward = original
    # calls: greedy accuracy before, one batch of completions per GRPO step, greedy accuracy after.
    rewards = [statistics.fmean(c) for c in calls[1:-1]]
    if len(rewards) != args.steps:
        raise RuntimeError(f"expected {args.steps} reward batches, recorded {len(rewards)}")
    quarter = max(1, args.steps // 4)
    for key, values in (("first", rewards[:quarter]), ("last", rewards[-quarter:])):
        logged = figures[f"mean_reward_{key}_quarter"]
        if abs(statistics.fmean(values) - logged) > 1e-3:
            raise RuntimeError(f"recorded reward {statistics.fmean(values)} != trainer log {logged} ({key} quarter)")
    keep = (
        "params",
        "warm_start_loss",
        "greedy_accuracy_before",
        "greedy_accuracy_after",
        "mean_reward_first_quarter",
        "mean_reward_last_quarter",
        "mean_changed_fraction",
        "cumulative_changed_fraction",
        "swallowed_of_intended",
        "optimizer_state_bytes",
        "adamw_state_bytes",
        "seconds",
    )
    return {
        "optimizer": optimizer,
        "lr": lr,
        "seed": seed,
        **{k: figures[k] for k in keep},
        "state_bytes_per_param": figures["optimizer_state_bytes"] / figures["params"],
        "reward_curve": rewards,
        "changed_fraction_curve": [row["changed_fraction"] for row in history],
    }


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (optimizer, lr): mean, sample std, min and max over seeds; marks the best lr per optimizer."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["optimizer"], run["lr"]), []).append(run)
    rows = []
    for (optimizer, lr), group in groups.items():
        row: dict[str, Any] = {"optimizer": optimizer, "lr": lr, "seeds": [r["seed"] for r in group]}
        for key in (
            "greedy_accuracy_before",
            "greedy_accuracy_after",
            "mean_reward_first_quarter",
            "mean_reward_last_quarter",
            "mean_changed_fraction",
            "cumulative_changed_fraction",
            "state_bytes_per_param",
            "seconds",
        ):
            row[key] = _stats([r[key] for r in group])
        row["accuracy_gain"] = _stats([r["greedy_accuracy_after"] - r["greedy_accuracy_before"] for r in group])
        rows.append(row)
    for optimizer in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == optimizer]
        best = max(mine, key=lambda r: (r["greedy_accuracy_after"]["mean"], r["mean_reward_last_quarter"]["mean"]))
        for r in mine:
            r["best_lr"] = r is best
    return rows


def _pm(s: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def _range(s: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    return f"{scale * s['min']:.{digits}f}-{scale * s['max']:.{digits}f}"


def write_markdown(result: dict[str, Any], path: Path) -> None:
    env, config = result["environment"], result["config"]
    lines = [
        "# RL quality: GRPO on `a+b=` with AdamW, RLSGD and DenseBlockAdamW",
        "",
        f"`{result['command']}` — {result['wall_seconds']:.0f} s wall on {env['machine']} ({env['cpu_count']} cores, "
        f"{env['device']}), torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}, "
        f"commit {env['git_commit']}.",
        "",
        f"Model: {config['layers']}-layer, {config['hidden_size']}-wide Llama ({result['runs'][0]['params']:,} params), "
        f"warm-started {config['warm_start_steps']} supervised steps (fp32 AdamW) on `a+b=` with a, b < "
        f"{config['max_operand'] + 1}, then {config['steps']} GRPO steps (bf16 weights, beta 0, exact-match reward, "
        "the demo's batch). Seeds "
        f"{', '.join(map(str, config['seeds']))}: a seed fixes the warm start, the held-out set and the GRPO "
        "sampling, so all optimizers of a seed start RL from the same weights.",
        "",
        "Mean ± sample std over seeds, [min-max] below. Accuracy: greedy exact match on 256 held-out prompts, "
        "before → after RL. Reward: mean sampled reward over the first and last quarter of the steps. Changed: "
        "fraction of bf16 weights that change per step (mean), and that differ from the start of RL at the end. "
        "State: optimizer state bytes per parameter. ★: best lr of the optimizer (by accuracy after).",
        "",
        "| optimizer | lr | accuracy before (%) | accuracy after (%) | gain (pp) | reward first q. | reward last q. "
        "| changed/step (%) | changed total (%) | state B/param | s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        star = (
            " ★"
            if row["best_lr"] and len([r for r in result["summary"] if r["optimizer"] == row["optimizer"]]) > 1
            else ""
        )
        lines.append(
            f"| {LABELS.get(row['optimizer'], row['optimizer'])}{star} | {row['lr']:g} "
            f"| {_pm(row['greedy_accuracy_before'], 100)} [{_range(row['greedy_accuracy_before'], 100)}] "
            f"| {_pm(row['greedy_accuracy_after'], 100)} [{_range(row['greedy_accuracy_after'], 100)}] "
            f"| {_pm(row['accuracy_gain'], 100)} [{_range(row['accuracy_gain'], 100)}] "
            f"| {_pm(row['mean_reward_first_quarter'], 1, 3)} "
            f"| {_pm(row['mean_reward_last_quarter'], 1, 3)} [{_range(row['mean_reward_last_quarter'], 1, 3)}] "
            f"| {_pm(row['mean_changed_fraction'], 100, 2)} "
            f"| {_pm(row['cumulative_changed_fraction'], 100, 1)} "
            f"| {row['state_bytes_per_param']['mean']:.2f} "
            f"| {row['seconds']['mean']:.0f} |"
        )
    lines += [
        "",
        f"n = {len(config['seeds'])} seeds per row; with so few seeds and 256 held-out prompts (±3 pp binomial "
        "noise at 30%), differences of a few points are within the noise.",
        "",
        "![reward curves and accuracy gain](rl_quality.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def _rolling(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, runs = result["summary"], result["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    optimizers = list(dict.fromkeys(r["optimizer"] for r in summary))
    window = min(SMOOTH, result["config"]["steps"])
    for index, optimizer in enumerate(optimizers):
        best = next(r for r in summary if r["optimizer"] == optimizer and r["best_lr"])
        curves = [
            _rolling(r["reward_curve"], window) for r in runs if r["optimizer"] == optimizer and r["lr"] == best["lr"]
        ]
        steps = range(1, len(curves[0]) + 1)
        columns = list(zip(*curves, strict=True))
        color = colors[index % len(colors)]
        left.plot(
            steps,
            [statistics.fmean(c) for c in columns],
            color=color,
            label=f"{LABELS.get(optimizer, optimizer)} lr {best['lr']:g}",
        )
        left.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], color=color, alpha=0.2)
    left.set_xlabel("GRPO step")
    left.set_ylabel(f"sampled reward ({window}-step rolling mean)")
    left.set_title(f"reward, best lr per optimizer: mean over {len(result['config']['seeds'])} seeds, min-max band")
    left.legend()
    left.grid(alpha=0.3)

    labels, positions = [], []
    for position, row in enumerate(summary):
        color = colors[optimizers.index(row["optimizer"]) % len(colors)]
        gains = [
            100 * (r["greedy_accuracy_after"] - r["greedy_accuracy_before"])
            for r in runs
            if r["optimizer"] == row["optimizer"] and r["lr"] == row["lr"]
        ]
        right.bar(position, statistics.fmean(gains), color=color, alpha=0.6 if not row["best_lr"] else 0.9)
        right.scatter([position] * len(gains), gains, color="black", s=14, zorder=3)
        labels.append(f"{LABELS.get(row['optimizer'], row['optimizer'])}\nlr {row['lr']:g}")
        positions.append(position)
    right.axhline(0, color="gray", linewidth=0.8)
    right.set_xticks(positions, labels, fontsize=7, rotation=20)
    right.set_ylabel("greedy accuracy after - before (pp)")
    right.set_title("held-out accuracy gain: mean (bar), seeds (dots)")
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sparse_rl_optim.demo import __main__ as demo

    defaults = demo.parse_args([])
    command = "python bench/rl_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    runs = []
    total = sum(len(lrs) for lrs in args.lr_sweep.values()) * len(args.seeds)
    for seed in args.seeds:
        for optimizer, lrs in args.lr_sweep.items():
            for lr in lrs:
                run = one_run(optimizer, lr, seed, args)
                runs.append(run)
                print(
                    f"[{len(runs)}/{total}] seed {seed} {optimizer} lr {lr:g}: accuracy "
                    f"{run['greedy_accuracy_before']:.3f} -> {run['greedy_accuracy_after']:.3f}, reward "
                    f"{run['mean_reward_first_quarter']:.3f} -> {run['mean_reward_last_quarter']:.3f}, "
                    f"{run['seconds']:.0f} s ({time.perf_counter() - started:.0f} s total)",
                    file=sys.stderr,
                    flush=True,
                )
    result = {
        "command": command.strip(),
        "environment": _environment(),
        "config": {
            "steps": args.steps,
            "seeds": args.seeds,
            "lr_sweep": args.lr_sweep,
            "warm_start_steps": args.warm_start_steps,
            "hidden_size": args.hidden_size,
            "layers": defaults.layers,
            "max_operand": defaults.max_operand,
            "quick": args.quick,
        },
        "wall_seconds": time.perf_counter() - started,
        "summary": summarize(runs),
        "runs": runs,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "rl_quality.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, args.out_dir / "rl_quality.md")
    write_plot(result, args.out_dir / "rl_quality.png")
    print((args.out_dir / "rl_quality.md").read_text())
    print(f"wrote {args.out_dir}/rl_quality.{{json,md,png}} in {result['wall_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
