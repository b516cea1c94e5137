"""Runs of the demo's GRPO task over seeds, in parallel processes, each seed warm-started once.

Shared by ``rl_quality.py`` (the optimizer comparison) and ``demo_sweep.py`` (the demo's defaults).
A seed fixes the warm start, the GRPO prompts and the sampling, so every run of a seed starts RL from
the same weights. Each worker process uses ``threads`` torch threads: on 2 cores, two 1-thread runs
at a time finish a grid about 1.9x sooner than one 2-thread run at a time (the model is too small
for two threads to help one run much).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

#: The figures a run keeps from the demo's summary.
KEPT = (
    "params",
    "warm_start_steps",
    "warm_start_validation_accuracy",
    "held_out_prompts",
    "greedy_accuracy_before",
    "greedy_accuracy_after",
    "sampled_accuracy_before",
    "sampled_accuracy_after",
    "rewards",
    "mean_reward_first_quarter",
    "mean_reward_last_quarter",
    "changed_fraction_per_step",
    "mean_changed_fraction",
    "cumulative_changed_fraction",
    "swallowed_of_updates",
    "optimizer_state_bytes",
    "weight_bytes",
    "adamw_state_bytes",
    "seconds",
)

# Two-sided 95% critical values of Student's t by degrees of freedom (from the t table).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
_Z975 = 1.959964  # the normal distribution's 97.5% point
#: Flags that make the model or the warm start: the same for every run of a seed, so common flags only.
WARM_START_FLAGS = ("--hidden-size", "--layers", "--init-std", "--max-operand", "--warm-start-target",
                    "--warm-start-steps", "--seed")  # fmt: skip


@dataclass(frozen=True)
class Arm:
    """One configuration to sweep: a ``label``, the demo ``flags`` that make it, and the ``lrs``."""

    key: str
    label: str
    flags: tuple[str, ...]
    lrs: tuple[float, ...]


def t95(df: int) -> float:
    """Two-sided 95% critical value of Student's t with ``df`` degrees of freedom: tabulated up to 10,
    beyond that the Cornish-Fisher expansion in 1/df (within 0.01% from df 11 on)."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 values")
    if df in _T95:
        return _T95[df]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def stats(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, sample std, standard error, 95% t interval, min, max and n of ``values`` (with one value
    the interval is ``None``: it needs a spread)."""
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    se = std / math.sqrt(n)
    half = t95(n - 1) * se if n > 1 else None
    return {
        "mean": mean,
        "std": std,
        "se": se,
        "ci95_low": None if half is None else mean - half,
        "ci95_high": None if half is None else mean + half,
        "min": min(values),
        "max": max(values),
        "n": n,
    }


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _warm_job(model_flags: Sequence[str], seed: int, path: str) -> dict[str, Any]:
    import torch

    from sparse_rl_optim.demo import __main__ as demo
    from sparse_rl_optim.demo.task import build_tokenizer

    args = demo.parse_args([*model_flags, "--seed", str(seed)])
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where demo.run will train
    model, warm = demo.build_warm_model(args, build_tokenizer(), device)
    torch.save({"state": model.state_dict(), "warm": asdict(warm)}, path)
    return {**asdict(warm), "seconds": time.perf_counter() - started}


def _run_job(flags: Sequence[str], warm_path: str) -> dict[str, Any]:
    import torch

    from sparse_rl_optim.demo import __main__ as demo
    from sparse_rl_optim.demo.warm_start import WarmStart

    saved = torch.load(warm_path)
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        figures = demo.run(
            demo.parse_args([*flags, "--output-dir", folder]), warm=(saved["state"], WarmStart(**saved["warm"]))
        )
    return {key: figures[key] for key in KEPT}


def run_grid(
    arms: Sequence[Arm], seeds: Sequence[int], common_flags: Sequence[str], *, workers: int, threads: int = 1
) -> list[dict[str, Any]]:
    """Every arm at every lr on every seed (``common_flags`` for all: model, steps, batch); returns one
    record per run with the demo figures in :data:`KEPT`. Progress goes to stderr."""
    for arm in arms:
        shared = [flag for flag in arm.flags if flag.split("=")[0] in WARM_START_FLAGS]
        if shared:
            raise ValueError(f"{arm.key}: {shared} make the warm start, which every arm of a seed shares; "
                             "pass them in common_flags")  # fmt: skip
    model_flags = [*common_flags]
    context = get_context("spawn")  # a clean torch in every worker
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory() as folder,
        ProcessPoolExecutor(workers, mp_context=context, initializer=_set_threads, initargs=(threads,)) as pool,
    ):
        warm_paths = {seed: os.path.join(folder, f"warm_{seed}.pt") for seed in seeds}
        warm = dict(
            zip(seeds, pool.map(_warm_job, [model_flags] * len(seeds), seeds, warm_paths.values()), strict=True)
        )
        for seed in seeds:
            print(
                f"seed {seed}: warm start {warm[seed]['steps']} steps, validation accuracy "
                f"{warm[seed]['validation_accuracy']:.3f}",
                file=sys.stderr,
                flush=True,
            )
        jobs = [
            (arm, lr, seed, [*common_flags, *arm.flags, "--lr", repr(lr), "--seed", str(seed)])
            for seed in seeds
            for arm in arms
            for lr in arm.lrs
        ]
        futures = [pool.submit(_run_job, flags, warm_paths[seed]) for _, _, seed, flags in jobs]
        for index, ((arm, lr, seed, _), future) in enumerate(zip(jobs, futures, strict=True)):
            figures = future.result()
            runs.append({"arm": arm.key, "label": arm.label, "lr": lr, "seed": seed, **figures})
            print(
                f"[{index + 1}/{len(jobs)}] seed {seed} {arm.label} lr {lr:g}: greedy "
                f"{figures['greedy_accuracy_before']:.3f} -> {figures['greedy_accuracy_after']:.3f}, reward "
                f"{figures['mean_reward_first_quarter']:.3f} -> {figures['mean_reward_last_quarter']:.3f} "
                f"({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    return runs


def group_runs(runs: Sequence[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Runs by ``(arm, lr)``, in the order they were given, each group ordered by seed."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["arm"], run["lr"]), []).append(run)
    return {key: sorted(group, key=lambda r: r["seed"]) for key, group in groups.items()}


def git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        # The benchmarks' own outputs do not make the code dirty (a sequence of them writes results in turn).
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)bench/results"], cwd=REPO,
                               capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(workers: int, threads: int) -> dict[str, Any]:
    import torch
    import transformers
    import trl

    return {
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "workers": workers,
        "torch_threads_per_worker": threads,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "git_commit": git_commit(),
    }
