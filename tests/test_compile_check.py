"""The kernels compile for an H100 (sm_90) on this GPU-less machine, and the code they compile to
keeps the properties the GPU results depend on: no FMA and no approximate division or square root
(bit-exactness with the reference), 16-byte vector loads in full blocks, no register spills
(``bench/compile_check.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90_without_fma_spills_or_scalar_full_blocks(tmp_path):
    out = tmp_path / "compile_check.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compile_check.py"), "--arch", "90", "--out", str(out)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    kernels = json.loads(out.read_text())["kernels"]
    assert len(kernels) == 14
    for name, report in kernels.items():
        assert report["fma"] == 0, name
        assert report["approx"] == 0, name
        assert report["zero_minus"] == 0, name  # unary minus as 0 - x loses the sign of zero
        if "stack_bytes" in report:  # cuobjdump ships with Triton's CUDA backend
            assert report["stack_bytes"] == 0, name
        # Full blocks read with 16-byte vector loads (scalar loads are the masked tail's).
        assert report["memory_instructions"].get("ld.global.v4.b32", 0) >= 2, name
    assert "st.global.v4.b32" in kernels["step bf16 all-writes"]["memory_instructions"]
    # The dense-block step: whole tiles of bf16 weights and fp32 state rows move in 16-byte vectors.
    for name in ("dense adamw bf16", "dense sgd momentum bf16", "dense adamw fp32"):
        assert kernels[name]["memory_instructions"].get("st.global.v4.b32", 0) >= 2, name


def test_launches_turn_fp_fusion_off():
    """The compile check above compiles as the launcher launches: with FMA contraction off."""
    from sparse_rl_optim.kernels.launch import _launch_options, block_size

    assert _launch_options(block_size(64))["enable_fp_fusion"] is False
