"""Sparse weight deltas: ship and store only what changed, bit-exact; extrapolate the trajectory.

* :mod:`.encoding` - one tensor's change: ``tiles`` (dense tiles, fastest to apply on a GPU) or
  ``sparse`` (delta-coded positions and bit-pattern differences, compressed: for the wire and disk);
* :mod:`.packet` - :class:`DeltaPacket`, :class:`DeltaSender`, :class:`DeltaReceiver`: sequenced,
  checksummed packets applied in place to a replica, refused when missing, repeated, reordered,
  corrupted or for a replica that does not match;
* :mod:`.checkpoint` - delta checkpoints (safetensors packets plus a manifest) and ``rebuild``;
  command line: ``sparse-rl-optim-deltas``;
* :mod:`.relex` - RELEX rank-1 trajectory extrapolation; command line: ``sparse-rl-optim-relex``.
"""

from sparse_rl_optim.deltas.checkpoint import CheckpointError, DeltaCheckpointWriter, read_manifest, rebuild
from sparse_rl_optim.deltas.packet import (
    DeltaPacket,
    DeltaReceiver,
    DeltaSender,
    PacketError,
    load_packet,
    make_packet,
    save_packet,
)
from sparse_rl_optim.deltas.relex import TrajectoryFit, fit_trajectory, load_checkpoint

__all__ = [
    "CheckpointError",
    "DeltaCheckpointWriter",
    "DeltaPacket",
    "DeltaReceiver",
    "DeltaSender",
    "PacketError",
    "TrajectoryFit",
    "fit_trajectory",
    "load_checkpoint",
    "load_packet",
    "make_packet",
    "read_manifest",
    "rebuild",
    "save_packet",
]
