"""Benchmark suite, one command (``make bench``): optimizer step time, state bytes, memory and bandwidth of
RLSGD, its gate tracking and DenseBlockAdamW against torch / bitsandbytes / torchao peers, on the real
layer shapes of open LLMs (``bench/shapes.py``).

    python bench/suite.py                                   # CPU default: 1.8M, 5.5M, 19M params (~15 s idle)
    python bench/suite.py --quick                           # smoke run, one tiny set, 3 repeats (< 30 s)
    python bench/suite.py --device cuda                     # adds Qwen2.5-0.5B (494M) and 1.5B (1.54B)
    python bench/suite.py --sets qwen2.5-7b-4layers --optimizers adamw-fused,rlsgd-triton
    python bench/suite.py --list                            # optimizer keys and default sets

Per parameter set: bf16 parameters of the set's shapes with bf16 gradients of RL scale (as
``bench_step.py``: at lr 0.1 about 1% of the weights change per step), the same tensors for every
optimizer. Measured in one run:

* ``copy``: the device's copy bandwidth, ``dst.copy_(src)`` of 3 bytes per parameter (int32; 6 bytes moved,
  the floor of a bf16 SGD step: read weight and gradient, write the weight);
* per optimizer: ``step()`` time, median / min / max over ``--repeats`` rounds after two warm-up rounds,
  the optimizers interleaved round by round (A, B, C, A, B, C, ...) so machine drift hits all alike;
  the ratio to ``torch AdamW (foreach)`` (always run: the baseline); GB/s counted at 6 bytes per
  parameter (an SGD-equivalent rate; Adam-like steps move more) and its fraction of the copy bandwidth;
  optimizer-state bytes per parameter (``optimizer_state_bytes``: every tensor in ``optimizer.state``);
  memory over construction + first step: on CUDA the peak allocated above what was allocated before
  (``torch.cuda.max_memory_allocated``), on CPU the growth of the resident set (torch keeps no CPU
  allocator statistics; approximate: freed memory may be reused, so it is not a peak);
* gate tracking: RLSGD with a ``PrecisionGateTracker`` attached, interleaved with a plain RLSGD of
  the same backend on a copy of the tensors (the tracker's hooks would count other optimizers' steps as
  outside edits): its overhead, the tracker's bytes per parameter and the changed fraction per step;
* gate counts + compaction (CUDA): the Triton step kernel with per-tile gate counts and
  ``pack_changed_tiles`` against the plain kernel (as ``gpu_check.py``): the overhead.

Peers that cannot run here (no CUDA, not installed, an error) are rows with ``status: skipped`` and the
reason. Writes ``<out-dir>/suite.json`` (machine, versions, commit, command, rows), ``suite.md`` (a table
per set) and ``suite.png`` (step time against size, log-log; state bytes per parameter). Progress goes
to stderr.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ (also under PYTHONSAFEPATH=1)

import torch
from bench_step import GRAD_SCALE, cpu_name, interleaved_times, synchronize, time_it
from shapes import CPU_DEFAULT_SETS, GPU_DEFAULT_SETS, QUICK_SETS, count_params, set_shapes

from sparse_rl_optim import RLSGD, DenseBlockAdamW, PrecisionGateTracker, optimizer_state_bytes

ROOT = Path(__file__).resolve().parents[1]
LOAD_AT_START = os.getloadavg()  # other processes' load makes CPU timings noisy: recorded with the results
BASELINE = "adamw-foreach"
SGD_LR, ADAM_LR = 0.1, 1e-6

# key -> label, in table order
OPTIMIZERS = {
    "adamw-foreach": "torch AdamW (foreach)",
    "adamw-fused": "torch AdamW (fused)",
    "sgd-foreach": "torch SGD (foreach)",
    "sgd-fused": "torch SGD (fused)",
    "bnb-adamw8bit": "bitsandbytes AdamW8bit",
    "bnb-paged-adamw8bit": "bitsandbytes PagedAdamW8bit",
    "torchao-adamw8bit": "torchao AdamW8bit",
    "torchao-adamw4bit": "torchao AdamW4bit",
    "rlsgd-torch": "RLSGD (torch)",
    "rlsgd-triton": "RLSGD (triton)",
    "rlsgd-gate-tracking": "RLSGD + PrecisionGateTracker",
    "dense-block-adamw": "DenseBlockAdamW (density 0.05)",
    "kernel-plain": "RLSGD triton kernel (plain)",
    "kernel-gate-counts-compaction": "RLSGD triton kernel + gate counts + compaction",
}


class Skip(Exception):
    """An optimizer that cannot run here; the message is the reason recorded."""


STARTED = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sets", default=None, help="comma-separated set names (bench/shapes.py)")
    parser.add_argument("--optimizers", default=None, help="comma-separated keys (--list); default: all")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10; --quick: 3)")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: bench/results/<device>")
    parser.add_argument("--quick", action="store_true", help="smoke run: one tiny set, 3 repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--list", action="store_true", help="print the optimizer keys and default sets, exit")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    default_sets = QUICK_SETS if args.quick else GPU_DEFAULT_SETS if args.device == "cuda" else CPU_DEFAULT_SETS
    args.sets = args.sets.split(",") if args.sets else list(default_sets)
    for name in args.sets:
        set_shapes(name)  # fails early on a bad name
    args.optimizers = args.optimizers.split(",") if args.optimizers else list(OPTIMIZERS)
    unknown = [key for key in args.optimizers if key not in OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; known: {', '.join(OPTIMIZERS)}")
    if BASELINE not in args.optimizers:
        args.optimizers.insert(0, BASELINE)
    args.optimizers = [key for key in OPTIMIZERS if key in args.optimizers]  # table order
    args.repeats = args.repeats or (3 if args.quick else 10)
    args.out_dir = args.out_dir or ROOT / "bench" / "results" / args.device
    return args


def make_params(shapes: list[tuple[str, tuple[int, ...]]], device: str) -> list[torch.nn.Parameter]:
    """bf16 params (std 0.02) with bf16 gradients of RL scale, generated on ``device``."""
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for _, shape in shapes:
        weight = torch.randn(shape, generator=generator, device=device).mul_(0.02).to(torch.bfloat16)
        param = torch.nn.Parameter(weight)
        param.grad = torch.randn(shape, generator=generator, device=device).mul_(GRAD_SCALE).to(torch.bfloat16)
        params.append(param)
    return params


def clone_params(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    clones = []
    for param in params:
        clone = torch.nn.Parameter(param.detach().clone())
        clone.grad = param.grad.clone()
        clones.append(clone)
    return clones


def torchao_optimizers():
    try:
        from torchao.optim import AdamW4bit, AdamW8bit
    except ImportError:
        try:
            from torchao.prototype.low_bit_optim import AdamW4bit, AdamW8bit
        except ImportError as error:
            raise Skip(f"torchao not installed ({error})") from None
    return AdamW8bit, AdamW4bit


def build(key: str, params: list[torch.nn.Parameter], device: str):
    """An object with ``step()`` for ``key``, or :class:`Skip`."""
    cuda = device == "cuda"
    if key == "adamw-foreach":
        return torch.optim.AdamW(params, lr=ADAM_LR, foreach=True)
    if key == "adamw-fused":
        return torch.optim.AdamW(params, lr=ADAM_LR, fused=True)
    if key == "sgd-foreach":
        return torch.optim.SGD(params, lr=SGD_LR, foreach=True)
    if key == "sgd-fused":
        return torch.optim.SGD(params, lr=SGD_LR, fused=True)
    if key in ("bnb-adamw8bit", "bnb-paged-adamw8bit"):
        if key == "bnb-paged-adamw8bit" and not cuda:
            raise Skip("paged optimizers need CUDA (bitsandbytes falls back to plain AdamW8bit on CPU)")
        try:
            import bitsandbytes as bnb
        except Exception as error:
            raise Skip(f"bitsandbytes not importable ({error!r})") from None
        cls = bnb.optim.PagedAdamW8bit if key == "bnb-paged-adamw8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=ADAM_LR)
    if key in ("torchao-adamw8bit", "torchao-adamw4bit"):
        adamw8bit, adamw4bit = torchao_optimizers()
        if not cuda:
            raise Skip("torchao low-bit optimizers are benchmarked on CUDA only")
        return (adamw8bit if key == "torchao-adamw8bit" else adamw4bit)(params, lr=ADAM_LR)
    if key == "rlsgd-torch":
        return RLSGD(params, lr=SGD_LR, backend="torch")
    if key in ("rlsgd-triton", "kernel-plain", "kernel-gate-counts-compaction"):
        if not cuda:
            raise Skip("the Triton kernels need a CUDA device (on CPU only the interpreter, not a timing)")
        if key == "rlsgd-triton":
            return RLSGD(params, lr=SGD_LR, backend="triton")
        return kernel_step(params, counts_and_pack=key == "kernel-gate-counts-compaction")
    if key == "dense-block-adamw":
        return DenseBlockAdamW(params, lr=ADAM_LR, density=0.05)
    raise KeyError(key)


def kernel_step(params: list[torch.nn.Parameter], counts_and_pack: bool) -> SimpleNamespace:
    """The RLSGD Triton step kernel called directly (as ``gpu_check.py``), with or without per-tile
    gate counts and the compaction of the changed tiles of all tensors."""
    from sparse_rl_optim.kernels.launch import pack_changed_tiles, rlsgd_step_triton
    from sparse_rl_optim.optim.sgd import _step_scalars
    from sparse_rl_optim.tiles import DEFAULT_TILE_SIZE

    weights, grads = [p.detach() for p in params], [p.grad for p in params]
    lr, decay = _step_scalars(torch.float32, SGD_LR, 0.0)
    common = dict(lr=lr, decay=decay, momentum=0.0, dampening=0.0, nesterov=False, maximize=False)
    common |= dict(stochastic=False, seeds=[0] * len(params), tile_size=DEFAULT_TILE_SIZE)
    flags = [False] * len(params)

    def step() -> None:
        report = rlsgd_step_triton(weights, grads, None, flags, count_tiles=counts_and_pack, **common)
        if counts_and_pack:
            pack_changed_tiles(weights, report)

    return SimpleNamespace(step=step, state={})


def rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class MemoryProbe:
    """Memory over a block: CUDA peak allocated above the start, or CPU resident-set growth."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> MemoryProbe:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.bytes = max(0, rss_bytes() - self.start) if self.start else None


MEMORY_KIND = {
    "cuda": "peak allocated over construction + first step (torch.cuda.max_memory_allocated)",
    "cpu": "resident-set growth over construction + first step (not a peak: torch has no CPU allocator stats)",
}


def copy_bandwidth(numel: int, device: str, repeats: int) -> float:
    """GB/s of ``dst.copy_(src)`` of ~3 bytes per parameter, read + write counted; buffers freed after.
    int32 elements: a uint8 ``copy_`` is not vectorized on CPU (~100x below what the memory allows)."""
    source = torch.empty((3 * numel + 3) // 4, dtype=torch.int32, device=device)
    target = torch.empty_like(source)
    seconds = time_it(lambda: target.copy_(source), device, repeats)[0]
    return 2 * source.nbytes / seconds / 1e9


def timing_fields(samples: list[float], numel: int, copy_gbps: float) -> dict:
    median = statistics.median(samples)
    gbps = 6 * numel / median / 1e9
    return {
        "median_ms": 1e3 * median,
        "min_ms": 1e3 * min(samples),
        "max_ms": 1e3 * max(samples),
        "gbps_at_6_bytes_per_param": gbps,
        "fraction_of_copy_bandwidth": gbps / copy_gbps,
    }


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_set(set_name: str, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    shapes = set_shapes(set_name)
    numel = count_params(shapes)
    device = args.device
    progress(f"{set_name}: {numel / 1e6:.1f}M params in {len(shapes)} tensors, building on {device}")
    params = make_params(shapes, device)

    copy_gbps = copy_bandwidth(numel, device, args.repeats)
    progress(f"{set_name}: copy bandwidth {copy_gbps:.1f} GB/s")

    info = {"set": set_name, "params": numel, "tensors": len(shapes), "copy_gbps": copy_gbps}
    rows: dict[str, dict] = {}
    built: dict[str, object] = {}
    optimizer = probe = None
    for key in args.optimizers:
        row = {"set": set_name, "params": numel, "optimizer": key, "label": OPTIMIZERS[key]}
        rows[key] = row
        if key == "rlsgd-gate-tracking":
            continue  # its own phase below
        try:
            with warnings.catch_warnings(), MemoryProbe(device) as probe:
                warnings.simplefilter("ignore")  # lr-scale and CPU-fallback notices: irrelevant to timing
                optimizer = build(key, params, device)
                optimizer.step()  # state is allocated in the first step
                synchronize(device)
        except Skip as reason:
            row |= {"status": "skipped", "reason": str(reason)}
            continue
        except Exception as error:
            if is_oom(error):
                torch.cuda.empty_cache()
            row |= {"status": "skipped", "reason": f"failed: {error!r}"[:500]}
            progress(f"{set_name}: {key} skipped: {error!r}"[:300])
            continue
        built[key] = optimizer
        state = optimizer_state_bytes(optimizer) if isinstance(optimizer, torch.optim.Optimizer) else 0
        row |= {
            "status": "ok",
            "state_bytes": state,
            "state_bytes_per_param": state / numel,
            "memory_bytes": probe.bytes,
            "memory_kind": MEMORY_KIND[device],
        }

    progress(f"{set_name}: timing {len(built)} optimizers, {args.repeats} interleaved rounds")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = interleaved_times(built, device, args.repeats)
    for key, values in samples.items():
        rows[key] |= timing_fields(values, numel, copy_gbps)
    del built, optimizer, probe
    if "kernel-gate-counts-compaction" in samples and "kernel-plain" in samples:
        overhead = statistics.median(samples["kernel-gate-counts-compaction"]) / statistics.median(
            samples["kernel-plain"]
        )
        rows["kernel-gate-counts-compaction"]["overhead_vs_plain_kernel"] = overhead - 1

    if "rlsgd-gate-tracking" in rows:
        measure_tracking(rows["rlsgd-gate-tracking"], params, args, copy_gbps)

    baseline = rows[BASELINE].get("median_ms")
    for row in rows.values():
        if row.get("status") == "ok" and baseline:
            row["ratio_vs_adamw_foreach"] = row["median_ms"] / baseline
    if device == "cuda":
        torch.cuda.empty_cache()
    return info, list(rows.values())


def measure_tracking(row: dict, params: list[torch.nn.Parameter], args: argparse.Namespace, copy_gbps: float) -> None:
    """RLSGD + PrecisionGateTracker interleaved with a plain RLSGD (same backend) on a copy of the tensors."""
    device, numel = args.device, row["params"]
    backend = "triton" if device == "cuda" else "torch"
    progress(f"{row['set']}: gate tracking (RLSGD backend={backend} + PrecisionGateTracker vs plain RLSGD)")
    try:
        clones = clone_params(params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = RLSGD(clones, lr=SGD_LR, backend=backend)
            with MemoryProbe(device) as probe:
                tracked = RLSGD(params, lr=SGD_LR, backend=backend)
                tracker = PrecisionGateTracker([(str(i), p) for i, p in enumerate(params)]).attach(tracked)
                tracked.step()
                synchronize(device)
            samples = interleaved_times({"plain": plain, "tracked": tracked}, device, args.repeats)
    except Exception as error:
        if is_oom(error):
            torch.cuda.empty_cache()
        row |= {"status": "skipped", "reason": f"failed: {error!r}"[:500]}
        return
    memory = tracker.memory_bytes()
    row |= {
        "status": "ok",
        "state_bytes": optimizer_state_bytes(tracked),
        "state_bytes_per_param": optimizer_state_bytes(tracked) / numel,
        "memory_bytes": probe.bytes,
        "memory_kind": MEMORY_KIND[device],
        **timing_fields(samples["tracked"], numel, copy_gbps),
        "backend": backend,
        "plain_rlsgd_median_ms": 1e3 * statistics.median(samples["plain"]),
        "overhead_vs_plain_rlsgd": statistics.median(samples["tracked"]) / statistics.median(samples["plain"]) - 1,
        "tracker_persistent_bytes_per_param": memory["persistent_bytes_per_param"],
        "tracker_step_snapshot_bytes_per_param": memory["step_snapshot_bytes_per_param"],
        "changed_fraction_per_step": tracker.summary()["mean_changed_fraction"],
    }
    tracker.detach()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> dict:
    def git(*command: str) -> str | None:
        try:
            result = subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def machine(device: str) -> dict:
    info = {
        "device": device,
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "load_average_at_start": LOAD_AT_START,
        "load_average_at_end": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def markdown(result: dict) -> str:
    lines = [
        f"# Optimizer step benchmark ({result['machine']['device']})",
        "",
        f"`{result['command']}`",
        "",
        f"Machine: {result['machine'].get('gpu') or result['machine']['cpu']} ({result['machine']['cpu_threads']} "
        f"torch threads); torch {result['versions']['torch']}, bitsandbytes {result['versions']['bitsandbytes']}, "
        f"triton {result['versions']['triton']}, torchao {result['versions']['torchao']}; "
        f"commit {result['git']['commit']}{' (dirty)' if result['git']['dirty'] else ''}; "
        f"{result['repeats']} interleaved rounds; bf16 params and grads; load average "
        f"{result['machine']['load_average_at_start'][0]:.1f} at start, {result['machine']['load_average_at_end'][0]:.1f} at end.",
        "",
        "Step time: median (min-max). x AdamW: median over torch AdamW (foreach) in the same run. GB/s counted "
        "at 6 bytes/param (SGD-equivalent) and as a fraction of the copy bandwidth measured in the same run. "
        f"Memory: {MEMORY_KIND[result['machine']['device']]}.",
    ]
    for info in result["sets"]:
        rows = [r for r in result["rows"] if r["set"] == info["set"]]
        lines += [
            "",
            f"## {info['set']}: {info['params']:,} params, {info['tensors']} tensors, "
            f"copy {info['copy_gbps']:.1f} GB/s",
            "",
            "| optimizer | step ms | min-max ms | x AdamW | GB/s @6B | x copy BW | state B/param | memory MiB | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        skipped = []
        for row in rows:
            if row["status"] != "ok":
                skipped.append(f"- {row['label']}: {row['reason']}")
                continue
            notes = []
            if "overhead_vs_plain_rlsgd" in row:
                notes.append(
                    f"+{100 * row['overhead_vs_plain_rlsgd']:.0f}% vs plain RLSGD; tracker "
                    f"{row['tracker_persistent_bytes_per_param']:.2f} B/param; "
                    f"{100 * row['changed_fraction_per_step']:.2f}% changed/step"
                )
            if "overhead_vs_plain_kernel" in row:
                notes.append(f"+{100 * row['overhead_vs_plain_kernel']:.0f}% vs plain kernel")
            memory = "n/a" if row.get("memory_bytes") is None else f"{row['memory_bytes'] / 2**20:.1f}"
            lines.append(
                f"| {row['label']} | {row['median_ms']:.2f} | {row['min_ms']:.2f}-{row['max_ms']:.2f} "
                f"| {row.get('ratio_vs_adamw_foreach', float('nan')):.2f} | {row['gbps_at_6_bytes_per_param']:.1f} "
                f"| {row['fraction_of_copy_bandwidth']:.2f} | {row['state_bytes_per_param']:.3f} | {memory} "
                f"| {'; '.join(notes)} |"
            )
        if skipped:
            lines += ["", "Skipped:", *skipped]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Step time against parameters (log-log, one line per optimizer); state bytes per parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [row for row in result["rows"] if row["status"] == "ok"]
    labels = [label for label in OPTIMIZERS.values() if any(row["label"] == label for row in ok)]
    figure, (time_axis, state_axis) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    for label in labels:
        points = sorted((row["params"], row["median_ms"]) for row in ok if row["label"] == label)
        time_axis.plot(*zip(*points, strict=True), marker="o", label=label)
    time_axis.set_xscale("log")
    time_axis.set_yscale("log")
    time_axis.set_xlabel("parameters (bf16)")
    time_axis.set_ylabel("step time (ms, median)")
    time_axis.grid(True, which="both", alpha=0.3)
    time_axis.legend(fontsize=7)
    largest = max(result["sets"], key=lambda info: info["params"])["set"]
    state = {row["label"]: row["state_bytes_per_param"] for row in ok if row["set"] == largest}
    names = [label for label in labels if label in state]
    state_axis.barh(names, [state[name] for name in names], color="tab:orange")
    state_axis.invert_yaxis()
    state_axis.set_xlabel("optimizer state (bytes per parameter)")
    state_axis.set_title(largest, fontsize=8)
    state_axis.tick_params(axis="y", labelsize=7)
    state_axis.grid(True, axis="x", alpha=0.3)
    name = result["machine"].get("gpu") or result["machine"]["cpu"]
    figure.suptitle(f"optimizer step, {name} ({result['machine']['device']})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.list:
        print("optimizers:", ", ".join(OPTIMIZERS))
        print("CPU default sets:", ", ".join(CPU_DEFAULT_SETS))
        print("GPU default sets:", ", ".join(GPU_DEFAULT_SETS))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    command = "python bench/suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    progress(f"{command}: sets {', '.join(args.sets)}; {len(args.optimizers)} optimizers; {args.repeats} repeats")
    sets, rows = [], []
    for set_name in args.sets:
        info, set_rows = run_set(set_name, args)
        sets.append(info)
        rows += set_rows
    result = {
        "command": command.strip(),
        "machine": machine(args.device),
        "versions": {
            name: package_version(name) for name in ("torch", "triton", "bitsandbytes", "torchao", "sparse-rl-optim")
        },
        "git": git_commit(),
        "repeats": args.repeats,
        "baseline": BASELINE,
        "sets": sets,
        "rows": rows,
        "wall_seconds": time.perf_counter() - started,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "suite.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out_dir / "suite.md").write_text(table)
    if not args.no_plot:
        plot(result, args.out_dir / "suite.png")
    print(table)
    progress(f"wrote {args.out_dir}/suite.json, suite.md{'' if args.no_plot else ', suite.png'}")


if __name__ == "__main__":
    main()
