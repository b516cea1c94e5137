"""Why the demo task is built as it is: the measurements behind ``docs/rl_task.md``.

    python bench/rl_task_design.py [--seeds 0,1,2,3,4] [--workers 2] [--out-dir bench/results/rl_task_design]

Three studies on the demo's 2-layer, 128-wide Llama (``a+b=`` with a, b <= 49, exact-match reward):

1. **Warm start.** Held-out greedy accuracy after the supervised warm start, per seed, for the init std
   (0.02, HF's default, or ``hidden_size ** -0.5``) and the stopping rule: a fixed 1000 steps at lr 3e-3
   (a long fixed warm start), a fixed 160 steps at lr 1e-3, or lr 1e-3 until 30% of the validation problems are
   solved. RL needs every seed to start at a similar, middling accuracy.
2. **Gradient scale.** Per weight matrix, mean |gradient| / mean |weight| over the first GRPO steps
   (lr 0): plain SGD moves a tensor in proportion to it, AdamW does not. Reported as its spread
   (largest / smallest over the matrices) for each init.
3. **RL with each init.** RLSGD (stochastic rounding, lr 0.03 and 0.1) and AdamW (lr 3e-4) for 100 GRPO steps from
   the target warm start, per init: the training reward gain and the held-out greedy gain.

Writes ``rl_task_design.json`` and ``rl_task_design.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ (also under PYTHONSAFEPATH=1)

from rl_runs import REPO, Arm, environment, group_runs, run_grid, stats

HIDDEN = 128
INITS = {"0.02": 0.02, "1/sqrt(d)": HIDDEN**-0.5}
RULES = {
    "fixed 1000 steps, lr 3e-3": {"target_accuracy": None, "max_steps": 1000, "lr": 3e-3},
    "fixed 160 steps, lr 1e-3": {"target_accuracy": None, "max_steps": 160, "lr": 1e-3},
    "until 30% validation, lr 1e-3": {"target_accuracy": 0.3, "max_steps": 1000, "lr": 1e-3},
}
GRADIENT_STEPS = 5


def _warm_start_job(init: float, rule: dict[str, Any], seed: int) -> dict[str, Any]:
    import torch

    from sparse_rl_optim.demo.evaluate import greedy_accuracy
    from sparse_rl_optim.demo.task import build_tiny_llama, build_tokenizer, make_prompts
    from sparse_rl_optim.demo.warm_start import warm_start

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer, hidden_size=HIDDEN, layers=2, initializer_range=init)
    started = time.perf_counter()
    warm = warm_start(model, tokenizer, max_operand=49, seed=seed, **rule)
    held_out = make_prompts(None, max_operand=49, seed=seed, split="held_out")
    return {
        "steps": warm.steps,
        "validation_accuracy": warm.validation_accuracy,
        "held_out_greedy_accuracy": greedy_accuracy(model.to(torch.bfloat16), tokenizer, held_out),
        "seconds": time.perf_counter() - started,
    }


def _gradient_scale_job(init: float, seed: int) -> dict[str, float]:
    """Mean |g| / mean |w| per matrix, averaged over GRADIENT_STEPS GRPO steps at lr 0."""
    import contextlib
    import io
    import tempfile

    import torch

    from sparse_rl_optim.demo import __main__ as demo
    from sparse_rl_optim.demo.grpo import GRPOSetup, train_grpo
    from sparse_rl_optim.demo.task import build_tokenizer

    torch.set_num_threads(1)
    args = demo.parse_args(["--init-std", repr(init), "--seed", str(seed)])
    tokenizer = build_tokenizer()
    model, _ = demo.build_warm_model(args, tokenizer, "cpu")
    model = model.to(torch.bfloat16)
    named = [(name, p) for name, p in model.named_parameters() if p.dim() == 2]
    ratios: dict[str, list[float]] = {name: [] for name, _ in named}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def record(*_: Any) -> None:
        for name, p in named:
            ratios[name].append((p.grad.float().abs().mean() / p.float().abs().mean()).item())

    optimizer.register_step_pre_hook(record)
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        train_grpo(model, tokenizer, optimizer, GRPOSetup(steps=GRADIENT_STEPS), lr=0.0, seed=seed, max_operand=49,
                   output_dir=folder)  # fmt: skip
    return {name: statistics.fmean(values) for name, values in ratios.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results" / "rl_task_design")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    started = time.perf_counter()
    result: dict[str, Any] = {
        "command": ("python bench/rl_task_design.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip(),
        "environment": environment(args.workers, 1),
        "seeds": seeds,
    }
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        warm_jobs = {
            (init_name, rule_name, seed): pool.submit(_warm_start_job, init, rule, seed)
            for init_name, init in INITS.items()
            for rule_name, rule in RULES.items()
            for seed in seeds
        }
        gradient_jobs = {
            (init_name, seed): pool.submit(_gradient_scale_job, init, seed)
            for init_name, init in INITS.items()
            for seed in seeds[:3]
        }
        warm = {key: job.result() for key, job in warm_jobs.items()}
        gradients = {key: job.result() for key, job in gradient_jobs.items()}
    result["warm_start"] = []
    for init_name in INITS:
        for rule_name in RULES:
            runs = [warm[(init_name, rule_name, seed)] for seed in seeds]
            accuracy = [r["held_out_greedy_accuracy"] for r in runs]
            result["warm_start"].append({
                "init": init_name,
                "rule": rule_name,
                "held_out_greedy_accuracy": accuracy,
                "spread": max(accuracy) - min(accuracy),
                "steps": [r["steps"] for r in runs],
                "seconds": stats([r["seconds"] for r in runs]),
            })  # fmt: skip
    result["gradient_scale"] = []
    for init_name in INITS:
        per_seed = [gradients[(init_name, seed)] for seed in seeds[:3]]
        names = list(per_seed[0])
        mean_ratio = {name: statistics.fmean(g[name] for g in per_seed) for name in names}
        result["gradient_scale"].append({
            "init": init_name,
            "ratio_per_matrix": mean_ratio,
            "spread": max(mean_ratio.values()) / min(mean_ratio.values()),
            "spread_without_embeddings": max(v for n, v in mean_ratio.items() if "embed" not in n)
            / min(v for n, v in mean_ratio.items() if "embed" not in n),
        })  # fmt: skip
    arms = [
        Arm(f"{optimizer}@{init_name}", f"{label}, init {init_name}", flags, lrs)
        for init_name in INITS
        for optimizer, label, flags, lrs in (
            ("rlsgd", "RLSGD stochastic", ("--optimizer", "rlsgd", "--rounding", "stochastic"), (0.03, 0.1)),
            ("adamw", "AdamW", ("--optimizer", "adamw"), (3e-4,)),
        )
    ]
    rl_rows = []
    for init_name, init in INITS.items():
        mine = [arm for arm in arms if arm.key.endswith(init_name)]
        runs = run_grid(mine, seeds[:3], ["--steps", "100", "--init-std", repr(init)], workers=args.workers)
        for (key, lr), group in group_runs(runs).items():
            rl_rows.append({
                "arm": key,
                "label": group[0]["label"],
                "lr": lr,
                "reward_gain": stats([r["mean_reward_last_quarter"] - r["mean_reward_first_quarter"] for r in group]),
                "greedy_before": stats([r["greedy_accuracy_before"] for r in group]),
                "greedy_gain": stats([r["greedy_accuracy_after"] - r["greedy_accuracy_before"] for r in group]),
            })  # fmt: skip
    result["rl"] = rl_rows
    result["wall_seconds"] = time.perf_counter() - started
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "rl_task_design.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, args.out_dir / "rl_task_design.md")
    print((args.out_dir / "rl_task_design.md").read_text())


def write_markdown(result: dict[str, Any], path: Path) -> None:
    env = result["environment"]
    lines = [
        "# The demo task's design, measured",
        "",
        f"`{result['command']}`: {result['wall_seconds']:.0f} s wall on {env['cpu_count']} cores, torch "
        f"{env['torch']}, transformers {env['transformers']}, trl {env['trl']}, commit {env['git_commit']}. "
        f"Seeds {', '.join(map(str, result['seeds']))}.",
        "",
        "## 1. Warm start: held-out greedy accuracy per seed",
        "",
        "| init std | stopping rule | accuracy per seed (%) | spread (points) | steps per seed | s per warm start |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["warm_start"]:
        lines.append(
            f"| {row['init']} | {row['rule']} | {', '.join(f'{100 * a:.1f}' for a in row['held_out_greedy_accuracy'])} "
            f"| {100 * row['spread']:.1f} | {', '.join(map(str, row['steps']))} | {row['seconds']['mean']:.1f} |"
        )
    lines += [
        "",
        "## 2. Gradient scale: mean |g| / mean |w| per weight matrix (first GRPO steps)",
        "",
        "| init std | spread over matrices (max / min) | without the embedding | embedding | layer-1 MLP (mean of 3) |",
        "|---|---|---|---|---|",
    ]
    for row in result["gradient_scale"]:
        ratio = row["ratio_per_matrix"]
        mlp = statistics.fmean(v for n, v in ratio.items() if "layers.1.mlp" in n)
        lines.append(
            f"| {row['init']} | {row['spread']:.0f}x | {row['spread_without_embeddings']:.0f}x "
            f"| {ratio['model.embed_tokens.weight']:.2e} | {mlp:.2e} |"
        )
    lines += [
        "",
        "## 3. RL from the target warm start, per init (100 GRPO steps, mean ± std over 3 seeds)",
        "",
        "| run | lr | greedy before (%) | greedy gain (pp) | reward gain (last - first quarter) |",
        "|---|---|---|---|---|",
    ]
    for row in result["rl"]:
        lines.append(
            f"| {row['label']} | {row['lr']:g} | {100 * row['greedy_before']['mean']:.1f} "
            f"| {100 * row['greedy_gain']['mean']:+.1f} ± {100 * row['greedy_gain']['std']:.1f} "
            f"| {row['reward_gain']['mean']:+.3f} ± {row['reward_gain']['std']:.3f} |"
        )
    lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
