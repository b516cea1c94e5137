"""The demo's PNG: the sampled reward beside the precision-gate panels."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from sparse_rl_optim.tracker.plot import draw_gate_panels, save_figure_with_legend

__all__ = ["plot_demo", "rolling_mean"]


def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out = []
    for index in range(len(values)):
        chunk = values[max(0, index - window + 1) : index + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_demo(
    rewards: Sequence[float],
    history: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    window: int = 10,
) -> None:
    """Three panels: the mean sampled reward per GRPO step (dots) with its ``window``-step rolling
    mean (line); the fraction of bf16 weights each step changed; the fraction that differs from the
    start of RL. One legend, below the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (reward_axis, per_step_axis, cumulative_axis) = plt.subplots(1, 3, figsize=(15, 4.2))
    try:
        steps = range(1, len(rewards) + 1)
        reward_axis.scatter(steps, rewards, s=6, color="tab:gray", alpha=0.5)
        reward_axis.plot(steps, rolling_mean(rewards, window), color="tab:blue", linewidth=2)
        reward_axis.set_xlabel("GRPO step")
        reward_axis.set_ylabel("mean sampled reward (exact match)")
        reward_axis.set_title(f"reward per step (dots), {window}-step rolling mean (line)")
        reward_axis.set_ylim(0, 1)
        reward_axis.grid(True, alpha=0.3)
        draw_gate_panels(per_step_axis, cumulative_axis, history)
        save_figure_with_legend(figure, cumulative_axis, path, title)
    finally:
        plt.close(figure)
