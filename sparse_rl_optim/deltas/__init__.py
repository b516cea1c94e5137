"""Sparse weight deltas: ship and store only what changed, bit-exact; extrapolate the trajectory.

* :mod:`.encoding` - one tensor's change: ``tiles`` (dense tiles, fastest to apply on a GPU) or
  ``sparse`` (delta-coded positions and bit-pattern differences, compressed: for the wire and disk);
* :mod:`.packet` - :class:`DeltaPacket`, :class:`DeltaSender`, :class:`DeltaReceiver`: sequenced,
  checksummed packets applied in place to a replica, refused when missing, repeated, reordered,
  corrupted or for a replica that does not match;
* :mod:`.sharded` - :class:`ShardedDeltaSender` on every rank encodes only its shards (FSDP2
  ``DTensor`` parameters, DDP replicas) in full-tensor coordinates; :func:`assemble_packets` /
  :func:`gather_packets` make the ranks' packets one full-tensor :class:`DeltaPacket`, verified;
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
    packet_to_bytes,
    save_packet,
)
from sparse_rl_optim.deltas.relex import TrajectoryFit, fit_trajectory, load_checkpoint
from sparse_rl_optim.deltas.sharded import (
    ShardedDeltaSender,
    ShardPacket,
    assemble_packets,
    gather_packets,
    gather_shard_packets,
    shard_packet_from_bytes,
    shard_packet_to_bytes,
)

__all__ = [
    "CheckpointError",
    "DeltaCheckpointWriter",
    "DeltaPacket",
    "DeltaReceiver",
    "DeltaSender",
    "PacketError",
    "ShardPacket",
    "ShardedDeltaSender",
    "TrajectoryFit",
    "assemble_packets",
    "fit_trajectory",
    "gather_packets",
    "gather_shard_packets",
    "load_checkpoint",
    "load_packet",
    "make_packet",
    "packet_to_bytes",
    "read_manifest",
    "rebuild",
    "save_packet",
    "shard_packet_from_bytes",
    "shard_packet_to_bytes",
]
