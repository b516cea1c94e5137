"""Installation layout: the public API, and no top-level ``kernels`` module from this project."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sparse_rl_optim

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_public_api_at_top_level():
    from sparse_rl_optim import RLSGD, PrecisionGateTracker, rlsgd

    assert set(sparse_rl_optim.__all__) >= {"RLSGD", "PrecisionGateTracker", "rlsgd", "GateStats"}
    assert RLSGD.__module__ == "sparse_rl_optim.optim.sgd"
    assert callable(rlsgd) and PrecisionGateTracker.__doc__


def test_kernels_installed_under_the_package_only():
    # Run from a directory outside the repository, so the check sees what the installation provides
    # (the repository root on sys.path would expose the source folder ``kernels/`` by accident).
    code = (
        "import importlib.util, sparse_rl_optim.kernels as k; "
        "spec = importlib.util.find_spec('kernels'); "
        "print(k.__file__); print(spec.origin if spec else None)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    kernels_file, top_level_origin = result.stdout.strip().splitlines()
    assert Path(kernels_file).resolve() == (PROJECT_ROOT / "kernels" / "__init__.py").resolve()
    assert top_level_origin == "None" or not Path(top_level_origin).resolve().is_relative_to(PROJECT_ROOT)
