"""GPU check, one command (``make gpu-check``): the kernel tests on CUDA, then the fused RLSGD step
timed against ``torch.optim.SGD(fused=True)`` and ``torch.optim.AdamW(fused=True)`` on the same
parameters, with the device's copy bandwidth measured in the same run.

    python bench/gpu_check.py [--params 5e8] [--repeats 20] [--skip-tests] [--out PATH]
    python bench/gpu_check.py --smoke      # CPU + Triton interpreter, tiny sizes: checks the script

Rows (median of ``--repeats`` after warm-up, CUDA events):

* ``copy``: ``dst.copy_(src)`` of 3 bytes per parameter (6 bytes moved: the floor of a bf16 SGD
  step that reads weight and gradient and writes the weight);
* ``rlsgd_triton``: ``RLSGD(backend="triton").step()``; bandwidth counted at 6 bytes per parameter
  and as a fraction of the copy bandwidth (the kernel skips writes of unchanged weights, so it can
  move fewer bytes than that);
* ``kernel_plain`` / ``kernel_counts_pack``: the step kernel alone, and with per-tile gate counts
  plus compaction of the changed tiles of all tensors (``pack_changed_tiles``): the overhead;
* ``kernel_all_writes``: the kernel storing every weight (vector stores) instead of only the changed
  ones (predicated stores, the default): which is faster is a GPU measurement;
* ``rlsgd_triton_tracker``: with a PrecisionGateTracker fed by the kernel;
* ``dense_block_adamw_0.05`` / ``_1``: ``DenseBlockAdamW(backend="triton")`` at density 0.05 and 1
  (the fused gather -> AdamW -> scatter kernel), with its state bytes per parameter;
* ``rlsgd_torch``: the torch backend (foreach) on the same tensors;
* ``sgd_fused`` / ``adamw_fused``: torch's fused optimizers.

Writes ``bench/results/gpu_check_<device>.json`` and prints a table and the targets
(>= 85% of copy bandwidth, >= 3x faster than fused AdamW, counts + compaction <= 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GRAD_SCALE = 1e-5  # RL-scale gradients: at lr 0.1 about 1% of the bf16 weights change per step
LR = 0.1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=5e8, help="parameters to step (>= 1e8 for the targets)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-tests", action="store_true", help="only the timings")
    parser.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny sizes")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


def run_kernel_tests() -> dict[str, object]:
    """The interpreter tests, on CUDA tensors (tests/conftest.py leaves the interpreter off when a
    GPU is present). PYTHONSAFEPATH keeps the repository root off sys.path, where the source folder
    kernels/ would shadow the Hugging Face ``kernels`` package."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"]
    command += [
        f"tests/{name}" for name in ("test_tiles.py", "test_dense_block_kernel.py") if (ROOT / "tests" / name).exists()
    ]
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    env.pop("TRITON_INTERPRET", None)
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"command": " ".join(command), "passed": False, "error": repr(error)}
    lines = [line for line in result.stdout.strip().splitlines() if line.strip()]
    return {
        "command": " ".join(command[1:]),
        "passed": result.returncode == 0,
        "returncode": result.returncode,
        "summary": lines[-1] if lines else result.stderr.strip()[-2000:],
        "seconds": round(time.perf_counter() - started, 1),
        "failures": [line for line in lines if line.startswith("FAILED")][:20],
    }


def llama_like(total: float, device: str, hidden: int) -> list:
    """bf16 params shaped like a Llama stack (q, k, v, o, gate, up, down, two norms per layer), with
    bf16 gradients of RL scale."""
    import torch

    inter = int(hidden * 2.75) // 64 * 64
    per_layer = [(hidden, hidden), (hidden // 4, hidden), (hidden // 4, hidden), (hidden, hidden)]
    per_layer += [(inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    layer_numel = sum(torch.Size(shape).numel() for shape in per_layer)
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for _ in range(max(1, round(total / layer_numel))):
        for shape in per_layer:
            weight = torch.randn(shape, generator=generator, device=device).mul_(0.02).to(torch.bfloat16)
            param = torch.nn.Parameter(weight)
            grad = torch.randn(shape, generator=generator, device=device).mul_(GRAD_SCALE)
            param.grad = grad.to(torch.bfloat16)
            params.append(param)
    return params


def timer(device: str, repeats: int):
    import torch

    def measure(step) -> dict[str, float]:
        for _ in range(3):
            step()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                step()
                times.append((time.perf_counter() - began) * 1e3)
        return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}

    return measure


def measure_copy(measure, nbytes: int, device: str) -> dict[str, float]:
    """``dst.copy_(src)`` of ``nbytes`` (reads and writes ``nbytes`` each); buffers freed after."""
    import torch

    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return measure(lambda: target.copy_(source))


def run_timings(args: argparse.Namespace, device: str) -> tuple[dict[str, dict[str, float]], int]:
    import torch

    from sparse_rl_optim import RLSGD, DenseBlockAdamW, PrecisionGateTracker
    from sparse_rl_optim.kernels.launch import pack_changed_tiles, rlsgd_step_triton
    from sparse_rl_optim.optim.sgd import _step_scalars
    from sparse_rl_optim.tiles import DEFAULT_TILE_SIZE

    measure = timer(device, args.repeats)
    params = llama_like(args.params, device, hidden=256 if args.smoke else 2048)
    numel = sum(p.numel() for p in params)
    rows: dict[str, dict[str, float]] = {}

    rows["copy"] = measure_copy(measure, 3 * numel, device)

    rows["rlsgd_triton"] = measure(RLSGD(params, lr=LR, backend="triton").step)
    grads = [p.grad for p in params]
    lr, decay = _step_scalars(torch.float32, LR, 0.0)
    common = dict(lr=lr, decay=decay, momentum=0.0, dampening=0.0, nesterov=False, maximize=False)
    common |= dict(stochastic=False, seeds=[0] * len(params), tile_size=DEFAULT_TILE_SIZE)
    weights = [p.detach() for p in params]
    rows["kernel_plain"] = measure(lambda: rlsgd_step_triton(weights, grads, None, [False] * len(params), **common))
    rows["kernel_all_writes"] = measure(
        lambda: rlsgd_step_triton(weights, grads, None, [False] * len(params), skip_unchanged_writes=False, **common)
    )

    def counts_and_pack() -> None:
        report = rlsgd_step_triton(weights, grads, None, [False] * len(params), count_tiles=True, **common)
        pack_changed_tiles(weights, report)

    rows["kernel_counts_pack"] = measure(counts_and_pack)
    report = rlsgd_step_triton(weights, grads, None, [False] * len(params), count_tiles=True, **common)
    packed = pack_changed_tiles(weights, report)
    changed = sum(int(r.tile_changed.sum()) for r in report.tensors)
    active_tiles = sum(ids.numel() for ids, _ in packed)
    total_tiles = sum(r.tile_changed.numel() for r in report.tensors)
    rows["kernel_counts_pack"]["changed_fraction"] = changed / numel
    rows["kernel_counts_pack"]["active_tile_fraction"] = active_tiles / total_tiles

    optimizer = RLSGD(params, lr=LR, backend="triton")
    tracker = PrecisionGateTracker([(str(i), p) for i, p in enumerate(params)]).attach(optimizer)
    rows["rlsgd_triton_tracker"] = measure(optimizer.step)
    rows["rlsgd_triton_tracker"]["tracker_snapshot_bytes"] = tracker.memory_bytes()["step_snapshot_bytes"]
    tracker.detach()
    del optimizer, tracker

    for density in (0.05, 1.0):
        dense_block = DenseBlockAdamW(params, lr=1e-6, density=density, reselect_every=None, backend="triton")
        rows[f"dense_block_adamw_{density:g}"] = measure(dense_block.step)
        rows[f"dense_block_adamw_{density:g}"]["state_bytes_per_param"] = dense_block.state_bytes() / numel
        del dense_block

    rows["rlsgd_torch"] = measure(RLSGD(params, lr=LR, backend="torch").step)
    rows["sgd_fused"] = measure(torch.optim.SGD(params, lr=LR, fused=True).step)
    adamw = torch.optim.AdamW(params, lr=1e-6, fused=True)
    rows["adamw_fused"] = measure(adamw.step)
    del adamw
    return rows, numel


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or 'cpu'} (Triton interpreter)"


def main() -> None:
    args = parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        args.params = min(args.params, 2e5)
        args.repeats = min(args.repeats, 2)
        args.skip_tests = True
    import torch
    import triton

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("gpu_check.py needs a CUDA device (use --smoke to check the script on a CPU)")
    tests = {"skipped": True} if args.skip_tests else run_kernel_tests()
    rows, numel = run_timings(args, device)

    copy_ms = rows["copy"]["median_ms"]
    for row in rows.values():
        row["gb_per_s_at_6_bytes_per_param"] = 6 * numel / (row["median_ms"] * 1e-3) / 1e9
    step_ms = rows["rlsgd_triton"]["median_ms"]
    targets = {
        "fraction_of_copy_bandwidth": copy_ms / step_ms,
        "speedup_vs_adamw_fused": rows["adamw_fused"]["median_ms"] / step_ms,
        "speedup_vs_sgd_fused": rows["sgd_fused"]["median_ms"] / step_ms,
        "counts_and_pack_overhead": rows["kernel_counts_pack"]["median_ms"] / rows["kernel_plain"]["median_ms"] - 1,
    }
    targets["met"] = {
        "bandwidth_ge_85pct": targets["fraction_of_copy_bandwidth"] >= 0.85,
        "adamw_speedup_ge_3x": targets["speedup_vs_adamw_fused"] >= 3.0,
        "counts_pack_overhead_le_10pct": targets["counts_and_pack_overhead"] <= 0.10,
        "params_ge_1e8": numel >= 1e8,
    }
    name = device_name(device)
    result = {
        "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:]),
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "params": numel,
        "copy_bandwidth_gb_per_s": 6 * numel / (copy_ms * 1e-3) / 1e9,
        "tests": tests,
        "rows": rows,
        "targets": targets,
    }
    out = args.out or RESULTS / f"gpu_check_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_').lower()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{name}: {numel / 1e6:.1f}M bf16 params, copy {result['copy_bandwidth_gb_per_s']:.0f} GB/s (6 B/param)")
    print(f"{'row':24s} {'median ms':>10s} {'GB/s @6B':>9s}")
    for key, row in rows.items():
        print(f"{key:24s} {row['median_ms']:10.3f} {row['gb_per_s_at_6_bytes_per_param']:9.0f}")
    print(json.dumps(targets, indent=2))
    print(f"tests: {tests.get('summary', 'skipped')}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
