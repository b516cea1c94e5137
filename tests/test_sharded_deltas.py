"""Sharded delta packets, one process: simulated FSDP2 shards (rows split ``ceil(dim0 / world)`` per
rank, so some ranks may hold nothing) of random shapes and dtypes, changed by random bit patterns
(NaN payloads, infinities, signed zeros). Each rank's :class:`ShardedDeltaSender` encodes its shard;
the reassembled packet must equal, byte for byte, what a single-process :class:`DeltaSender` makes
from the full tensors, and bring a replica to bit-equality. Every kind of broken set of shard
packets (missing, repeated, mixed syncs, corrupted bytes or headers, inconsistent spans, a missing
part of a shared tile) must raise ``PacketError`` before anything is written."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from sparse_rl_optim.deltas import (
    DeltaReceiver,
    DeltaSender,
    PacketError,
    ShardedDeltaSender,
    ShardPacket,
    assemble_packets,
    gather_packets,
    gather_shard_packets,
    packet_to_bytes,
    shard_packet_from_bytes,
    shard_packet_to_bytes,
)
from sparse_rl_optim.deltas.encoding import partial_checksum, shape_checksum_term, tensor_checksum
from sparse_rl_optim.distributed import ShardSpan

_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().view(-1).view(_INT[tensor.element_size()])


def fsdp_spans(shape: tuple[int, ...], world: int) -> list[ShardSpan]:
    """FSDP2's Shard(0), written out independently: rank r holds rows [r*c, min((r+1)*c, dim0)),
    c = ceil(dim0 / world); a scalar is replicated and counted on rank 0 only."""
    numel = math.prod(shape)
    if not shape:
        return [ShardSpan(0, numel if r == 0 else 0, torch.Size(shape)) for r in range(world)]
    chunk = -(-shape[0] // world)
    inner = math.prod(shape[1:])
    spans = []
    for r in range(world):
        rows = (min(r * chunk, shape[0]), min((r + 1) * chunk, shape[0]))
        start, stop = rows[0] * inner, rows[1] * inner
        spans.append(ShardSpan(start, stop, torch.Size(shape)) if stop > start else ShardSpan(0, 0, torch.Size(shape)))
    return spans


def shard_senders(full: dict[str, torch.Tensor], world: int, **settings) -> list[ShardedDeltaSender]:
    """One sender per simulated rank, over views of the full tensors (so in-place edits reach them)."""
    senders = []
    for rank in range(world):
        locals_, spans = {}, {}
        for name, tensor in full.items():
            span = fsdp_spans(tuple(tensor.shape), world)[rank]
            spans[name] = span
            locals_[name] = tensor.view(-1)[span.start : span.stop]
        senders.append(ShardedDeltaSender(locals_, spans=spans, rank=rank, world_size=world, **settings))
    return senders


_SPECIAL = [float("nan"), -float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -3.5]


def mutate(full: dict[str, torch.Tensor], generator: torch.Generator, fraction: float) -> None:
    """Move ~``fraction`` of the elements by a few bit patterns, and set a few to special values
    (including NaNs with a payload and negative zero), in place."""
    for tensor in full.values():
        if tensor.numel() == 0:
            continue
        flat = tensor.view(-1)
        bits = _bits(flat).clone()
        moved = torch.rand(flat.numel(), generator=generator) < fraction
        bits[moved] += torch.randint(-3, 4, (int(moved.sum()),), generator=generator).to(bits.dtype)
        special = torch.tensor(_SPECIAL, dtype=tensor.dtype)
        special_bits = _bits(special).clone()
        special_bits[0] |= 0x3  # a NaN with a payload
        at = torch.randint(0, flat.numel(), (2,), generator=generator)
        bits[at] = special_bits[torch.randint(0, len(_SPECIAL), (2,), generator=generator)]
        flat.copy_(bits.view(tensor.dtype))


def random_weights(shapes, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"layer{i}.w": torch.randn(shape, generator=generator).to(dtype) for i, shape in enumerate(shapes)}


def sync(senders: list[ShardedDeltaSender], **kwargs) -> list[ShardPacket]:
    return [sender.packet(**kwargs) for sender in senders]


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


_SHAPE = st.one_of(
    st.just(()),
    st.tuples(st.integers(0, 9)),
    st.tuples(st.integers(0, 9), st.integers(1, 40)),
    st.tuples(st.integers(1, 5), st.integers(1, 7), st.integers(1, 9)),
)


@settings(max_examples=60)
@example(  # shards that start and end inside tiles, a tensor rank 2 holds none of, a scalar
    shapes=[(7, 45), (1,), (), (0, 3)], world=3, dtype=torch.bfloat16, encoding="tiles", tile=32, seed=1
)
@example(shapes=[(7, 45), (9,)], world=4, dtype=torch.float32, encoding="sparse", tile=64, seed=2)
@given(
    shapes=st.lists(_SHAPE, min_size=1, max_size=4),
    world=st.integers(1, 4),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    encoding=st.sampled_from(["sparse", "tiles"]),
    tile=st.sampled_from([32, 64]),
    seed=st.integers(0, 2**16),
)
def test_reassembled_packets_equal_the_single_process_packets_byte_for_byte(shapes, world, dtype, encoding, tile, seed):
    full = random_weights(shapes, dtype, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    reference = DeltaSender(full, encoding=encoding, tile_size=tile, anchor_every=3)
    senders = shard_senders(full, world, encoding=encoding, tile_size=tile, anchor_every=3)
    replica = {name: torch.zeros_like(t) for name, t in full.items()}
    receiver = DeltaReceiver(replica)
    changed_any = False
    for step in range(5):
        if step:
            mutate(full, generator, fraction=[0.02, 0.3, 0.0, 1.0][step % 4])
        shard_packets = sync(senders, step=step)
        # Through the wire format, in a shuffled order.
        shard_packets = [shard_packet_from_bytes(shard_packet_to_bytes(p)) for p in reversed(shard_packets)]
        if any(p.context for p in shard_packets):
            event("a tile put together from two ranks' parts")
        assembled = assemble_packets(shard_packets)
        want = reference.packet(step=step)
        assert packet_to_bytes(assembled) == packet_to_bytes(want), f"step {step}"
        changed_any |= bool(want.changes)
        receiver.apply(assembled)
        assert equal(replica, full), f"step {step}"
    if any(t.numel() for t in full.values()):
        assert changed_any  # the comparison covered deltas, not only anchors


@settings(max_examples=40)
@given(
    shape=_SHAPE,
    world=st.integers(1, 5),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_partial_checksums_of_shards_add_up_to_the_full_checksum(shape, world, dtype, seed):
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    parts = [partial_checksum(tensor.view(-1)[s.start : s.stop], s.start) for s in fsdp_spans(shape, world)]
    total = (shape_checksum_term(tensor.shape) + sum(parts)) % (1 << 64)
    assert total - (1 << 64) * (total >= 1 << 63) == tensor_checksum(tensor)
    if tensor.numel() > 1:  # the position matters: a shard summed at the wrong offset does not add up
        wrong = partial_checksum(tensor.view(-1)[1:], 0) + partial_checksum(tensor.view(-1)[:1], 0)
        assert (shape_checksum_term(tensor.shape) + wrong) % (1 << 64) != total


@pytest.mark.parametrize("encoding", ["tiles", "sparse"])
def test_nan_payloads_survive_every_encoding(encoding):
    """A bf16 NaN with a payload (0x7FC3) is moved as bits: a masked copy of bf16 values on the CPU
    would canonicalize it to 0x7FC0 (the tiles encoding did, before it moved integer patterns)."""
    weights = {"w": torch.zeros(40, dtype=torch.bfloat16)}
    sender = DeltaSender(weights, encoding=encoding, tile_size=32)
    replica = {"w": torch.ones(40, dtype=torch.bfloat16)}
    receiver = DeltaReceiver(replica)
    receiver.apply(sender.packet())
    weights["w"].view(torch.int16)[[3, 35]] = torch.tensor([0x7FC3, -0x0001], dtype=torch.int16)
    receiver.apply(sender.packet())
    assert torch.equal(replica["w"].view(torch.int16), weights["w"].view(torch.int16))


def test_a_replicated_tensor_is_encoded_by_one_rank():
    """DDP: every rank holds the whole tensor; rank 0 encodes it, the others list it with an empty span."""
    full = random_weights([(6, 33), (5,)], torch.bfloat16, 3)
    reference = DeltaSender(full, anchor_every=None, encoding="sparse")
    senders = [
        ShardedDeltaSender(
            full,
            spans={name: ShardSpan(0, t.numel() if rank == 0 else 0, t.shape) for name, t in full.items()},
            rank=rank,
            world_size=3,
        )
        for rank in range(3)
    ]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        mutate(full, generator, 0.1)
        assembled = assemble_packets(sync(senders))
        assert packet_to_bytes(assembled) == packet_to_bytes(reference.packet())
    assert senders[1]._shipped == {}  # nothing of it kept on the other ranks


def test_auto_encoding_on_one_rank_equals_the_single_process_auto():
    full = random_weights([(9, 40), (64, 64), (2, 16)], torch.bfloat16, 5)
    reference = DeltaSender(full, encoding="auto", tile_size=32, anchor_every=None)
    (sender,) = shard_senders(full, 1, encoding="auto", tile_size=32, anchor_every=None)
    generator = torch.Generator().manual_seed(1)
    kinds = set()
    for fraction in (0.0, 0.01, 1.0, 0.5):
        mutate(full, generator, fraction)
        if fraction == 1.0:  # a small tensor all new and random: one dense tile is smaller than sparse
            full["layer2.w"].copy_(torch.randn(2, 16, generator=generator))
        assembled = assemble_packets([sender.packet()])
        want = reference.packet()
        assert packet_to_bytes(assembled) == packet_to_bytes(want)
        kinds |= {c.encoding for c in want.changes.values()}
    assert kinds == {"tiles", "sparse"}


def test_settings_are_checked():
    full = random_weights([(4, 3)], torch.float32, 0)
    with pytest.raises(ValueError, match="process group"):
        shard_senders(full, 2, encoding="auto")
    with pytest.raises(ValueError, match="Unknown encoding"):
        ShardedDeltaSender(full, encoding="dense")
    with pytest.raises(ValueError, match="span"):
        ShardedDeltaSender(full, spans={"layer0.w": ShardSpan(0, 5, torch.Size([4, 3]))}, rank=0, world_size=2)
    with pytest.raises(ValueError, match="not in a world"):
        ShardedDeltaSender(full, rank=2, world_size=2)
    with pytest.raises(TypeError):
        ShardedDeltaSender({"i": torch.zeros(3, dtype=torch.int32)})


def test_without_a_process_group_gathering_is_assembling_one_packet():
    full = random_weights([(5, 7)], torch.bfloat16, 2)
    (sender,) = shard_senders(full, 1, anchor_every=None)
    reference = DeltaSender(full, anchor_every=None, encoding="sparse")
    assert packet_to_bytes(gather_packets(sender.packet())) == packet_to_bytes(reference.packet())
    mutate(full, torch.Generator().manual_seed(0), 0.2)
    packets = gather_shard_packets(sender.packet())
    assert len(packets) == 1 and packet_to_bytes(assemble_packets(packets)) == packet_to_bytes(reference.packet())


# -- broken sets of shard packets -------------------------------------------------------------


def _delta_world(encoding: str = "sparse", world: int = 3):
    """Full weights (shapes whose shards straddle tiles), their senders after one anchor, a replica
    that applied it, and the shard packets of the next sync (a delta changing every shard)."""
    full = random_weights([(7, 45), (5,), (2, 3, 11)], torch.bfloat16, 11)
    senders = shard_senders(full, world, encoding=encoding, tile_size=32, anchor_every=None)
    replica = {name: t.clone() for name, t in full.items()}
    receiver = DeltaReceiver(replica)
    receiver.apply(assemble_packets(sync(senders)))
    mutate(full, torch.Generator().manual_seed(4), 0.2)
    packets = sync(senders, step=1)
    assert all(p.changes for p in packets if any(s != (0, 0) for s in p.spans.values()))
    return full, senders, replica, receiver, packets


def _refused(packets, replica, receiver, match: str | None = None) -> None:
    before = {name: t.clone() for name, t in replica.items()}
    with pytest.raises(PacketError, match=match):
        receiver.apply(assemble_packets(packets))
    assert equal(replica, before)


@pytest.mark.parametrize("encoding", ["sparse", "tiles"])
def test_missing_repeated_and_mixed_packets_are_refused(encoding):
    full, senders, replica, receiver, packets = _delta_world(encoding)
    _refused(packets[:1] + packets[2:], replica, receiver, "no packet from rank")
    _refused([*packets, packets[1]], replica, receiver, "more than one packet")
    _refused([], replica, receiver, "no shard packets")
    impostor = copy.deepcopy(packets[2])
    impostor.rank = 1
    _refused([packets[0], packets[1], impostor.seal()], replica, receiver, "more than one packet")
    outsider = copy.deepcopy(packets[2])
    outsider.rank = 3
    _refused([*packets[:2], outsider.seal()], replica, receiver, "no packet from rank")
    # A later sync's packet from one rank in place of this sync's.
    later_senders = copy.deepcopy(senders)
    later = sync(later_senders, step=2)
    _refused([packets[0], later[1], packets[2]], replica, receiver, "different syncs")
    # A fresh anchor from one rank among deltas.
    anchor = copy.deepcopy(senders[1]).packet(step=1, anchor=True)
    _refused([packets[0], anchor, packets[2]], replica, receiver, "different syncs")
    # Packets of another world size.
    (alone,) = shard_senders({n: t.clone() for n, t in full.items()}, 1, encoding=encoding, anchor_every=None)
    _refused([*packets, alone.packet()], replica, receiver)
    # The intact set still applies.
    receiver.apply(assemble_packets(packets))
    assert equal(replica, full)


def _flip(tensor: torch.Tensor, index: int = 0) -> None:
    raw = tensor.view(-1).view(torch.uint8)
    raw[index % raw.numel()] ^= 0x10


@pytest.mark.parametrize("encoding", ["sparse", "tiles"])
def test_corrupted_payloads_and_headers_are_refused(encoding):
    full, _, replica, receiver, packets = _delta_world(encoding)
    name = next(iter(packets[1].changes))
    cases = {}
    for part in ("tile_ids", "values", "positions", "differences"):
        broken = copy.deepcopy(packets)
        tensor = getattr(broken[1].changes[name], part)
        if tensor is not None:
            _flip(tensor, 3)
            cases[f"payload {part}"] = (broken, "CRC mismatch")
    header_edits = {
        "span": lambda p: p.spans.__setitem__(name, (p.spans[name][0] + 1, p.spans[name][1])),
        "partial checksum": lambda p: p.after.__setitem__(name, (p.after[name] + 1) % (1 << 64)),
        "before checksum": lambda p: p.before.__setitem__(name, (p.before[name] + 1) % (1 << 64)),
        "count": lambda p: setattr(p.changes[name], "count", p.changes[name].count + 1),
        "world size": lambda p: setattr(p, "world_size", 2),
        "sequence": lambda p: setattr(p, "sequence", p.sequence + 1),
        "shape": lambda p: p.shapes.__setitem__(name, (*p.shapes[name][:-1], p.shapes[name][-1] + 1)),
        "dtype": lambda p: p.dtypes.__setitem__(name, torch.float16),
    }
    for label, edit in header_edits.items():
        broken = copy.deepcopy(packets)
        edit(broken[1])
        cases[f"header {label}"] = (broken, "header CRC mismatch")
    if encoding == "tiles":
        broken = copy.deepcopy(packets)
        victim = next(p for p in broken if p.context)
        victim.context.pop(next(iter(victim.context)))
        victim.seal()  # a consistent packet that lacks its part of a shared tile
        cases["missing context"] = (broken, "exactly once")
    # Sealed again after the edit (a sender bug, not a transmission error): still refused.
    broken = copy.deepcopy(packets)
    broken[1].spans[name] = (broken[1].spans[name][0] + 3, broken[1].spans[name][1])
    broken[1].seal()
    cases["resealed span gap"] = (broken, "gap|outside")
    broken = copy.deepcopy(packets)
    broken[2].spans[name] = broken[1].spans[name]
    broken[2].seal()
    cases["resealed overlap"] = (broken, "overlap|outside|cover")
    broken = copy.deepcopy(packets)
    broken[1].changes[name].count += 0 if encoding == "tiles" else 1  # a sparse stream of another length
    broken[1].seal()
    if encoding == "sparse":
        cases["resealed count"] = (broken, "cannot be decoded")
    for label, (broken, match) in cases.items():
        try:
            _refused(broken, replica, receiver, match)
        except BaseException as error:
            raise AssertionError(f"case {label!r} was not refused as expected") from error
    # A wrong partial checksum sealed in: the receiver refuses it before writing (checksum before).
    broken = copy.deepcopy(packets)
    broken[1].before[name] = (broken[1].before[name] + 1) % (1 << 64)
    _refused([p.seal() for p in broken], replica, receiver, "does not hold what the packet was made against")
    # ... or after writing, and rolls back (checksum after).
    broken = copy.deepcopy(packets)
    broken[1].after[name] = (broken[1].after[name] + 1) % (1 << 64)
    _refused([p.seal() for p in broken], replica, receiver, "does not match the sender's after applying")
    receiver.apply(assemble_packets(packets))
    assert equal(replica, full)


@pytest.mark.parametrize("encoding", ["sparse", "tiles"])
def test_every_corrupted_byte_of_a_serialized_shard_packet_is_refused(encoding):
    """Flip each byte of one rank's serialized packet in turn: reading or assembling must refuse it."""
    *_, packets = _delta_world(encoding, world=2)
    data = [shard_packet_to_bytes(p) for p in packets]
    assert assemble_packets(shard_packet_from_bytes(d) for d in data) is not None
    victim = bytearray(data[1])
    stride = max(1, len(victim) // 1500)
    for index in range(0, len(victim), stride):
        for mask in (0x01, 0x80):
            corrupted = bytearray(victim)
            corrupted[index] ^= mask
            with pytest.raises(PacketError):
                assemble_packets([shard_packet_from_bytes(data[0]), shard_packet_from_bytes(bytes(corrupted))])


def test_anchor_shards_reassemble_into_full_tensors():
    full = random_weights([(3, 70), (1, 5), (2,)], torch.float32, 7)
    world = 4  # dim0 smaller than the world: some ranks hold nothing of a tensor
    senders = shard_senders(full, world)
    packets = sync(senders, step=0)
    assert any(p.spans["layer1.w"] == (0, 0) for p in packets)
    assembled = assemble_packets(packets)
    want = DeltaSender(full).packet(step=0)
    assert packet_to_bytes(assembled) == packet_to_bytes(want)
    # Each rank carries only its shard: the shards' bytes add up to the full tensors' bytes.
    assert sum(p.nbytes() for p in packets) == want.nbytes()
    broken = copy.deepcopy(packets)
    _flip(broken[0].full["layer0.w"], 5)
    with pytest.raises(PacketError, match="CRC mismatch"):
        assemble_packets(broken)
    broken = copy.deepcopy(packets)
    broken[1].full["layer0.w"] = broken[1].full["layer0.w"][:-1]
    with pytest.raises(PacketError, match="malformed"):
        assemble_packets([p.seal() for p in broken])


def test_only_the_changed_elements_travel():
    """A sparse sync of 1% one-ulp changes: the ranks' packets together are about the size of the
    single-process packet (per-rank compression costs a few bytes), far below the weights' size."""
    full = random_weights([(256, 256), (256, 64)], torch.bfloat16, 1)
    senders = shard_senders(full, 4, anchor_every=None)
    reference = DeltaSender(full, anchor_every=None, encoding="sparse")
    sync(senders)
    reference.packet()
    generator = torch.Generator().manual_seed(3)
    for tensor in full.values():
        bits = _bits(tensor.view(-1)).clone()
        moved = torch.rand(bits.numel(), generator=generator) < 0.01
        bits[moved] += 1
        tensor.view(-1).copy_(bits.view(tensor.dtype))
    packets = sync(senders)
    want = reference.packet()
    shard_bytes = sum(p.nbytes() for p in packets)
    weights_bytes = sum(t.numel() * t.element_size() for t in full.values())
    assert shard_bytes <= want.nbytes() + 4 * 2 * 2 * 24  # zlib's framing per stream, per rank
    assert shard_bytes * 50 < weights_bytes
    wire = sum(len(shard_packet_to_bytes(p)) for p in packets)
    assert wire < shard_bytes + 4 * 1500  # plus a header of a few hundred bytes per rank
