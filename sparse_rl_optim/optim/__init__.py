"""Optimizers: :class:`RLSGD` (and its functional form :func:`rlsgd`), the dense-block optimizers
:class:`DenseBlockAdamW` and :class:`DenseBlockSGD`; :func:`optimizer_state_bytes`."""

from sparse_rl_optim.optim.dense_block import DenseBlockAdamW, DenseBlockSGD
from sparse_rl_optim.optim.memory import optimizer_state_bytes
from sparse_rl_optim.optim.sgd import RLSGD, GateStats, rlsgd

__all__ = ["RLSGD", "DenseBlockAdamW", "DenseBlockSGD", "GateStats", "optimizer_state_bytes", "rlsgd"]
