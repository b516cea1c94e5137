"""Shared test settings: hypothesis without deadlines (2 shared CPU cores make timing noisy), and
derandomized under CI so a CI run is reproducible (local runs keep exploring new examples).

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors: the variable must be
set before any module that defines kernels is imported, so it is set here. With a GPU
(``make gpu-check``) the same tests run the compiled kernels on CUDA tensors.
"""

import os

import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=25,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
