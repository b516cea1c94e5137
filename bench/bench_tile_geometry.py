"""Tile geometry for compacting changed bf16 weights: 1D runs against 2D blocks, measured on the demo.

    python bench/bench_tile_geometry.py [--steps 30] [--optimizers rlsgd adamw] [--window 4]
        [--out bench/results/tile_geometry.json] [--plot bench/results/tile_geometry.png]

Runs the package demo (``sparse_rl_optim.demo``: tiny Llama, supervised warm start, TRL GRPO on bf16
weights with the PrecisionGateTracker attached) for each optimizer at the demo's default lr (RLSGD: ``SPARSE_RLSGD``), with one
extra pair of step hooks on the optimizer that snapshot the bf16 bits before each step and diff them
after. From the exact changed mask of every parameter it counts, per tile geometry, the tiles that
hold at least one changed element ("active" tiles, the ones a compaction ships and processes densely):

* 1D: runs of ``s`` contiguous elements of the flattened row-major tensor, s in 32 .. 4096;
* 2D: ``b x b`` blocks of the matrix view ``(shape[0], numel // shape[0])`` (edge blocks partial);
  1D tensors (norms) are cut into runs of ``b * b`` elements.

Per step, and per window of ``--window`` steps (the mask there is "differs from the weights at the
last sync", i.e. what a delta sync every ``window`` steps ships), it reports the active-tile fraction,
the fraction of elements covered by active tiles, and the bytes to ship,
``active_elements * 2 (bf16) + active_tiles * 4 (tile id)``, against (i) the changed elements as
(value, index) pairs, ``changed * (2 + 4)``, and (ii) the full bf16 tensors, ``numel * 2``. Edge tiles
count with their real element count. The null model places the same number of changed elements per
tensor uniformly at random; its expected active tiles are exact (hypergeometric):
``P(tile of t elements inactive) = C(n - t, k) / C(n, k)`` for ``k`` changed of ``n``.

Writes the JSON (summary per optimizer, geometry and scope, plus per-step series) and a plot of the
active-tile fraction against tile size (1D vs 2D, observed vs random) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import sparse_rl_optim.demo.__main__ as demo
from sparse_rl_optim.tracker.module_kinds import module_kind

RESULTS = Path(__file__).resolve().parent / "results"
# RLSGD in a sparser regime: ~3% of the weights change per step on this model (RL on billion-parameter
# models reports ~1%).
# The demo's own default (lr 0.1, stochastic rounding) changes ~31% per step on its 0.3M-param model,
# the price of learning visibly in 150 steps (docs/rl_task.md): tiles are then nearly all active.
SPARSE_RLSGD = ["--rounding", "nearest", "--lr", "0.01"]
SIZES_1D = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCKS_2D = (8, 16, 32, 64)
VALUE_BYTES = 2  # bf16
INDEX_BYTES = 4  # int32 element index or tile id
# Counts kept per (step, scope, geometry), summed over the scope's tensors.
FIELDS = (
    "changed",
    "elements",
    "tiles",
    "active_tiles",
    "active_elements",
    "null_active_tiles",
    "null_active_elements",
)


# -- geometry ---------------------------------------------------------------------------------------
class Tiling:
    """How one tensor is cut into tiles: maps its changed mask to per-tile activity, and gives the
    expected activity under random placement."""

    def __init__(self, shape: torch.Size, geometry: str) -> None:
        numel = shape.numel()
        self.numel = numel
        kind, size = geometry.split("-")
        if kind == "2d" and len(shape) >= 2:
            block = int(size.split("x")[0])
            rows, cols = shape[0], numel // shape[0]
            self.block = block
            self.grid = (-(-rows // block), -(-cols // block))
            row_sizes = torch.full((self.grid[0],), block, dtype=torch.int64)
            row_sizes[-1] = rows - block * (self.grid[0] - 1)
            col_sizes = torch.full((self.grid[1],), block, dtype=torch.int64)
            col_sizes[-1] = cols - block * (self.grid[1] - 1)
            self.matrix = (rows, cols)
            self.tile_sizes = torch.outer(row_sizes, col_sizes).reshape(-1)
        else:
            run = int(size) if kind == "1d" else int(size.split("x")[0]) ** 2
            self.block = run
            self.grid = None
            tiles = -(-numel // run)
            self.tile_sizes = torch.full((tiles,), run, dtype=torch.int64)
            self.tile_sizes[-1] = numel - run * (tiles - 1)
        sizes, counts = torch.unique(self.tile_sizes, return_counts=True)
        self._size_counts = list(zip(sizes.tolist(), counts.tolist(), strict=True))

    @property
    def tiles(self) -> int:
        return self.tile_sizes.numel()

    def active(self, mask: torch.Tensor) -> torch.Tensor:
        """Bool per tile: does it hold a changed element (``mask`` is the flat changed mask)."""
        if self.grid is None:
            padded = torch.zeros(self.tiles * self.block, dtype=torch.bool)
            padded[: self.numel] = mask
            return padded.view(self.tiles, self.block).any(dim=1)
        rows, cols = self.matrix
        grid_rows, grid_cols = self.grid
        padded = torch.zeros(grid_rows * self.block, grid_cols * self.block, dtype=torch.bool)
        padded[:rows, :cols] = mask.view(rows, cols)
        return padded.view(grid_rows, self.block, grid_cols, self.block).any(dim=3).any(dim=1).reshape(-1)

    def null(self, changed: int) -> tuple[float, float]:
        """Expected (active tiles, elements in active tiles) for ``changed`` elements placed at random."""
        tiles = elements = 0.0
        for size, count in self._size_counts:
            inactive = _hypergeometric_none(self.numel, size, changed)
            tiles += count * (1.0 - inactive)
            elements += count * size * (1.0 - inactive)
        return tiles, elements


def _hypergeometric_none(n: int, t: int, k: int) -> float:
    """P(none of ``k`` elements drawn without replacement from ``n`` falls in a given ``t``) = C(n-t,k)/C(n,k)."""
    if k == 0:
        return 1.0
    if n - t < k:
        return 0.0
    return math.exp(math.lgamma(n - t + 1) - math.lgamma(n - t - k + 1) - math.lgamma(n + 1) + math.lgamma(n - k + 1))


def geometries() -> list[str]:
    return [f"1d-{s}" for s in SIZES_1D] + [f"2d-{b}x{b}" for b in BLOCKS_2D]


def tile_elements(geometry: str) -> int:
    kind, size = geometry.split("-")
    return int(size) if kind == "1d" else int(size.split("x")[0]) ** 2


# -- recording --------------------------------------------------------------------------------------
class TileRecorder:
    """Optimizer step hooks: the exact changed mask of every param per step (bits before vs after)
    and per window of ``window`` steps (bits now vs at the window start), reduced to tile counts."""

    def __init__(self, model: torch.nn.Module, window: int) -> None:
        self.named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.kinds = [module_kind(name) for name, _ in self.named]
        self.window = window
        self.geometries = geometries()
        self.tilings = [{g: Tiling(p.shape, g) for g in self.geometries} for _, p in self.named]
        self.before: list[torch.Tensor] = []
        self.window_start = [self._bits(p).clone() for _, p in self.named]
        self.steps = 0
        self.per_step: list[dict[str, dict[str, list[float]]]] = []
        self.per_window: list[dict[str, dict[str, list[float]]]] = []
        self.seconds = 0.0

    @staticmethod
    def _bits(param: torch.Tensor) -> torch.Tensor:
        return param.detach().view(torch.int16).reshape(-1).cpu()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)

    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.before = [self._bits(p).clone() for _, p in self.named]

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        started = time.perf_counter()
        self.steps += 1
        after = [self._bits(p) for _, p in self.named]
        self.per_step.append(self._counts([a != b for a, b in zip(after, self.before, strict=True)]))
        if self.steps % self.window == 0:
            self.per_window.append(self._counts([a != b for a, b in zip(after, self.window_start, strict=True)]))
            self.window_start = [a.clone() for a in after]
        self.before = []
        self.seconds += time.perf_counter() - started

    def _counts(self, masks: list[torch.Tensor]) -> dict[str, dict[str, list[float]]]:
        """{scope: {geometry: [FIELDS...]}} summed over the scope's tensors; scope "all" or a kind."""
        out: dict[str, dict[str, list[float]]] = {}
        for mask, kind, tilings in zip(masks, self.kinds, self.tilings, strict=True):
            changed = int(mask.sum())
            for geometry, tiling in tilings.items():
                active = tiling.active(mask)
                null_tiles, null_elements = tiling.null(changed)
                row = (
                    changed,
                    tiling.numel,
                    tiling.tiles,
                    int(active.sum()),
                    int(tiling.tile_sizes[active].sum()),
                    null_tiles,
                    null_elements,
                )
                for scope in ("all", kind):
                    acc = out.setdefault(scope, {}).setdefault(geometry, [0.0] * len(FIELDS))
                    for i, value in enumerate(row):
                        acc[i] += value
        return out


# -- summaries --------------------------------------------------------------------------------------
def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def summarize(records: list[dict[str, dict[str, list[float]]]]) -> dict[str, dict[str, Any]]:
    """Per scope and geometry: means over the records of the fractions, and byte ratios of the totals."""
    if not records:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for scope in records[0]:
        out[scope] = {}
        for geometry in records[0][scope]:
            rows = [dict(zip(FIELDS, r[scope][geometry], strict=True)) for r in records]
            total = {f: sum(row[f] for row in rows) for f in FIELDS}
            tile_bytes = total["active_elements"] * VALUE_BYTES + total["active_tiles"] * INDEX_BYTES
            null_bytes = total["null_active_elements"] * VALUE_BYTES + total["null_active_tiles"] * INDEX_BYTES
            changed_bytes = total["changed"] * (VALUE_BYTES + INDEX_BYTES)
            full_bytes = total["elements"] * VALUE_BYTES
            active = [row["active_tiles"] / row["tiles"] for row in rows]
            null_active = [row["null_active_tiles"] / row["tiles"] for row in rows]
            out[scope][geometry] = {
                "tile_elements": tile_elements(geometry),
                "changed_fraction": _mean([row["changed"] / row["elements"] for row in rows]),
                "active_tile_fraction": _mean(active),
                "active_tile_fraction_random": _mean(null_active),
                "covered_element_fraction": _mean([row["active_elements"] / row["elements"] for row in rows]),
                "covered_element_fraction_random": _mean(
                    [row["null_active_elements"] / row["elements"] for row in rows]
                ),
                "bytes_vs_changed_encoding": tile_bytes / changed_bytes if changed_bytes else None,
                "bytes_vs_changed_encoding_random": null_bytes / changed_bytes if changed_bytes else None,
                "bytes_vs_full": tile_bytes / full_bytes,
                "bytes_vs_full_random": null_bytes / full_bytes,
                "changed_encoding_vs_full": changed_bytes / full_bytes,
                "series_active_tile_fraction": [round(v, 6) for v in active],
                "series_active_tile_fraction_random": [round(v, 6) for v in null_active],
            }
    return out


def run_optimizer(name: str, steps: int, window: int, workdir: Path) -> dict[str, Any]:
    """The demo's GRPO run for one optimizer (demo defaults otherwise, RLSGD in SPARSE_RLSGD), with a
    TileRecorder attached."""
    flags = ["--optimizer", name, "--steps", str(steps), *(SPARSE_RLSGD if name == "rlsgd" else [])]
    args = demo.parse_args([*flags, "--output-dir", str(workdir / name)])
    recorders: list[TileRecorder] = []
    original = demo.build_optimizer

    def build_and_record(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
        optimizer = original(args, model)
        recorder = TileRecorder(model, window)
        recorder.attach(optimizer)
        recorders.append(recorder)
        return optimizer

    demo.build_optimizer = build_and_record
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            figures = demo.run(args)
    finally:
        demo.build_optimizer = original
    seconds = time.perf_counter() - started
    (recorder,) = recorders
    shapes = {n: list(p.shape) for n, p in recorder.named}
    return {
        "lr": args.lr,
        "steps_recorded": recorder.steps,
        "windows_recorded": len(recorder.per_window),
        "seconds": seconds,
        "recorder_seconds": recorder.seconds,
        "demo": {
            k: figures[k]
            for k in (
                "params",
                "mean_changed_fraction",
                "cumulative_changed_fraction",
                "swallowed_of_updates",
                "mean_reward_first_quarter",
                "mean_reward_last_quarter",
                "greedy_accuracy_before",
                "greedy_accuracy_after",
            )
        },
        "param_shapes": shapes,
        "per_step": summarize(recorder.per_step),
        "per_window": summarize(recorder.per_window),
    }


# -- output -----------------------------------------------------------------------------------------
def print_table(results: dict[str, Any], window: int) -> None:
    for name, res in results["optimizers"].items():
        step, win = res["per_step"]["all"], res["per_window"]["all"]
        any_geometry = next(iter(step.values()))
        print(
            f"\n{name} lr={res['lr']:g}: {100 * any_geometry['changed_fraction']:.3f}% changed per step, "
            f"{100 * next(iter(win.values()))['changed_fraction']:.3f}% per {window}-step window; "
            f"changed-element encoding = {any_geometry['changed_encoding_vs_full']:.3f} x full per step"
        )
        header = (
            f"{'geometry':>10} {'elems':>5} | {'active/step':>11} {'random':>7} {'B/chg':>6} {'B/full':>6} "
            f"{'rnd B/full':>10} | {'active/win':>10} {'random':>7} {'B/chg':>6} {'B/full':>6} {'rnd B/full':>10}"
        )
        print(header)
        print("-" * len(header))
        for geometry, s in step.items():
            w = win[geometry]
            print(
                f"{geometry:>10} {s['tile_elements']:>5} | {s['active_tile_fraction']:>11.4f} "
                f"{s['active_tile_fraction_random']:>7.4f} {s['bytes_vs_changed_encoding']:>6.2f} "
                f"{s['bytes_vs_full']:>6.3f} {s['bytes_vs_full_random']:>10.3f} | {w['active_tile_fraction']:>10.4f} "
                f"{w['active_tile_fraction_random']:>7.4f} {w['bytes_vs_changed_encoding']:>6.2f} "
                f"{w['bytes_vs_full']:>6.3f} {w['bytes_vs_full_random']:>10.3f}"
            )


def plot(results: dict[str, Any], path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["optimizers"])
    fig, axes = plt.subplots(len(names), 3, figsize=(15, 4.2 * len(names)), squeeze=False)
    panels = (
        ("per_step", "active_tile_fraction", "active-tile fraction, per step"),
        ("per_window", "active_tile_fraction", f"active-tile fraction, {window}-step window"),
        ("per_step", "bytes_vs_full", "bytes shipped / full bf16, per step"),
    )
    for row, name in enumerate(names):
        res = results["optimizers"][name]
        for col, (period, key, title) in enumerate(panels):
            ax = axes[row][col]
            data = res[period]["all"]
            for kind, color in (("1d", "tab:blue"), ("2d", "tab:orange")):
                geoms = [g for g in data if g.startswith(kind)]
                x = [data[g]["tile_elements"] for g in geoms]
                label = "1D runs" if kind == "1d" else "2D blocks"
                ax.plot(x, [data[g][key] for g in geoms], "o-", color=color, label=f"{label} observed")
                ax.plot(x, [data[g][f"{key}_random"] for g in geoms], "x--", color=color, label=f"{label} random")
            if key == "bytes_vs_full":
                changed = next(iter(data.values()))["changed_encoding_vs_full"]
                ax.axhline(changed, color="gray", linestyle=":", label="changed (value, index) pairs")
                ax.axhline(1.0, color="black", linewidth=0.8, label="full tensor")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("elements per tile")
            ax.set_ylim(0, 1.05 if key == "active_tile_fraction" else None)
            ax.set_title(f"{name} lr={res['lr']:g}: {title}", fontsize=10)
            ax.grid(alpha=0.3)
            if col == 0 or key == "bytes_vs_full":
                ax.legend(fontsize=7)
    fig.suptitle(
        f"Tile geometry for changed bf16 weights: {results['params']:,}-param Llama, GRPO (demo), "
        f"{results['steps']} steps",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="GRPO optimizer steps per optimizer")
    parser.add_argument("--optimizers", nargs="+", choices=demo.OPTIMIZERS, default=["rlsgd", "adamw"])
    parser.add_argument("--window", type=int, default=4, help="sync interval (steps) for the accumulated masks")
    parser.add_argument("--out", default=str(RESULTS / "tile_geometry.json"))
    parser.add_argument("--plot", default=str(RESULTS / "tile_geometry.png"))
    args = parser.parse_args(argv)
    if args.steps < args.window:
        parser.error("--steps must be at least --window")
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python bench/bench_tile_geometry.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps": args.steps,
        "window": args.window,
        "value_bytes": VALUE_BYTES,
        "index_bytes": INDEX_BYTES,
        "optimizers": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.optimizers:
            results["optimizers"][name] = run_optimizer(name, args.steps, args.window, Path(tmp))
            print(f"{name}: {results['optimizers'][name]['seconds']:.1f} s", flush=True)
    results["params"] = next(iter(results["optimizers"].values()))["demo"]["params"]
    results["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print_table(results, args.window)
    if args.plot:
        plot(results, Path(args.plot), args.window)
    print(f"\nwrote {out}" + (f", {args.plot}" if args.plot else "") + f"; took {results['seconds']:.1f} s")


if __name__ == "__main__":
    main()
