"""PNG plot of a tracker history: changed fraction per step and cumulative, by module kind."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from sparse_rl_optim.tracker.module_kinds import MODULE_KINDS

__all__ = ["draw_gate_panels", "plot_history", "save_figure_with_legend"]


def _positive(values: list[float]) -> list[float]:
    """Zero fractions as NaN: a log axis cannot draw them."""
    return [value if value > 0 else float("nan") for value in values]


def draw_gate_panels(per_step_axis: Any, cumulative_axis: Any, history: Sequence[dict[str, Any]]) -> None:
    """On two matplotlib axes (log scale): the fraction of bf16 weights changed by each step, and the
    fraction that differs from the reference, overall (black) and per module kind. The curves carry
    labels for one shared legend (:func:`save_figure_with_legend`)."""
    if not history:
        raise ValueError("nothing to plot: the tracker has no history yet")
    steps = [record["step"] for record in history]
    kinds = [kind for kind in MODULE_KINDS if kind in history[-1]["by_kind"]]
    for axis, key in ((per_step_axis, "changed"), (cumulative_axis, "cumulative_changed")):
        overall = _positive([record[key] / record["total"] for record in history])
        axis.plot(steps, overall, color="black", linewidth=2.2, label="all weights")
        for kind in kinds:
            fractions = [record["by_kind"][kind][key] / record["by_kind"][kind]["total"] for record in history]
            label = kind if any(fractions) else f"{kind} (none changed)"
            axis.plot(steps, _positive(fractions), linewidth=1.2, label=label)
        axis.set_yscale("log")
        axis.set_xlabel("optimizer step")
        axis.grid(True, which="both", alpha=0.3)
    per_step_axis.set_ylabel("fraction of bf16 weights")
    per_step_axis.set_title("changed by this step")
    cumulative_axis.set_title("differ from the weights at attach")


def save_figure_with_legend(
    figure: Any, legend_axis: Any, path: str | os.PathLike[str], title: str | None = None
) -> None:
    """Save ``figure`` with the legend of ``legend_axis`` in a row below the panels, where it cannot
    cover any curve, and ``title`` above."""
    handles, labels = legend_axis.get_legend_handles_labels()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    if handles:
        figure.legend(
            handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 5), fontsize=8
        )
    figure.savefig(path, dpi=110, bbox_inches="tight")


def plot_history(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str | None = None) -> None:
    """Save a PNG of :func:`draw_gate_panels`, the legend below the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("nothing to plot: the tracker has no history yet")
    figure, (per_step_axis, cumulative_axis) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    try:
        draw_gate_panels(per_step_axis, cumulative_axis, history)
        save_figure_with_legend(figure, cumulative_axis, path, title)
    finally:
        plt.close(figure)
