"""Which implementation runs: the one home of ``backend="auto" | "torch" | "triton"``.

``auto`` runs the Triton kernels when every tensor is on a CUDA device (and triton imports), torch
otherwise. ``triton`` on CPU tensors runs Triton's interpreter, which must have been switched on
with ``TRITON_INTERPRET=1`` before the kernels were imported (Triton reads it then).
"""

from __future__ import annotations

import functools
import os
import sys

import torch
from torch import Tensor

__all__ = ["BACKENDS", "check_backend", "check_triton_available", "interpreter_active", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; expected one of {BACKENDS}")
    return backend


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_active() -> bool:
    """Whether the kernels run in Triton's interpreter (fixed when they are first imported)."""
    if os.environ.get("TRITON_INTERPRET") != "1" and "sparse_rl_optim.kernels.launch" not in sys.modules:
        return False  # not importing Triton just to answer "no"
    if not triton_importable():
        return False
    from sparse_rl_optim.kernels.launch import interpreting

    return interpreting()


def resolve_backend(backend: str, tensors: list[Tensor]) -> str:
    """``"triton"`` or ``"torch"`` for these tensors."""
    if check_backend(backend) == "auto":
        on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
        return "triton" if on_cuda and triton_importable() else "torch"
    return backend


def check_triton_available(device: torch.device, what: str = "backend='triton'") -> None:
    """Raise a clear error if the Triton kernels cannot run on ``device``."""
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{what} runs on CUDA devices, not on {device.type!r}")
    if not triton_importable():
        raise RuntimeError(f"{what} needs the triton package (pip install triton)")
    if device.type == "cpu" and not interpreter_active():
        raise RuntimeError(
            f"{what} got CPU tensors: the Triton kernels run on CUDA devices, or on the CPU under the "
            "Triton interpreter (set TRITON_INTERPRET=1 before importing sparse_rl_optim; slow, for "
            "tests). Use backend='auto' or 'torch' on the CPU."
        )
