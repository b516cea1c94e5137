"""Compile the Triton kernels for a GPU without one, and report what the code does with memory.

    python bench/compile_check.py [--arch 90] [--out PATH]

For each configuration of the fused step kernel (bf16/fp32 params, momentum, tile counts, tracker
records, skipped or full writes), the multi-tensor pack and the dense-block step (AdamW bf16/fp32,
SGD with momentum), ``triton.compile`` builds PTX and a cubin for ``sm_<arch>`` on this machine
(Triton ships ptxas). Reported per kernel: the global load and store instructions in the PTX by
width (``ld.global.v4.b32`` = 16-byte vector loads), the number of FMA instructions (must be 0: the
kernels are launched with ``enable_fp_fusion=False`` so that they round like the torch reference),
the number of approximate or flush-to-zero fp32 instructions (must be 0: ``div.full``,
``sqrt.approx``, ... are what plain ``/`` and ``tl.sqrt`` compile to) and, from
``cuobjdump -res-usage``, registers and stack bytes (spills). Pointer arguments are marked 16-byte
aligned, as the launcher sees them at run time.

This checks code generation for the Triton version installed (the GPU machines have 3.6); it runs
nothing and times nothing. Writes ``bench/results/compile_check_sm<arch>_triton<version>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparse_rl_optim.kernels.bits import BF16, FP32
from sparse_rl_optim.kernels.dense_block_step import ADAMW, SGD, dense_block_step_kernel
from sparse_rl_optim.kernels.rlsgd_step import rlsgd_step_kernel
from sparse_rl_optim.kernels.tiles import pack_block_tiles_kernel

RESULTS = Path(__file__).resolve().parent / "results"
ALIGNED_16 = [["tt.divisibility", 16]]
STEP_SIGNATURE = {
    **dict.fromkeys(["param_addresses", "grad_addresses", "buffer_addresses", "numels"], "*i64"),
    **dict.fromkeys(["seed_mixes", "stream_offsets", "first_step", "block_start"], "*i64"),
    **dict.fromkeys(["block_tensor", "tile_changed", "block_intended", "block_swallowed"], "*i32"),
    **{"block_old_checksum": "*i32", "changed_words": "*i32", "old_gate_bits": "*i16"},
    **dict.fromkeys(["lr", "decay", "momentum", "dampening_keep"], "fp32"),
}
STEP_CONFIGS = {
    "bf16 skip-writes": {},
    "bf16 all-writes": {"SKIP_UNCHANGED_WRITES": False},
    "bf16 tile counts": {"COUNT_TILES": True},
    "bf16 momentum": {"HAS_MOMENTUM": True},
    "bf16 momentum maximize": {"HAS_MOMENTUM": True, "MAXIMIZE": True},
    "bf16 stochastic": {"STOCHASTIC": True},
    "bf16 tracker record": {"COUNT_TILES": True, "GATE_STATS": True, "RECORD": True},
    "fp32 params": {"PARAM_KIND": FP32.value, "GRAD_KIND": FP32.value},
}
STEP_DEFAULTS = {
    "PARAM_KIND": BF16.value,
    "GRAD_KIND": BF16.value,
    **dict.fromkeys(["HAS_MOMENTUM", "NESTEROV", "MAXIMIZE", "STOCHASTIC", "HAS_DECAY"], False),
    **dict.fromkeys(["COUNT_TILES", "GATE_STATS", "RECORD"], False),
    "SKIP_UNCHANGED_WRITES": True,
    "ALIGNED": True,
    "BLOCK": 4096,
    "TILE": 64,
}
DENSE_SIGNATURE = {
    **dict.fromkeys(["param_addresses", "grad_addresses", "state1_addresses", "state2_addresses"], "*i64"),
    **dict.fromkeys(["tile_id_addresses", "tile_step_addresses", "numels", "row_counts", "block_row"], "*i64"),
    "block_tensor": "*i32",
    "bias_table": "*fp32",
    "bias_rows": "i32",
    **dict.fromkeys(["lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps"], "fp32"),
    **dict.fromkeys(["decay", "momentum", "dampening_keep"], "fp32"),
}
DENSE_CONFIGS = {
    "adamw bf16": {},
    "sgd momentum bf16": {"ALGORITHM": SGD.value, "HAS_MOMENTUM": True},
    "adamw maximize bf16": {"MAXIMIZE": True},
    "adamw fp32": {"PARAM_KIND": FP32.value, "GRAD_KIND": FP32.value},
}
DENSE_DEFAULTS = {
    "ALGORITHM": ADAMW.value,
    "PARAM_KIND": BF16.value,
    "GRAD_KIND": BF16.value,
    "HAS_DECAY": True,
    **dict.fromkeys(["MAXIMIZE", "HAS_MOMENTUM", "NESTEROV"], False),
    "ALIGNED": True,
    "ROWS": 64,  # block_size(64) // 64 on a GPU
    "TILE": 64,
}
PACK_SIGNATURE = {
    **dict.fromkeys(["addresses", "numels", "block_start", "tile_slots", "packed_ids"], "*i64"),
    "block_tensor": "*i32",
    "packed": "*i16",
}


def compile_kernel(kernel, signature: dict, constants: dict, arch: int) -> dict:
    signature = {**signature, **dict.fromkeys(constants, "constexpr")}
    aligned = {(i,): ALIGNED_16 for i, name in enumerate(kernel.arg_names) if signature[name].startswith("*")}
    compiled = triton.compile(
        ASTSource(kernel, signature, constants, aligned),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": 8, "enable_fp_fusion": False},
    )
    ptx = compiled.asm["ptx"]
    memory_ops = Counter(re.findall(r"^\s*(?:@!?%p\d+\s+)?((?:ld|st)\.global[\w.]*)", ptx, re.M))
    return {
        "memory_instructions": dict(sorted(memory_ops.items())),
        "fma": len(re.findall(r"\bfma\.", ptx)),
        # Approximate or flush-to-zero fp32 math (plain `/` and tl.sqrt): must be 0 where the reference
        # rounds correctly (the dense-block step uses tl.div_rn / tl.sqrt_rn).
        "approx": len(re.findall(r"\b(?:div|sqrt|rcp|rsqrt|ex2|lg2)\.(?:approx|full)\b|\.ftz\.", ptx)),
        "zero_minus": zero_minus_count(ptx),
        **resource_usage(compiled.asm.get("cubin")),
    }


def zero_minus_count(ptx: str) -> int:
    """Subtractions ``0.0 - x``: how Triton 3.6 compiles unary minus on floats. It gives +0 for +0
    where torch's negation gives -0, so the kernels flip the sign bit instead (``bits.negate32``)."""
    zeros = set(re.findall(r"mov\.b32\s+(%r\d+),\s*0f00000000;", ptx))
    return sum(1 for first in re.findall(r"sub(?:\.rn)?\.f32\s+%r\d+,\s*(%r\d+),", ptx) if first in zeros)


def resource_usage(cubin: bytes | None) -> dict:
    """Registers and stack bytes per thread from the cubin, with the cuobjdump Triton bundles."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cubin is None or not tool.exists():
        return {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        report = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", report)
    return {"registers": int(found.group(1)), "stack_bytes": int(found.group(2))} if found else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    kernels = {}
    for name, overrides in STEP_CONFIGS.items():
        kernels[f"step {name}"] = compile_kernel(
            rlsgd_step_kernel, STEP_SIGNATURE, {**STEP_DEFAULTS, **overrides}, args.arch
        )
    for name, element_bytes, packed in (("bf16", 2, "*i16"), ("fp32", 4, "*i32")):
        constants = {"ELEMENT_BYTES": element_bytes, "ALIGNED": True, "BLOCK": 4096, "TILE": 64}
        kernels[f"pack {name}"] = compile_kernel(
            pack_block_tiles_kernel, {**PACK_SIGNATURE, "packed": packed}, constants, args.arch
        )
    for name, overrides in DENSE_CONFIGS.items():
        kernels[f"dense {name}"] = compile_kernel(
            dense_block_step_kernel, DENSE_SIGNATURE, {**DENSE_DEFAULTS, **overrides}, args.arch
        )
    result = {
        "command": "python bench/compile_check.py --arch " + str(args.arch),
        "triton": triton.__version__,
        "target": f"sm_{args.arch}",
        "kernels": kernels,
    }
    out = args.out or RESULTS / f"compile_check_sm{args.arch}_triton{triton.__version__}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, report in kernels.items():
        ops = ", ".join(f"{op} x{count}" for op, count in report["memory_instructions"].items())
        usage = f"{report.get('registers', '?')} regs, {report.get('stack_bytes', '?')} B stack"
        print(f"{name:24s} fma={report['fma']} approx={report['approx']} {usage}: {ops}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
