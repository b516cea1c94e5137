"""Optimizers: :class:`RLSGD` and its functional form :func:`rlsgd`; :func:`optimizer_state_bytes`."""

from sparse_rl_optim.optim.memory import optimizer_state_bytes
from sparse_rl_optim.optim.sgd import RLSGD, GateStats, rlsgd

__all__ = ["RLSGD", "GateStats", "optimizer_state_bytes", "rlsgd"]
