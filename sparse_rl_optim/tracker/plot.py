"""PNG plot of a tracker history: changed fraction per step and cumulative, by module kind."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from sparse_rl_optim.tracker.module_kinds import MODULE_KINDS

__all__ = ["plot_history"]


def plot_history(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str | None = None) -> None:
    """Two panels on a log scale: the fraction of weights changed by each step, and the fraction that
    differs from the reference, overall (black) and per module kind. Zero fractions are not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("nothing to plot: the tracker has no history yet")
    steps = [record["step"] for record in history]
    kinds = [kind for kind in MODULE_KINDS if kind in history[-1]["by_kind"]]
    figure, (per_step_axis, cumulative_axis) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)

    def positive(values: list[float]) -> list[float]:
        return [value if value > 0 else float("nan") for value in values]

    for axis, key, overall_key in (
        (per_step_axis, "changed", "changed"),
        (cumulative_axis, "cumulative_changed", "cumulative_changed"),
    ):
        overall = positive([record[overall_key] / record["total"] for record in history])
        axis.plot(steps, overall, color="black", linewidth=2.2, label="all weights")
        for kind in kinds:
            fractions = [record["by_kind"][kind][key] / record["by_kind"][kind]["total"] for record in history]
            label = kind if any(fractions) else f"{kind} (none changed)"
            axis.plot(steps, positive(fractions), linewidth=1.2, label=label)
        axis.set_yscale("log")
        axis.set_xlabel("optimizer step")
        axis.grid(True, which="both", alpha=0.3)
    per_step_axis.set_ylabel("fraction of bf16 weights changed")
    per_step_axis.set_title("changed by this step")
    cumulative_axis.set_title("differs from the weights at attach")
    cumulative_axis.legend(fontsize=8, loc="lower right", ncol=2)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
