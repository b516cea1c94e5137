"""Optimizer step time and optimizer-state memory: RLSGD against the optimizers people use.

    python bench/bench_step.py [--params 20e6] [--device cpu|cuda] [--repeats 20]

Builds bf16 tensors shaped like a Llama's (a few large matrices, some vectors), gives them bf16
gradients of RL scale (at lr 0.1 about 1% of the weights change per step) and times
``optimizer.step()`` for each optimizer in one run (``RLSGD fused`` compiles during warm-up) (median, min and max of ``--repeats`` after
warm-up), also with a PrecisionGateTracker attached, and measures the bytes each holds in state. The device's copy bandwidth is measured
in the same run (``dst.copy_(src)`` of the same number of bytes as a 6-byte-per-parameter step).
Writes ``bench/results/step_<device>.json`` and ``.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from sparse_rl_optim import RLSGD, PrecisionGateTracker, optimizer_state_bytes

RESULTS = Path(__file__).resolve().parent / "results"
GRAD_SCALE = 1e-5


def model_shaped_tensors(total: int, device: str) -> list[torch.Tensor]:
    """bf16 params whose sizes mimic a decoder layer stack: q,k,v,o, gate/up/down, norms."""
    hidden = 512
    per_layer = [(hidden, hidden), (hidden // 4, hidden), (hidden // 4, hidden), (hidden, hidden)]
    per_layer += [(4 * hidden, hidden), (4 * hidden, hidden), (hidden, 4 * hidden), (hidden,), (hidden,)]
    layer_numel = sum(torch.Size(shape).numel() for shape in per_layer)
    generator = torch.Generator().manual_seed(0)
    params = []
    for _ in range(max(1, round(total / layer_numel))):
        for shape in per_layer:
            value = (0.02 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
            param = torch.nn.Parameter(value.to(device))
            # RL-scale gradients: at lr 0.1 about 1% of the bf16 weights change per step (as in RL on LLMs).
            param.grad = (GRAD_SCALE * torch.randn(shape, generator=generator)).to(torch.bfloat16).to(device)
            params.append(param)
    return params


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or "cpu"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device: str, repeats: int) -> tuple[float, float, float]:
    """(median, min, max) seconds of ``fn()`` over ``repeats`` runs after two warm-up runs."""
    for _ in range(2):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), min(samples), max(samples)


def interleaved_times(optimizers: dict, device: str, repeats: int) -> dict[str, list[float]]:
    """Seconds per ``step()`` of each optimizer, ``repeats`` rounds of one step each, after two
    warm-up rounds (``fused=True`` compiles in its first)."""
    samples: dict[str, list[float]] = {name: [] for name in optimizers}
    for round_index in range(repeats + 2):
        for name, optimizer in optimizers.items():
            synchronize(device)
            start = time.perf_counter()
            optimizer.step()
            synchronize(device)
            if round_index >= 2:
                samples[name].append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=20e6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    params = model_shaped_tensors(int(args.params), args.device)
    numel = sum(p.numel() for p in params)
    source = torch.empty(numel * 3, dtype=torch.int16, device=args.device)  # 6 bytes per parameter
    target = torch.empty_like(source)
    copy_seconds = time_it(lambda: target.copy_(source), args.device, args.repeats)[0]
    copy_bandwidth = 2 * source.numel() * source.element_size() / copy_seconds  # read + write

    candidates = {
        "RLSGD": lambda ps: RLSGD(ps, lr=0.1),
        "RLSGD fused": lambda ps: RLSGD(ps, lr=0.1, fused=True, backend="torch"),
        "RLSGD momentum 0.9": lambda ps: RLSGD(ps, lr=0.1, momentum=0.9),
        "RLSGD reference path": lambda ps: RLSGD(ps, lr=0.1, foreach=False),
        "torch SGD (foreach)": lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=True),
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-6, foreach=True),
    }
    if args.device == "cuda":
        # On CUDA "RLSGD" is the Triton kernel (backend="auto"); "RLSGD fused" the torch.compile path.
        candidates["RLSGD torch backend"] = lambda ps: RLSGD(ps, lr=0.1, backend="torch")
        candidates["torch SGD (fused)"] = lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True)
        candidates["torch AdamW (fused)"] = lambda ps: torch.optim.AdamW(ps, lr=1e-6, fused=True)

    candidates["RLSGD + PrecisionGateTracker"] = lambda ps: RLSGD(ps, lr=0.1)

    # Steps interleaved round by round (A, B, C, A, B, C, ...), so drifts of the machine (caches,
    # memory pressure) hit every optimizer alike; the tracker row runs alone afterwards (its hooks
    # would count the other optimizers' steps as edits made outside its optimizer's step).
    tracked_name = "RLSGD + PrecisionGateTracker"
    optimizers = {name: build(params) for name, build in candidates.items() if name != tracked_name}
    samples = interleaved_times(optimizers, args.device, args.repeats)
    optimizer = candidates[tracked_name](params)
    tracker = PrecisionGateTracker([(f"p{i}", p) for i, p in enumerate(params)]).attach(optimizer)
    samples[tracked_name] = interleaved_times({tracked_name: optimizer}, args.device, args.repeats)[tracked_name]
    optimizers[tracked_name] = optimizer
    changed = tracker.summary()["mean_changed_fraction"]
    tracker.detach()

    rows = []
    for name in candidates:
        seconds = statistics.median(samples[name])
        rows.append(
            {
                "optimizer": name,
                "step_ms": 1e3 * seconds,
                "step_ms_min": 1e3 * min(samples[name]),
                "step_ms_max": 1e3 * max(samples[name]),
                "state_bytes_per_param": optimizer_state_bytes(optimizers[name]) / numel,
                "effective_bandwidth_fraction_at_6_bytes": 6 * numel / seconds / copy_bandwidth,
                "tracked_changed_fraction_per_step": changed if name == tracked_name else None,
            }
        )
    del optimizers, optimizer

    machine = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    result = {
        "command": f"python bench/bench_step.py --params {args.params:g} --device {args.device} --repeats {args.repeats}",
        "device": args.device,
        "machine": machine,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "params": numel,
        "tensors": len(params),
        "copy_bandwidth_GBps": copy_bandwidth / 1e9,
        "results": rows,
        "ratio_to_torch_sgd_foreach": {
            row["optimizer"]: row["step_ms"]
            / next(r["step_ms"] for r in rows if r["optimizer"] == "torch SGD (foreach)")
            for row in rows
        },
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"step_{args.device}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"{numel / 1e6:.1f}M bf16 params in {len(params)} tensors on {machine} ({args.device}), torch {torch.__version__}"
    )
    print(f"copy bandwidth {copy_bandwidth / 1e9:.1f} GB/s (read + write)")
    print(f"{'optimizer':<30} {'step ms (min-max)':>22} {'state B/param':>14} {'x SGD time':>11}")
    baseline = next(row["step_ms"] for row in rows if row["optimizer"] == "torch SGD (foreach)")
    for row in rows:
        print(
            f"{row['optimizer']:<30} {row['step_ms']:>8.2f} ({row['step_ms_min']:>5.1f}-{row['step_ms_max']:>5.1f}) "
            f"{row['state_bytes_per_param']:>14.2f} "
            f"{row['step_ms'] / baseline:>11.2f}"
        )
    plot_path = RESULTS / f"step_{args.device}.png"
    plot(result, plot_path)
    print(f"wrote {out} and {plot_path}")


def plot(result: dict, path: Path) -> None:
    """Two bar charts: step time and optimizer-state bytes per parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["optimizer"] for row in result["results"]]
    figure, (time_axis, state_axis) = plt.subplots(1, 2, figsize=(11, 3.6))
    time_axis.barh(names, [row["step_ms"] for row in result["results"]], color="tab:blue")
    time_axis.set_xlabel("step time (ms, median)")
    state_axis.barh(names, [row["state_bytes_per_param"] for row in result["results"]], color="tab:orange")
    state_axis.set_xlabel("optimizer state (bytes per parameter)")
    state_axis.set_yticklabels([])
    for axis in (time_axis, state_axis):
        axis.invert_yaxis()
        axis.grid(True, axis="x", alpha=0.3)
    figure.suptitle(f"{result['params'] / 1e6:.1f}M bf16 params, {result['machine']} ({result['device']})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
