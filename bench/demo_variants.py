"""The demo with other optimizers and dense-block settings, one row each, over a few seeds.

    python bench/demo_variants.py [--seeds 0,1,2] [--workers 2] [--out-dir bench/results/demo]

Each variant is ``sparse-rl-optim-demo`` with the flags shown (demo defaults otherwise: 150 GRPO steps,
32 prompts x 8 completions), from the same warm start per seed. Writes one JSON per variant, named after
its flags (e.g. ``dense-block-adamw_select_off_principal.json``: the runs and their means), and
``variants.md``, the table the README shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ (also under PYTHONSAFEPATH=1)

from rl_runs import REPO, Arm, environment, group_runs, run_grid

DENSE_BLOCK = ("--optimizer", "dense-block-adamw")
VARIANTS = (
    Arm("rlsgd", "rlsgd (lr 0.1, stochastic rounding: the demo's default)", ("--optimizer", "rlsgd"), (0.1,)),
    Arm("adamw", "adamw (torch)", ("--optimizer", "adamw"), (3e-4,)),
    Arm("dense-block-adamw", "dense-block-adamw (select grad)", DENSE_BLOCK, (3e-3,)),
    Arm("dense-block-adamw_select_off_principal", "dense-block-adamw --select off_principal",
        (*DENSE_BLOCK, "--select", "off_principal"), (3e-3,)),
    Arm("dense-block-adamw_select_random", "dense-block-adamw --select random", (*DENSE_BLOCK, "--select", "random"),
        (3e-3,)),
    Arm("dense-block-adamw_rest_sgd", "dense-block-adamw --rest sgd (rest lr 0.1)", (*DENSE_BLOCK, "--rest", "sgd"),
        (3e-3,)),
)  # fmt: skip
FIGURES = (
    "optimizer_state_bytes",
    "mean_changed_fraction",
    "cumulative_changed_fraction",
    "greedy_accuracy_before",
    "greedy_accuracy_after",
    "mean_reward_first_quarter",
    "mean_reward_last_quarter",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results" / "demo")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    command = ("python bench/demo_variants.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    started = time.perf_counter()
    runs = run_grid(VARIANTS, seeds, [], workers=args.workers)
    env = environment(args.workers, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"`{command}`: {time.perf_counter() - started:.0f} s wall, {env['cpu_count']} cores, torch {env['torch']}, "
        f"commit {env['git_commit']}. Mean over seeds {', '.join(map(str, seeds))}.",
        "",
        "| run | lr | state (B/param) | changed per step | differ from start of RL | greedy accuracy "
        "| reward first → last quarter |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    groups = group_runs(runs)
    for arm in VARIANTS:
        key, lr = arm.key, arm.lrs[0]
        group = groups[(key, lr)]
        means = {name: statistics.fmean(r[name] for r in group) for name in FIGURES}
        params = group[0]["params"]
        record = {"command": command, "flags": list(arm.flags), "lr": lr, "seeds": seeds, "mean": means,
                  "params": params, "runs": [{k: v for k, v in r.items() if not isinstance(v, list)} for r in group]}  # fmt: skip
        (args.out_dir / f"{key}.json").write_text(json.dumps(record, indent=2))
        lines.append(
            f"| `{arm.label}` | {lr:g} | {means['optimizer_state_bytes'] / params:.2f} "
            f"| {100 * means['mean_changed_fraction']:.2f}% | {100 * means['cumulative_changed_fraction']:.2f}% "
            f"| {means['greedy_accuracy_before']:.3f} → {means['greedy_accuracy_after']:.3f} "
            f"| {means['mean_reward_first_quarter']:.3f} → {means['mean_reward_last_quarter']:.3f} |"
        )
    (args.out_dir / "variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
