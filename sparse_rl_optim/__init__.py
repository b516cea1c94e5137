"""sparse_rl_optim: cheaper, faster, observable optimizer steps for RL fine-tuning of LLMs.

Public API::

    from sparse_rl_optim import RLSGD, PrecisionGateTracker
    from sparse_rl_optim import DenseBlockAdamW, DenseBlockSGD  # state and updates on dense tiles
    from sparse_rl_optim import DeltaSender, DeltaReceiver  # ship only what changed, verified
    from sparse_rl_optim import count_changed_tiles, pack_tiles, apply_tiles  # dense tiles
"""

from sparse_rl_optim.deltas import (
    DeltaCheckpointWriter,
    DeltaPacket,
    DeltaReceiver,
    DeltaSender,
    PacketError,
    ShardedDeltaSender,
    fit_trajectory,
)
from sparse_rl_optim.optim import RLSGD, DenseBlockAdamW, DenseBlockSGD, GateStats, optimizer_state_bytes, rlsgd
from sparse_rl_optim.tiles import PackedTiles, apply_tiles, count_changed_tiles, pack_tiles
from sparse_rl_optim.tracker import PrecisionGateTracker

__version__ = "0.1.0"

__all__ = [
    "RLSGD",
    "DeltaCheckpointWriter",
    "DeltaPacket",
    "DeltaReceiver",
    "DeltaSender",
    "DenseBlockAdamW",
    "DenseBlockSGD",
    "GateStats",
    "PackedTiles",
    "PacketError",
    "PrecisionGateTracker",
    "ShardedDeltaSender",
    "__version__",
    "apply_tiles",
    "count_changed_tiles",
    "fit_trajectory",
    "optimizer_state_bytes",
    "pack_tiles",
    "rlsgd",
]
