"""Delta packets: what changed in a set of named tensors since the last packet, verified end to end.

A packet holds, per tensor that changed, its change (:mod:`.encoding`), the checksum of the tensor
before (the replica must match it) and after (the result must match it), a sequence number and the
sequence number it follows. An *anchor* holds every tensor in full and follows nothing: it starts
(or restarts) a chain. :class:`DeltaSender` keeps the weights as last shipped and makes packets;
:class:`DeltaReceiver` applies them to a replica (another model or state dict, any device) in
place, bit-exact, and refuses, with a clear error and without touching the replica, a packet that is
missing, repeated, out of order or corrupted, or a replica that does not hold what the packet
expects.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sparse_rl_optim.deltas.encoding import ENCODINGS, EncodedTensor, decode_into, encode_change, tensor_checksum
from sparse_rl_optim.tiles import DEFAULT_TILE_SIZE, _bits_dtype, check_tile_size

__all__ = [
    "DeltaPacket",
    "DeltaReceiver",
    "DeltaSender",
    "PacketError",
    "load_packet",
    "make_packet",
    "packet_to_bytes",
    "save_packet",
]


class PacketError(ValueError):
    """A packet that must not be applied: missing, repeated, out of order, corrupted, or for a
    replica that does not hold what it expects."""


@dataclass
class DeltaPacket:
    """Changes of named tensors since packet ``follows`` (``None`` for an anchor, which holds every
    tensor in full as ``full``). ``before``/``after``: per changed tensor, :func:`tensor_checksum`
    of the replica's tensor before and after applying; ``payload_crc``: CRC32 of each change's
    bytes; ``step``: the optimizer step of the weights it brings (informational)."""

    sequence: int
    follows: int | None
    changes: dict[str, EncodedTensor] = field(default_factory=dict)
    full: dict[str, Tensor] = field(default_factory=dict)
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    payload_crc: dict[str, int] = field(default_factory=dict)
    step: int | None = None

    @property
    def is_anchor(self) -> bool:
        return self.follows is None

    def nbytes(self) -> int:
        """Bytes of the tensors the packet carries (changes, or full tensors for an anchor)."""
        return sum(c.nbytes() for c in self.changes.values()) + sum(
            t.numel() * t.element_size() for t in self.full.values()
        )


def _payload_crc(encoded: EncodedTensor) -> int:
    crc = zlib.crc32(f"{encoded.encoding}:{encoded.count}:{encoded.tile_size}".encode())
    for part in (encoded.tile_ids, encoded.values, encoded.positions, encoded.differences):
        if part is not None:
            crc = zlib.crc32(part.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(), crc)
    return crc


def _full_crc(tensor: Tensor) -> int:
    return zlib.crc32(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def make_packet(
    old: Mapping[str, Tensor],
    new: Mapping[str, Tensor],
    *,
    sequence: int,
    follows: int | None,
    encoding: str = "auto",
    tile_size: int = DEFAULT_TILE_SIZE,
    step: int | None = None,
    old_checksums: Mapping[str, int] | None = None,
) -> DeltaPacket:
    """The packet that turns ``old`` into ``new`` (same names, shapes and dtypes), or, with
    ``follows=None``, the anchor holding ``new`` in full. ``encoding``: ``"tiles"``, ``"sparse"`` or
    ``"auto"`` (per tensor the smaller). ``old_checksums``: :func:`tensor_checksum` of the ``old``
    tensors where already known (the previous packet's ``after``), to skip recomputing them."""
    if encoding not in (*ENCODINGS, "auto"):
        raise ValueError(f"Unknown encoding {encoding!r}; expected one of {(*ENCODINGS, 'auto')}")
    packet = DeltaPacket(sequence=sequence, follows=follows, step=step)
    if follows is None:
        for name, tensor in new.items():
            packet.full[name] = tensor.detach().cpu().clone()
            packet.after[name] = tensor_checksum(tensor)
            packet.payload_crc[name] = _full_crc(tensor)
        return packet
    if set(old) != set(new):
        raise ValueError(f"old and new name different tensors: {sorted(set(old) ^ set(new))[:5]}")
    for name, tensor in new.items():
        encoded = encode_change(old[name], tensor, encoding, tile_size)
        if encoded.count == 0:
            continue
        packet.changes[name] = encoded
        known = old_checksums.get(name) if old_checksums is not None else None
        packet.before[name] = known if known is not None else tensor_checksum(old[name])
        packet.after[name] = tensor_checksum(tensor)
        packet.payload_crc[name] = _payload_crc(encoded)
    return packet


def _named_tensors(target: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(target, nn.Module):
        return {name: p for name, p in target.named_parameters()}
    return dict(target)


def check_sender_options(encoding: str, anchor_every: int | None) -> None:
    """Raise ``ValueError`` for an unknown encoding or an ``anchor_every`` below 1 (any sender)."""
    if encoding not in (*ENCODINGS, "auto"):
        raise ValueError(f"Unknown encoding {encoding!r}; expected one of {(*ENCODINGS, 'auto')}")
    if anchor_every is not None and anchor_every < 1:
        raise ValueError(f"anchor_every must be >= 1 or None, got {anchor_every}")


class DeltaSender:
    """Makes packets from named tensors (a model's parameters, or a dict of tensors that the caller
    keeps updating in place) against a copy of what was last shipped.

    ``anchor_every``: every this many packets an anchor instead (and the first packet is one), so a
    replica can always be rebuilt and a chain never grows without bound. ``snapshot_device``: where
    the copy of the last-shipped tensors lives (``"cpu"`` keeps it off the GPU).
    """

    def __init__(
        self,
        tensors: nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
        *,
        encoding: str = "auto",
        tile_size: int = DEFAULT_TILE_SIZE,
        anchor_every: int | None = 100,
        snapshot_device: str | torch.device | None = None,
    ) -> None:
        check_sender_options(encoding, anchor_every)
        self.tensors = _named_tensors(tensors if isinstance(tensors, (nn.Module, Mapping)) else dict(tensors))
        for name, tensor in self.tensors.items():
            _bits_dtype(tensor.dtype)  # a clear error for a dtype whose bits cannot be moved
            if not tensor.is_floating_point():
                raise TypeError(f"{name}: delta packets carry floating tensors, not {tensor.dtype}")
        self.encoding = encoding
        self.tile_size = check_tile_size(tile_size)
        self.anchor_every = anchor_every
        self.snapshot_device = snapshot_device
        self.sequence = 0
        self._shipped: dict[str, Tensor] | None = None
        self._checksums: dict[str, int] = {}  # of the shipped tensors (each packet's ``after``)
        self._since_anchor = 0

    def packet(self, *, step: int | None = None, anchor: bool = False) -> DeltaPacket:
        """The next packet: everything that changed since the previous one (an anchor when asked,
        when due, and the first time)."""
        current = {name: t.detach() for name, t in self.tensors.items()}
        due = (
            self._shipped is None
            or anchor
            or (self.anchor_every is not None and self._since_anchor >= self.anchor_every)
        )
        self.sequence += 1
        if due:
            packet = make_packet({}, current, sequence=self.sequence, follows=None, step=step)
            self._since_anchor = 0
        else:
            packet = make_packet(
                self._shipped,
                current,
                sequence=self.sequence,
                follows=self.sequence - 1,
                encoding=self.encoding,
                tile_size=self.tile_size,
                step=step,
                old_checksums=self._checksums,
            )
        if packet.is_anchor:
            self._checksums = {}
        self._checksums.update(packet.after)
        self._since_anchor += 1
        self._shipped = {name: t.to(self.snapshot_device or t.device, copy=True) for name, t in current.items()}
        return packet


class DeltaReceiver:
    """Applies packets to a replica in place, in sequence, verified: before anything is written
    it checks the sequence, each change's CRC and the replica tensor's checksum against the
    packet's ``before``; it then checks the result against ``after`` (and restores the replica's old
    values if that fails). ``sequence``: the last packet applied (``None``: needs an anchor)."""

    def __init__(self, replica: nn.Module | Mapping[str, Tensor]) -> None:
        self.tensors = _named_tensors(replica)
        self.sequence: int | None = None

    def reset(self) -> None:
        """Forget the chain (after the sender restarted): the next packet must be an anchor."""
        self.sequence = None

    def apply(self, packet: DeltaPacket) -> None:
        """Apply ``packet`` in place, or raise :class:`PacketError` and leave the replica untouched."""
        if packet.is_anchor:
            if self.sequence is not None and packet.sequence <= self.sequence:
                raise PacketError(
                    f"anchor {packet.sequence} is older than the replica (at packet {self.sequence}): a replayed or "
                    "stale anchor would roll it back (after a sender restart, call reset() first)"
                )
            self._apply_anchor(packet)
            return
        if self.sequence is None:
            raise PacketError(f"packet {packet.sequence} is a delta, but this replica has no anchor yet")
        if packet.follows != self.sequence:
            problem = "repeated or older" if packet.sequence <= self.sequence else "out of order (one is missing)"
            raise PacketError(
                f"packet {packet.sequence} follows packet {packet.follows}, but the replica is at packet "
                f"{self.sequence}: {problem}"
            )
        unknown = sorted(set(packet.changes) - set(self.tensors))
        if unknown:
            raise PacketError(f"packet {packet.sequence} changes tensors the replica does not have: {unknown[:5]}")
        writes = []
        for name, encoded in packet.changes.items():
            if _payload_crc(encoded) != packet.payload_crc.get(name):
                raise PacketError(f"packet {packet.sequence}: the change of {name!r} is corrupted (CRC mismatch)")
            target = self.tensors[name]
            if tensor_checksum(target) != packet.before.get(name):
                raise PacketError(
                    f"packet {packet.sequence}: the replica's {name!r} does not hold what the packet was made "
                    "against (checksum mismatch): it missed or changed something"
                )
            try:
                positions, values = decode_into(target, encoded)
            except (ValueError, zlib.error) as error:
                raise PacketError(f"packet {packet.sequence}: the change of {name!r} cannot be decoded: {error}")  # noqa: B904
            if name not in packet.after:
                raise PacketError(f"packet {packet.sequence}: no result checksum for {name!r} (malformed packet)")
            writes.append((name, target, positions, values))
        done = []
        for name, target, positions, values in writes:
            bits = _flat_bits(target)
            old = bits[positions].clone()
            bits[positions] = values
            _write_back(target, bits)
            done.append((target, positions, old))
            if tensor_checksum(target) != packet.after[name]:
                for undo_target, undo_positions, undo_old in reversed(done):
                    undo_bits = _flat_bits(undo_target)
                    undo_bits[undo_positions] = undo_old
                    _write_back(undo_target, undo_bits)
                raise PacketError(f"packet {packet.sequence}: {name!r} does not match the sender's after applying")
        self.sequence = packet.sequence

    def _apply_anchor(self, packet: DeltaPacket) -> None:
        if set(packet.full) != set(self.tensors):
            missing = sorted(set(self.tensors) ^ set(packet.full))
            raise PacketError(f"anchor {packet.sequence} and the replica name different tensors: {missing[:5]}")
        for name, tensor in packet.full.items():
            target = self.tensors[name]
            if tensor.shape != target.shape or tensor.dtype != target.dtype:
                raise PacketError(f"anchor {packet.sequence}: {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                                  f"the replica's {tuple(target.shape)} {target.dtype}")  # fmt: skip
            if _full_crc(tensor) != packet.payload_crc.get(name):
                raise PacketError(f"anchor {packet.sequence}: {name!r} is corrupted (CRC mismatch)")
            # The checksum does not depend on the device: verified before anything is written.
            if tensor_checksum(tensor) != packet.after.get(name):
                raise PacketError(f"anchor {packet.sequence}: {name!r} does not match the sender's")
        with torch.no_grad():
            for name, tensor in packet.full.items():
                self.tensors[name].copy_(tensor.to(self.tensors[name].device))
        # Read back: a replica whose tensors alias each other, or live on the meta device, cannot hold it.
        wrong = [name for name in packet.full if tensor_checksum(self.tensors[name]) != packet.after[name]]
        if wrong:
            self.sequence = None
            raise PacketError(
                f"anchor {packet.sequence}: after writing, the replica's {wrong[:5]} do not hold the anchor "
                "(tensors sharing storage, or on the meta device?); the replica needs a new anchor"
            )
        self.sequence = packet.sequence


def _flat_bits(tensor: Tensor) -> Tensor:
    """A flat integer view of the tensor's bits (a copy if it is not contiguous)."""
    return tensor.detach().reshape(-1).view(_bits_dtype(tensor.dtype))


def _write_back(target: Tensor, bits: Tensor) -> None:
    if not target.is_contiguous():
        with torch.no_grad():
            target.copy_(bits.view(target.dtype).view(target.shape))


# -- on disk ------------------------------------------------------------------------------------


def save_packet(packet: DeltaPacket, path: str | os.PathLike[str]) -> int:
    """Write a packet as one safetensors file (tensors plus JSON metadata); returns its size in bytes."""
    data = packet_to_bytes(packet)
    with open(path, "wb") as handle:
        handle.write(data)
    return len(data)


def packet_to_bytes(packet: DeltaPacket) -> bytes:
    """The packet as the bytes of a safetensors file (what :func:`save_packet` writes, what a wire carries)."""
    from safetensors.torch import save

    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {
        "sequence": packet.sequence,
        "follows": packet.follows,
        "step": packet.step,
        "before": packet.before,
        "after": packet.after,
        "payload_crc": packet.payload_crc,
        "changes": {},
    }
    for name, tensor in packet.full.items():
        tensors[f"full/{name}"] = tensor.contiguous()
    for name, encoded in packet.changes.items():
        meta["changes"][name] = {"encoding": encoded.encoding, "count": encoded.count, "tile_size": encoded.tile_size}
        for part in ("tile_ids", "values", "positions", "differences"):
            value = getattr(encoded, part)
            if value is not None:
                tensors[f"{part}/{name}"] = value.contiguous()
    return save(tensors, metadata={"sparse_rl_optim.packet": json.dumps(meta, separators=(",", ":"))})


def load_packet(path: str | os.PathLike[str]) -> DeltaPacket:
    """Read a packet written by :func:`save_packet`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if "sparse_rl_optim.packet" not in metadata:
            raise PacketError(f"{path} is not a delta packet (no sparse_rl_optim.packet metadata)")
        meta = json.loads(metadata["sparse_rl_optim.packet"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    packet = DeltaPacket(
        sequence=meta["sequence"],
        follows=meta["follows"],
        step=meta["step"],
        before={k: int(v) for k, v in meta["before"].items()},
        after={k: int(v) for k, v in meta["after"].items()},
        payload_crc={k: int(v) for k, v in meta["payload_crc"].items()},
    )
    for key, tensor in tensors.items():
        part, name = key.split("/", 1)
        if part == "full":
            packet.full[name] = tensor
    for name, info in meta["changes"].items():
        packet.changes[name] = EncodedTensor(
            info["encoding"],
            info["count"],
            info["tile_size"],
            **{part: tensors.get(f"{part}/{name}") for part in ("tile_ids", "values", "positions", "differences")},
        )
    return packet
