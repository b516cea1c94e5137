"""Optimizers: :class:`RLSGD` and its functional form :func:`rlsgd`."""

from sparse_rl_optim.optim.sgd import RLSGD, GateStats, rlsgd

__all__ = ["RLSGD", "GateStats", "rlsgd"]
