"""Shared test settings: hypothesis without deadlines (2 shared CPU cores make timing noisy), and
derandomized under CI so a CI run is reproducible (local runs keep exploring new examples)."""

import os

from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=25,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
