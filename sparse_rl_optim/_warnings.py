"""Warnings that point at the user's line, not at the package or torch.optim internals."""

from __future__ import annotations

import os
import sys
import warnings

import torch

_INTERNAL_DIRS = (
    os.path.dirname(os.path.abspath(__file__)),
    os.path.dirname(os.path.abspath(torch.optim.__file__)),
    os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "utils"),
    os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "_compile.py"),
    os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "_dynamo"),
)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside this package and torch's optimizer
    machinery (an optimizer's constructor, ``step`` wrapper and hooks)."""
    frame = sys._getframe(1)  # warn()'s caller, which warnings.warn counts as stacklevel 2
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
