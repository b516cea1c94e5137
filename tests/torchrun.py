"""Run a worker script of ``tests/distributed/`` under ``torchrun --nproc_per_node N`` (gloo, CPU).

Each worker asserts what it checks and exits non-zero on a failure; the launching test fails with
the workers' output. Workers write what the test reads back (JSON) into ``out_dir``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).parent / "distributed"


def run_torchrun(script: str, out_dir: Path, *args: str, nproc: int = 2, timeout: float = 300) -> str:
    """Run ``tests/distributed/<script>`` on ``nproc`` CPU processes; return the combined output."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRITON_INTERPRET": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port per launch, so launches may run side by side
        f"--nproc_per_node={nproc}",
        str(WORKERS / script),
        "--out",
        str(out_dir),
        *args,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(f"{script} failed under torchrun (exit {result.returncode}):\n{output[-8000:]}")
    return output
