"""Delta packets from sharded weights: every rank encodes only the elements it holds, and the ranks'
packets reassemble into the full-tensor packet a single-process :class:`~.packet.DeltaSender` makes.

Under FSDP2 (``fully_shard``) a parameter is a ``DTensor`` whose local shard is one contiguous run
``[start, stop)`` of the full tensor's row-major elements
(:func:`sparse_rl_optim.distributed.shard_span`). :class:`ShardedDeltaSender` runs on every rank: it
keeps a snapshot of its own shards only, diffs and encodes them (no all-gather of weights) and emits
a :class:`ShardPacket` in *global* coordinates: positions and tile ids are those of the full tensor,
and the packet names each tensor's global shape, dtype and this rank's span, so the receiving end
needs to know nothing about the sharding. A replicated parameter (a DDP replica, a replicated
``DTensor``) is encoded by one rank only (:func:`sparse_rl_optim.distributed.counts_here`); the other
ranks list it with an empty span.

:func:`assemble_packets` turns the world's shard packets for one sync into one
:class:`~.packet.DeltaPacket` for the full tensors, which a :class:`~.packet.DeltaReceiver` applies to
a full replica. The result is the packet a single-process ``DeltaSender`` with the same settings
would have made from the full tensors, byte for byte (``packet_to_bytes`` of the two are equal): the
``sparse`` changes are decoded and re-encoded as one stream; ``tiles`` are merged, a tile that
straddles two shards put together from both ranks' parts (each rank adds its part of such a tile as
*context* when it did not change there itself); anchors are the shards concatenated. The full
tensors' checksums come without the weights: :func:`~.encoding.tensor_checksum` is a shape term plus
a sum of per-element terms that depend on the element's global position, so each rank sends its
shard's partial sum (:func:`~.encoding.partial_checksum`) and the sums add up.

Integrity: each shard packet carries a CRC32 of its header (sequence, rank, world size, shapes,
spans, partial checksums, encodings) and of each payload. :func:`assemble_packets` verifies them,
that exactly one packet came from every rank ``0 .. world_size - 1``, that all are from the same sync
(sequence, follows, step, anchor or delta), that the non-empty spans of each tensor tile it exactly,
and that every position and tile lies in its rank's span; any failure raises
:class:`~.packet.PacketError` before anything is written to a replica (the receiver then checks the
full tensors' checksums before and after, and rolls back, as for any packet).

Encodings: ``"sparse"`` (the default; the wire format, no collective), ``"tiles"`` (no collective;
a rank whose span starts or ends inside a tile adds its part of that tile to every delta, at most
``2 * (tile_size - 1)`` elements per tensor, none when shard boundaries fall on tile boundaries, as
they do for row sizes that are multiples of the tile size), ``"auto"`` (per tensor the smaller of the
two, decided on the sizes summed over the ranks: :meth:`ShardedDeltaSender.packet` is then a
collective, one all-reduce of three integers per tensor, and ``auto`` may pick the other encoding
than a single process would where the two sizes are within the few bytes per rank that compressing
shards separately costs; the changes it carries are the same).

What travels (:func:`gather_packets`, each rank's packet to one rank, point to point, exactly its
bytes): per rank, its changed elements as encoded (``sparse``: compressed varint gaps and bit-pattern
differences, about 1.5 to 3 bytes per changed bf16 element; the ranks' streams together are a few
dozen bytes per tensor larger than the one stream of the full packet), plus a header of some 250 to
400 bytes per tensor (JSON: name, shape, dtype, span, checksums, CRCs, and safetensors' entry per
payload tensor; the full packet's file has about the same per changed tensor), plus one all-gather
of one int64 (the sizes). No weights are gathered for a delta; for an anchor each rank sends its
shards in full, and the destination holds the whole model once, as the full anchor does anyway.

Usage (every rank)::

    sender = ShardedDeltaSender(model)  # FSDP2 DTensor params, or a DDP model's module
    for step in ...:
        optimizer.step()
        full = gather_packets(sender.packet(step=step), dst=0)  # a DeltaPacket on rank 0, else None
        if full is not None:
            ship(packet_to_bytes(full))  # to the inference engine: DeltaReceiver(replica).apply(...)
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from sparse_rl_optim.deltas.encoding import (
    ENCODINGS,
    EncodedTensor,
    decode_sparse,
    encode_change,
    encode_sparse,
    partial_checksum,
    shape_checksum_term,
    tile_values,
)
from sparse_rl_optim.deltas.packet import (
    DeltaPacket,
    PacketError,
    _full_crc,
    _named_tensors,
    _payload_crc,
    check_sender_options,
)
from sparse_rl_optim.distributed import (
    ShardSpan,
    all_reduce_sum,
    counts_here,
    is_distributed,
    local_tensor,
    shard_span,
)
from sparse_rl_optim.tiles import DEFAULT_TILE_SIZE, _bits_dtype, check_tile_size

__all__ = [
    "ShardPacket",
    "ShardedDeltaSender",
    "assemble_packets",
    "gather_packets",
    "gather_shard_packets",
    "shard_packet_from_bytes",
    "shard_packet_to_bytes",
]

_META_KEY = "sparse_rl_optim.shard_packet"
_PARTS = ("tile_ids", "values", "positions", "differences")
_MOD = 1 << 64


@dataclass
class ShardPacket:
    """One rank's part of one sync, in the full tensors' coordinates.

    ``shapes``/``dtypes``/``spans``: per tensor (every tensor the sender covers, also those this
    rank holds none of) its global shape, dtype and the flat elements ``[start, stop)`` this packet
    covers (``(0, 0)``: none). ``changes``: per tensor with a change in the span, the change with
    global positions / tile ids; ``context``: ``tiles`` only, this rank's part of tiles it shares
    with another rank and did not change (count 0); ``full``: an anchor's flat shards.
    ``after``: per tensor, :func:`~.encoding.partial_checksum` of the span after the sync;
    ``before``: the same before it, per changed tensor. ``payload_crc``: CRC32 per payload, keyed
    ``"changes/<name>"``, ``"context/<name>"``, ``"full/<name>"``; ``header_crc``: CRC32 of all
    the rest (:meth:`seal` sets it)."""

    sequence: int
    follows: int | None
    rank: int
    world_size: int
    step: int | None = None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    changes: dict[str, EncodedTensor] = field(default_factory=dict)
    context: dict[str, EncodedTensor] = field(default_factory=dict)
    full: dict[str, Tensor] = field(default_factory=dict)
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    payload_crc: dict[str, int] = field(default_factory=dict)
    header_crc: int = 0

    @property
    def is_anchor(self) -> bool:
        return self.follows is None

    def nbytes(self) -> int:
        """Bytes of the tensors the packet carries (changes, context, or an anchor's shards)."""
        encoded = [*self.changes.values(), *self.context.values()]
        return sum(e.nbytes() for e in encoded) + sum(t.numel() * t.element_size() for t in self.full.values())

    def seal(self) -> ShardPacket:
        """Compute the payload CRCs and the header CRC from the packet as it is now; returns it."""
        self.payload_crc = {
            **{f"changes/{name}": _payload_crc(e) for name, e in self.changes.items()},
            **{f"context/{name}": _payload_crc(e) for name, e in self.context.items()},
            **{f"full/{name}": _full_crc(t) for name, t in self.full.items()},
        }
        self.header_crc = _header_crc(self)
        return self


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: Any) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise PacketError(f"shard packet names an unknown floating dtype {name!r}")
    return dtype


def _encoded_meta(encoded: EncodedTensor) -> dict[str, Any]:
    return {"encoding": encoded.encoding, "count": encoded.count, "tile_size": encoded.tile_size}


def _header(packet: ShardPacket) -> dict[str, Any]:
    """Everything but the payload tensors' bytes (which ``payload_crc`` covers), as JSON values."""
    return {
        "sequence": packet.sequence,
        "follows": packet.follows,
        "step": packet.step,
        "rank": packet.rank,
        "world_size": packet.world_size,
        "tensors": {
            name: {
                "shape": list(shape),
                "dtype": _dtype_name(packet.dtypes[name]) if name in packet.dtypes else None,
                "span": list(packet.spans[name]) if name in packet.spans else None,
                "after": packet.after.get(name),
                "before": packet.before.get(name),
            }
            for name, shape in packet.shapes.items()
        },
        "changes": {name: _encoded_meta(e) for name, e in packet.changes.items()},
        "context": {name: _encoded_meta(e) for name, e in packet.context.items()},
        "full": {name: [list(t.shape), _dtype_name(t.dtype)] for name, t in packet.full.items()},
        "payload_crc": packet.payload_crc,
    }


def _header_crc(packet: ShardPacket) -> int:
    return zlib.crc32(json.dumps(_header(packet), sort_keys=True, separators=(",", ":")).encode())


# -- the sender ---------------------------------------------------------------------------------


def _boundary_tiles(start: int, stop: int, numel: int, tile_size: int) -> list[int]:
    """The tiles that ``[start, stop)`` shares with the elements before or after it."""
    if start == stop:
        return []
    tiles = set()
    if start % tile_size:
        tiles.add(start // tile_size)
    if stop % tile_size and stop != numel:
        tiles.add((stop - 1) // tile_size)
    return sorted(tiles)


class ShardedDeltaSender:
    """Makes this rank's :class:`ShardPacket` of each sync from its shards of named tensors (FSDP2
    ``DTensor`` parameters, or plain tensors: a DDP replica, encoded on rank 0 only), against a
    snapshot of what it last shipped of them. Run one on every rank and call :meth:`packet` on every
    rank at each sync (with the same arguments); :func:`gather_packets` or
    :func:`assemble_packets` then make the full packet.

    ``encoding``, ``tile_size``, ``anchor_every``, ``snapshot_device``: as for
    :class:`~.packet.DeltaSender` (the default encoding here is ``"sparse"``, see the module
    docstring for ``"tiles"`` and ``"auto"``). ``spans``, ``rank``, ``world_size``: for tensors
    sharded some other way (or simulated shards): per name the :class:`~sparse_rl_optim.distributed.ShardSpan`
    of the full tensor that the (plain, local) tensor holds; by default the spans come from the
    ``DTensor`` placements and the rank and world size from the default process group.
    """

    def __init__(
        self,
        tensors: nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
        *,
        encoding: str = "sparse",
        tile_size: int = DEFAULT_TILE_SIZE,
        anchor_every: int | None = 100,
        snapshot_device: str | torch.device | None = None,
        spans: Mapping[str, ShardSpan] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        check_sender_options(encoding, anchor_every)
        initialized = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world_size}")
        if encoding == "auto" and self.world_size > 1 and not is_distributed():
            raise ValueError("encoding='auto' over several ranks needs the default process group (one all-reduce)")
        self.tensors = _named_tensors(tensors if isinstance(tensors, (nn.Module, Mapping)) else dict(tensors))
        self.spans: dict[str, ShardSpan] = {}
        for name, tensor in self.tensors.items():
            _bits_dtype(tensor.dtype)  # a clear error for a dtype whose bits cannot be moved
            if not tensor.is_floating_point():
                raise TypeError(f"{name}: delta packets carry floating tensors, not {tensor.dtype}")
            if spans is not None:
                if name not in spans:
                    raise ValueError(f"spans names no span for {name!r}")
                span = spans[name]
            else:
                span = shard_span(tensor)
                if not counts_here(tensor):  # a replica another rank encodes
                    span = ShardSpan(0, 0, span.global_shape)
            if not 0 <= span.start <= span.stop <= span.global_numel:
                raise ValueError(f"{name}: span [{span.start}, {span.stop}) outside {span.global_numel} elements")
            if span.numel and local_tensor(tensor).numel() != span.numel:
                raise ValueError(f"{name}: holds {local_tensor(tensor).numel()} elements, its span {span.numel}")
            self.spans[name] = span
        self.encoding = encoding
        self.tile_size = check_tile_size(tile_size)
        self.anchor_every = anchor_every
        self.snapshot_device = snapshot_device
        self.sequence = 0
        self._shipped: dict[str, Tensor] | None = None
        self._partials: dict[str, int] = {}  # partial checksums of the shipped shards
        self._since_anchor = 0

    def _local(self) -> dict[str, Tensor]:
        current = {}
        for name, span in self.spans.items():
            if span.numel:
                local = local_tensor(self.tensors[name]).detach()
                if local.numel() != span.numel:
                    raise ValueError(f"{name}: now holds {local.numel()} elements, its span {span.numel}")
                current[name] = local
        return current

    def packet(self, *, step: int | None = None, anchor: bool = False) -> ShardPacket:
        """This rank's packet of the next sync: what changed in its shards since the previous one
        (an anchor when asked, when due, and the first time). A collective with ``encoding="auto"``."""
        current = self._local()
        due = (
            self._shipped is None
            or anchor
            or (self.anchor_every is not None and self._since_anchor >= self.anchor_every)
        )
        self.sequence += 1
        packet = ShardPacket(
            sequence=self.sequence,
            follows=None if due else self.sequence - 1,
            rank=self.rank,
            world_size=self.world_size,
            step=step,
            shapes={name: tuple(span.global_shape) for name, span in self.spans.items()},
            dtypes={name: t.dtype for name, t in self.tensors.items()},
            spans={name: (span.start, span.stop) for name, span in self.spans.items()},
        )
        if due:
            for name, span in self.spans.items():
                if name in current:
                    packet.full[name] = current[name].reshape(-1).cpu().clone()
                    packet.after[name] = partial_checksum(current[name], span.start)
                else:
                    packet.after[name] = 0
            self._since_anchor = 0
        else:
            self._encode(packet, current)
        packet.seal()
        self._partials = dict(packet.after)
        self._since_anchor += 1
        self._shipped = {name: t.to(self.snapshot_device or t.device, copy=True) for name, t in current.items()}
        return packet

    def _encode(self, packet: ShardPacket, current: dict[str, Tensor]) -> None:
        assert self._shipped is not None
        encoded: dict[str, EncodedTensor] = {}
        candidates: dict[str, dict[str, EncodedTensor]] = {}
        for name, tensor in current.items():
            start = self.spans[name].start
            if self.encoding == "auto":
                candidates[name] = {
                    kind: encode_change(self._shipped[name], tensor, kind, self.tile_size, offset=start)
                    for kind in ENCODINGS
                }
            else:
                encoded[name] = encode_change(self._shipped[name], tensor, self.encoding, self.tile_size, offset=start)
        chosen = dict.fromkeys(self.spans, self.encoding)
        changed_anywhere = dict.fromkeys(self.spans, True)  # unknown without a collective: assume so
        if self.encoding == "auto":
            names = list(self.spans)
            sizes = torch.zeros(len(names), 3, dtype=torch.int64)
            for i, name in enumerate(names):
                if name in candidates and candidates[name]["sparse"].count:
                    found = candidates[name]
                    sizes[i] = torch.tensor([found["sparse"].count, found["tiles"].nbytes(), found["sparse"].nbytes()])
            all_reduce_sum(sizes)
            for i, name in enumerate(names):
                count, tiles_bytes, sparse_bytes = (int(v) for v in sizes[i])
                changed_anywhere[name] = count > 0
                chosen[name] = "tiles" if tiles_bytes <= sparse_bytes else "sparse"  # min() keeps the first on a tie
                if name in candidates:
                    encoded[name] = candidates[name][chosen[name]]
        for name, tensor in current.items():
            span = self.spans[name]
            change = encoded[name]
            if change.count:
                packet.changes[name] = change
                packet.before[name] = self._partials[name]
                packet.after[name] = partial_checksum(tensor, span.start)
            else:
                packet.after[name] = self._partials[name]
            if chosen[name] == "tiles" and changed_anywhere[name]:
                numel = span.global_numel
                shared = _boundary_tiles(span.start, span.stop, numel, self.tile_size)
                have = set(change.tile_ids.tolist()) if change.count else set()
                shared = [tile for tile in shared if tile not in have]
                if shared:
                    ids = torch.tensor(shared, dtype=torch.int64)
                    values = tile_values(tensor, ids, self.tile_size, offset=span.start).cpu()
                    packet.context[name] = EncodedTensor("tiles", 0, self.tile_size, ids.to(torch.int32), values)
        for name in self.spans:
            packet.after.setdefault(name, 0)  # holds none of it


# -- reassembly ---------------------------------------------------------------------------------


def _signed(value: int) -> int:
    value %= _MOD
    return value - _MOD if value >= 1 << 63 else value


def _check_one(packet: ShardPacket) -> None:
    """The packet's own integrity: CRCs, and a header that is whole and consistent."""
    who = f"the packet of rank {packet.rank} (sync {packet.sequence})"
    try:
        crc = _header_crc(packet)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise PacketError(f"{who} is malformed: {error}") from error
    if crc != packet.header_crc:
        raise PacketError(f"{who} is corrupted (header CRC mismatch)")
    for kind, entries in (("changes", packet.changes), ("context", packet.context)):
        for name, encoded in entries.items():
            if _payload_crc(encoded) != packet.payload_crc.get(f"{kind}/{name}"):
                raise PacketError(f"{who}: the {kind} of {name!r} are corrupted (CRC mismatch)")
    for name, tensor in packet.full.items():
        if _full_crc(tensor) != packet.payload_crc.get(f"full/{name}"):
            raise PacketError(f"{who}: the shard of {name!r} is corrupted (CRC mismatch)")
    expected = {*(f"changes/{n}" for n in packet.changes), *(f"context/{n}" for n in packet.context)}
    expected |= {f"full/{n}" for n in packet.full}
    if set(packet.payload_crc) != expected:
        raise PacketError(f"{who} is malformed: its CRCs name other payloads than it carries")
    names = set(packet.shapes)
    if set(packet.dtypes) != names or set(packet.spans) != names or set(packet.after) != names:
        raise PacketError(f"{who} is malformed: shapes, dtypes, spans and checksums name different tensors")
    unknown = (set(packet.changes) | set(packet.context) | set(packet.full) | set(packet.before)) - names
    if unknown or set(packet.before) != set(packet.changes):
        raise PacketError(f"{who} is malformed: changes, context or checksums for tensors it does not list")
    for name, (start, stop) in packet.spans.items():
        numel = int(np.prod(packet.shapes[name], dtype=np.int64))
        if not 0 <= start <= stop <= numel:
            raise PacketError(f"{who}: the span [{start}, {stop}) of {name!r} is outside its {numel} elements")
        if (start == stop) and (name in packet.changes or name in packet.context or name in packet.full):
            raise PacketError(f"{who}: carries elements of {name!r} outside its (empty) span")
        for value in (packet.after[name], packet.before.get(name, 0)):
            if not isinstance(value, int) or not 0 <= value < _MOD:
                raise PacketError(f"{who}: the checksum of {name!r} is not a 64-bit unsigned integer")


def _check_world(packets: list[ShardPacket]) -> list[ShardPacket]:
    """One packet from every rank, all of the same sync and the same tensors; sorted by rank."""
    if not packets:
        raise PacketError("no shard packets to assemble")
    first = packets[0]
    for packet in packets[1:]:
        ours = (packet.sequence, packet.follows, packet.step, packet.world_size)
        theirs = (first.sequence, first.follows, first.step, first.world_size)
        if ours != theirs:
            raise PacketError(
                f"shard packets from different syncs: rank {first.rank}'s is (sequence, follows, step, world) "
                f"{theirs}, rank {packet.rank}'s {ours}"
            )
    ranks = [p.rank for p in packets]
    repeated = sorted({r for r in ranks if ranks.count(r) > 1})
    if repeated:
        raise PacketError(f"sync {first.sequence}: more than one packet from rank(s) {repeated}")
    missing = sorted(set(range(first.world_size)) - set(ranks))
    if missing:
        raise PacketError(f"sync {first.sequence}: no packet from rank(s) {missing} of {first.world_size}")
    if set(ranks) != set(range(first.world_size)):
        raise PacketError(f"sync {first.sequence}: ranks {sorted(ranks)} are not 0..{first.world_size - 1}")
    for packet in packets[1:]:
        if list(packet.shapes) != list(first.shapes):
            differ = sorted(set(packet.shapes) ^ set(first.shapes))
            raise PacketError(
                f"sync {first.sequence}: ranks {first.rank} and {packet.rank} list different tensors "
                f"(or in another order): {differ[:5]}"
            )
        for name in first.shapes:
            if (packet.shapes[name], packet.dtypes[name]) != (first.shapes[name], first.dtypes[name]):
                raise PacketError(
                    f"sync {first.sequence}: {name!r} is {packet.shapes[name]} {packet.dtypes[name]} on rank "
                    f"{packet.rank}, {first.shapes[name]} {first.dtypes[name]} on rank {first.rank}"
                )
    return sorted(packets, key=lambda p: p.rank)


def _holders(packets: list[ShardPacket], name: str, numel: int) -> list[ShardPacket]:
    """The packets with elements of ``name``, in span order, after checking that they tile it."""
    holding = sorted((p for p in packets if p.spans[name][0] != p.spans[name][1]), key=lambda p: p.spans[name][0])
    cursor = 0
    for packet in holding:
        start, stop = packet.spans[name]
        if start != cursor:
            problem = "overlap" if start < cursor else "leave a gap"
            raise PacketError(
                f"sync {packet.sequence}: the shards of {name!r} {problem} at element {min(start, cursor)} "
                f"(rank {packet.rank} holds [{start}, {stop}))"
            )
        cursor = stop
    if cursor != numel:
        raise PacketError(f"sync {packets[0].sequence}: the shards of {name!r} cover {cursor} of {numel} elements")
    return holding


def assemble_packets(packets: Iterable[ShardPacket]) -> DeltaPacket:
    """The full-tensor :class:`~.packet.DeltaPacket` of one sync from the :class:`ShardPacket` of
    every rank (any order): what a single-process :class:`~.packet.DeltaSender` would have made from
    the full tensors. Raises :class:`~.packet.PacketError` for a corrupted, missing, repeated or
    foreign packet (see the module docstring); nothing is written anywhere."""
    packets = list(packets)
    for packet in packets:
        _check_one(packet)
    packets = _check_world(packets)
    first = packets[0]
    for packet in packets:
        if packet.is_anchor and (packet.changes or packet.context):
            raise PacketError(f"anchor {packet.sequence}: rank {packet.rank}'s packet carries changes")
        if not packet.is_anchor and packet.full:
            raise PacketError(f"sync {packet.sequence}: rank {packet.rank}'s delta carries full shards")
    result = DeltaPacket(sequence=first.sequence, follows=first.follows, step=first.step)
    for name, shape in first.shapes.items():
        dtype = first.dtypes[name]
        numel = int(np.prod(shape, dtype=np.int64))
        holding = _holders(packets, name, numel)
        shape_term = shape_checksum_term(torch.Size(shape))
        after = _signed(shape_term + sum(p.after[name] for p in packets))
        if first.is_anchor:
            pieces = []
            for packet in holding:
                start, stop = packet.spans[name]
                piece = packet.full.get(name)
                if piece is None or piece.dim() != 1 or piece.numel() != stop - start or piece.dtype != dtype:
                    raise PacketError(f"anchor {first.sequence}: rank {packet.rank}'s shard of {name!r} is malformed")
                pieces.append(piece)
            full = torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype)
            result.full[name] = full.view(shape)
            result.after[name] = after
            result.payload_crc[name] = _full_crc(result.full[name])
            continue
        changed = [p for p in holding if name in p.changes]
        for packet in changed:
            if packet.changes[name].count <= 0:
                raise PacketError(f"sync {first.sequence}: rank {packet.rank}'s change of {name!r} is empty")
        if not changed:  # (context for a tensor nobody changed: nothing to send)
            continue
        encodings = {(p.changes[name].encoding, p.changes[name].tile_size) for p in changed}
        if len(encodings) != 1:
            raise PacketError(f"sync {first.sequence}: the ranks encoded {name!r} differently: {sorted(encodings)}")
        if changed[0].changes[name].encoding == "sparse":
            merged = _merge_sparse(name, changed, dtype)
        elif changed[0].changes[name].encoding == "tiles":
            merged = _merge_tiles(name, holding, dtype, numel)
        else:
            raise PacketError(f"sync {first.sequence}: unknown encoding {changed[0].changes[name].encoding!r}")
        before = _signed(shape_term + sum(p.before.get(name, p.after[name]) for p in packets))
        result.changes[name] = merged
        result.before[name] = before
        result.after[name] = after
        result.payload_crc[name] = _payload_crc(merged)
    return result


def _merge_sparse(name: str, changed: list[ShardPacket], dtype: torch.dtype) -> EncodedTensor:
    width = torch.empty(0, dtype=dtype).element_size()
    all_positions, all_differences = [], []
    for packet in changed:
        encoded = packet.changes[name]
        who = f"sync {packet.sequence}: rank {packet.rank}'s change of {name!r}"
        if encoded.positions is None or encoded.differences is None:
            raise PacketError(f"{who} is malformed (no streams)")
        try:
            positions, differences = decode_sparse(encoded, width)
        except (ValueError, zlib.error) as error:
            raise PacketError(f"{who} cannot be decoded: {error}") from error
        start, stop = packet.spans[name]
        if positions[0] < start or positions[-1] >= stop or (np.diff(positions) <= 0).any():
            raise PacketError(f"{who} has positions outside its span [{start}, {stop}) or out of order")
        if (differences == 0).any():
            raise PacketError(f"{who} has an element that does not change")
        all_positions.append(positions)
        all_differences.append(differences)
    return encode_sparse(np.concatenate(all_positions), np.concatenate(all_differences))


def _merge_tiles(name: str, holding: list[ShardPacket], dtype: torch.dtype, numel: int) -> EncodedTensor:
    tile_size = next(p.changes[name].tile_size for p in holding if name in p.changes)
    check_tile_size(tile_size)
    bits_dtype = _bits_dtype(dtype)
    parts: list[tuple[ShardPacket, EncodedTensor]] = []
    for packet in holding:
        for source in (packet.changes, packet.context):
            if name in source:
                parts.append((packet, source[name]))
    checked = []
    for packet, encoded in parts:
        who = f"sync {packet.sequence}: rank {packet.rank}'s tiles of {name!r}"
        ids, values = encoded.tile_ids, encoded.values
        if (
            encoded.encoding != "tiles"
            or encoded.tile_size != tile_size
            or ids is None
            or values is None
            or ids.dim() != 1
            or values.shape != (ids.numel(), tile_size)
            or values.dtype != dtype
        ):
            raise PacketError(f"{who} are malformed")
        ids = ids.to(torch.int64)
        start, stop = packet.spans[name]
        if ids.numel() and (
            (ids.diff() <= 0).any() or int(ids[0]) * tile_size + tile_size <= start or int(ids[-1]) * tile_size >= stop
        ):
            raise PacketError(f"{who} lie outside its span [{start}, {stop}) or are out of order")
        checked.append((packet, encoded, ids))
    tile_ids = torch.unique(torch.cat([ids for packet, encoded, ids in checked if encoded.count] or [torch.empty(0)]))
    tile_ids = tile_ids.to(torch.int64)
    out = torch.zeros(tile_ids.numel() * tile_size, dtype=bits_dtype)
    covered = torch.zeros(tile_ids.numel() * tile_size, dtype=torch.int32)
    lane = torch.arange(tile_size)
    count = 0
    for packet, encoded, ids in checked:
        count += encoded.count
        row = torch.searchsorted(tile_ids, ids)
        keep = row < tile_ids.numel()
        keep[keep.clone()] = tile_ids[row[keep]] == ids[keep]  # context of a tile nobody changed: dropped
        element = ids[keep].unsqueeze(1) * tile_size + lane
        start, stop = packet.spans[name]
        inside = (element >= start) & (element < stop)
        slot = (row[keep].unsqueeze(1) * tile_size + lane)[inside]
        values = encoded.values.contiguous().view(bits_dtype)[keep][inside]
        out[slot] = values
        covered.index_add_(0, slot, torch.ones_like(slot, dtype=torch.int32))
    expected = ((tile_ids.unsqueeze(1) * tile_size + lane) < numel).reshape(-1).to(torch.int32)
    if not torch.equal(covered, expected):
        raise PacketError(
            f"sync {holding[0].sequence}: the ranks' tiles of {name!r} do not put every changed tile together "
            "exactly once (a rank's part of a shared tile is missing or repeated)"
        )
    values = out.view(dtype).view(tile_ids.numel(), tile_size)
    return EncodedTensor("tiles", count, tile_size, tile_ids.to(torch.int32), values)


# -- bytes and gathering ------------------------------------------------------------------------


def shard_packet_to_bytes(packet: ShardPacket) -> bytes:
    """The shard packet as the bytes of a safetensors file (payload tensors, JSON header)."""
    from safetensors.torch import save

    tensors: dict[str, Tensor] = {}
    for kind, entries in (("changes", packet.changes), ("context", packet.context)):
        for name, encoded in entries.items():
            for part in _PARTS:
                value = getattr(encoded, part)
                if value is not None:
                    tensors[f"{kind}/{part}/{name}"] = value.contiguous()
    for name, tensor in packet.full.items():
        tensors[f"full/{name}"] = tensor.contiguous()
    meta = {**_header(packet), "header_crc": packet.header_crc}
    return save(tensors, metadata={_META_KEY: json.dumps(meta, separators=(",", ":"))})


def shard_packet_from_bytes(data: bytes) -> ShardPacket:
    """Read what :func:`shard_packet_to_bytes` wrote (not verified here: :func:`assemble_packets`
    verifies). Raises :class:`~.packet.PacketError` for bytes that are not a shard packet."""
    from safetensors.torch import load

    try:
        tensors = load(bytes(data))
        header_size = int.from_bytes(bytes(data[:8]), "little")
        metadata = json.loads(bytes(data[8 : 8 + header_size])).get("__metadata__") or {}
        meta = json.loads(metadata[_META_KEY])
        packet = ShardPacket(
            sequence=meta["sequence"],
            follows=meta["follows"],
            rank=meta["rank"],
            world_size=meta["world_size"],
            step=meta["step"],
            payload_crc=dict(meta["payload_crc"]),
            header_crc=meta["header_crc"],
        )
        for name, info in meta["tensors"].items():
            packet.shapes[name] = tuple(info["shape"])
            packet.dtypes[name] = _dtype_from_name(info["dtype"])
            packet.spans[name] = tuple(info["span"])
            packet.after[name] = info["after"]
            if info["before"] is not None:
                packet.before[name] = info["before"]
        for kind, entries in (("changes", packet.changes), ("context", packet.context)):
            for name, info in meta[kind].items():
                parts = {part: tensors.pop(f"{kind}/{part}/{name}", None) for part in _PARTS}
                entries[name] = EncodedTensor(info["encoding"], info["count"], info["tile_size"], **parts)
        for name in meta["full"]:
            packet.full[name] = tensors.pop(f"full/{name}")
    except PacketError:
        raise
    except Exception as error:  # any malformed input: not a shard packet
        raise PacketError(f"not a readable shard packet: {type(error).__name__}: {error}") from error
    if tensors:
        raise PacketError(
            f"shard packet of rank {packet.rank} holds tensors its header does not name: {sorted(tensors)[:5]}"
        )
    return packet


def _gather_bytes(data: bytes, dst: int) -> list[bytes] | None:
    """Every rank's ``data`` on rank ``dst`` (in rank order), ``None`` elsewhere: one all-gather of
    the sizes, then each rank sends exactly its bytes to ``dst`` (no padding to the largest)."""
    if not is_distributed():
        return [data]
    rank, world = dist.get_rank(), dist.get_world_size()
    if not 0 <= dst < world:
        raise ValueError(f"dst {dst} is not a rank of a world of {world}")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    if rank != dst:
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device), dst=dst)
        return None
    out = []
    for source in range(world):
        if source == dst:
            out.append(data)
            continue
        buffer = torch.empty(int(sizes[source].item()), dtype=torch.uint8, device=device)
        dist.recv(buffer, src=source)
        out.append(buffer.cpu().numpy().tobytes())
    return out


def gather_shard_packets(packet: ShardPacket, dst: int = 0) -> list[ShardPacket] | None:
    """Every rank's shard packet on rank ``dst`` (a collective: call it on every rank of the default
    process group), ``None`` on the others; without a process group, ``[packet]``."""
    data = _gather_bytes(shard_packet_to_bytes(packet), dst)
    return None if data is None else [shard_packet_from_bytes(d) for d in data]


def gather_packets(packet: ShardPacket, dst: int = 0) -> DeltaPacket | None:
    """The full packet of this sync on rank ``dst`` (:func:`assemble_packets` of every rank's
    packet, gathered point to point), ``None`` on the others. A collective, like
    :func:`gather_shard_packets`. Raises :class:`~.packet.PacketError` on ``dst`` only."""
    packets = gather_shard_packets(packet, dst)
    return None if packets is None else assemble_packets(packets)
