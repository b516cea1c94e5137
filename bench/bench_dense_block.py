"""Dense-block AdamW: optimizer-state bytes and step time against density, with torch's AdamW.

    python bench/bench_dense_block.py [--params 20e6] [--device cpu|cuda] [--repeats 10]

The same Llama-shaped bf16 tensors and RL-scale gradients as ``bench_step.py``. For each density,
``DenseBlockAdamW`` (tiles fixed after the first step, ``reselect_every=None``: the steady state) and,
the defaults at density 0.05 (``select="grad"``, ``reselect_every=100``: gradient energy accumulated every
step; the timed steps do not reach a reselection), and, as baselines in the same run, ``torch.optim.AdamW`` (foreach; for bf16 params torch keeps bf16
moments, 4 B/param) and ``RLSGD``: median ``step()`` time (optimizers interleaved round by round),
measured state bytes, and the median time of a step that also reselects the tiles of every tensor
(``select="grad"``, ``reselect_every=1``).
Writes ``bench/results/dense_block_<device>.json`` and ``.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from bench_step import RESULTS, cpu_name, interleaved_times, model_shaped_tensors, synchronize

from sparse_rl_optim import RLSGD, DenseBlockAdamW, optimizer_state_bytes

DENSITIES = (0.01, 0.05, 0.25, 1.0)


def reselecting_step_seconds(params: list[torch.Tensor], density: float, device: str) -> float:
    """Median seconds of a ``step()`` that also reselects every blocked tensor's tiles by gradient
    energy (``reselect_every=1``; 3 samples after the first step), to set beside a plain step."""
    optimizer = DenseBlockAdamW(params, lr=1e-6, density=density, reselect_every=1)
    optimizer.step()  # first selection and state
    samples = []
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        optimizer.step()  # reselects (every step), then steps
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=20e6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    params = model_shaped_tensors(int(args.params), args.device)
    numel = sum(p.numel() for p in params)
    optimizers: dict[str, torch.optim.Optimizer] = {
        f"DenseBlockAdamW density={density:g}": DenseBlockAdamW(params, lr=1e-6, density=density, reselect_every=None)
        for density in DENSITIES
    }
    optimizers["DenseBlockAdamW density=0.05, defaults"] = DenseBlockAdamW(params, lr=1e-6, density=0.05)
    optimizers["torch AdamW (foreach)"] = torch.optim.AdamW(params, lr=1e-6, foreach=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the AdamW-scale lr warning: irrelevant to timing
        optimizers["RLSGD"] = RLSGD(params, lr=0.1)
    times = interleaved_times(optimizers, args.device, args.repeats)

    rows = []
    for name, optimizer in optimizers.items():
        state = optimizer_state_bytes(optimizer)
        row = {
            "optimizer": name,
            "median_ms": 1e3 * statistics.median(times[name]),
            "min_ms": 1e3 * min(times[name]),
            "max_ms": 1e3 * max(times[name]),
            "state_bytes": state,
            "state_bytes_per_param": state / numel,
        }
        if isinstance(optimizer, DenseBlockAdamW):
            row["density"] = optimizer.param_groups[0]["density"]
            row["state_report"] = optimizer.state_bytes_report()
            if row["density"] < 1.0:  # (at density 1 every tile is active: nothing to reselect)
                row["reselecting_step_ms"] = 1e3 * reselecting_step_seconds(params, row["density"], args.device)
        rows.append(row)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    result = {
        "command": f"python bench/bench_dense_block.py --params {args.params:g} --device {args.device} "
        f"--repeats {args.repeats}",
        "device": device_name,
        "torch": torch.__version__,
        "params": numel,
        "tensors": len(params),
        "rows": rows,
    }
    output = args.output or RESULTS / f"dense_block_{args.device}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"{numel / 1e6:.1f}M bf16 params in {len(params)} tensors on {device_name}, torch {torch.__version__}")
    print(f"{'optimizer':<40} {'ms/step':>9} {'state B/param':>14} {'reselecting step ms':>20}")
    for row in rows:
        reselect = f"{row['reselecting_step_ms']:>20.1f}" if "reselecting_step_ms" in row else f"{'':>20}"
        print(f"{row['optimizer']:<40} {row['median_ms']:>9.2f} {row['state_bytes_per_param']:>14.3f} {reselect}")
    plot(result, output.with_suffix(".png"))
    print(f"wrote {output} and {output.with_suffix('.png')}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense_rows = [row for row in result["rows"] if "density" in row and "defaults" not in row["optimizer"]]
    baselines = [row for row in result["rows"] if "density" not in row]
    defaults = [row for row in result["rows"] if "defaults" in row["optimizer"]]
    densities = [row["density"] for row in dense_rows]
    figure, (memory, speed) = plt.subplots(1, 2, figsize=(10, 4))
    memory.plot(densities, [row["state_bytes_per_param"] for row in dense_rows], "o-", label="DenseBlockAdamW")
    memory.plot(densities, [8 * d for d in densities], "--", color="gray", label="8 x density (the bound)")
    speed.plot(densities, [row["median_ms"] for row in dense_rows], "o-", label="DenseBlockAdamW")
    for row in defaults:
        memory.plot([row["density"]], [row["state_bytes_per_param"]], "s", color="tab:purple", label=row["optimizer"])
        speed.plot([row["density"]], [row["median_ms"]], "s", color="tab:purple", label=row["optimizer"])
    for row, color in zip(baselines, ("tab:red", "tab:green"), strict=False):
        memory.axhline(row["state_bytes_per_param"], color=color, linestyle=":", label=row["optimizer"])
        speed.axhline(row["median_ms"], color=color, linestyle=":", label=row["optimizer"])
    for axis, label in ((memory, "optimizer state, bytes per parameter"), (speed, "step time, ms (median)")):
        axis.set_xscale("log")
        axis.set_xlabel("density (fraction of tiles with AdamW state)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"{result['params'] / 1e6:.1f}M bf16 params, {result['device']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
