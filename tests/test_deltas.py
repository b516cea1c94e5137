"""Delta packets: bit-exact round trips for every encoding and dtype, accumulation over several
steps, refusal of missing / repeated / reordered / corrupted packets and mismatched replicas, and
the varint coding against a naive reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_rl_optim.deltas.encoding import (
    _unzigzag,
    _varint_decode,
    _varint_encode,
    _zigzag,
    encode_change,
    tensor_checksum,
)
from sparse_rl_optim.deltas.packet import DeltaReceiver, DeltaSender, PacketError, load_packet, save_packet

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.detach().contiguous().view(width)


def _weights(seed: int, dtypes=DTYPES) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(33, 70), (129,), (5, 7, 11), (64, 64)]
    return {
        f"w{i}.{str(dtype).split('.')[-1]}": (torch.randn(shape, generator=generator) * 0.05).to(dtype)
        for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=False))
    }


def _step(weights: dict[str, torch.Tensor], generator: torch.Generator, fraction: float = 0.01) -> None:
    """What an optimizer step does to bf16 weights: ~1% move by an ulp or two, a few by a lot."""
    for tensor in weights.values():
        flat = tensor.view(-1)
        moved = torch.rand(flat.shape, generator=generator) < fraction
        bits = _bits(flat).clone()
        bits[moved] += torch.randint(-2, 3, (int(moved.sum()),), generator=generator).to(bits.dtype)
        flat.copy_(bits.view(tensor.dtype))
        big = torch.randint(0, flat.numel(), (2,), generator=generator)
        flat[big] = flat[big] * 3 + 0.01


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


@settings(max_examples=10)
@given(
    seed=st.integers(0, 2**16), encoding=st.sampled_from(["tiles", "sparse", "auto"]), tile=st.sampled_from([32, 64])
)
def test_replica_equals_sender_bit_for_bit_after_every_packet(seed, encoding, tile):
    weights = _weights(seed)
    replica = {k: torch.zeros_like(v) for k, v in weights.items()}
    sender = DeltaSender(weights, encoding=encoding, tile_size=tile, anchor_every=4)
    receiver = DeltaReceiver(replica)
    generator = torch.Generator().manual_seed(seed + 1)
    for sync in range(7):
        for _ in range(1 + sync % 3):  # several optimizer steps between two syncs
            _step(weights, generator)
        packet = sender.packet(step=sync)
        assert packet.is_anchor == (sync % 4 == 0)
        receiver.apply(packet)
        assert _equal(weights, replica)
        if not packet.is_anchor:
            assert {c.encoding for c in packet.changes.values()} <= (
                {"tiles", "sparse"} if encoding == "auto" else {encoding}
            )


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_round_trip(dtype):
    old = (torch.randn(300) * 0.1).to(dtype)
    new = old.clone()
    new[:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -1e-40, 65504.0]).to(dtype)
    new[100] = -new[100]
    replica = {"w": old.clone()}
    sender = DeltaSender({"w": new}, encoding="sparse")
    sender._shipped = {"w": old.clone()}  # as if `old` had been shipped
    receiver = DeltaReceiver(replica)
    receiver.sequence = 0
    sender.sequence = 0
    receiver.apply(sender.packet())
    assert torch.equal(_bits(replica["w"]), _bits(new))


def test_saved_and_loaded_packets_apply_identically(tmp_path):
    weights = _weights(3)
    replica = {k: torch.zeros_like(v) for k, v in weights.items()}
    sender, receiver = DeltaSender(weights), DeltaReceiver(replica)
    generator = torch.Generator().manual_seed(4)
    for sync in range(4):
        _step(weights, generator)
        path = tmp_path / f"packet{sync}.safetensors"
        size = save_packet(sender.packet(step=sync), path)
        assert size == path.stat().st_size
        packet = load_packet(path)
        assert packet.step == sync
        receiver.apply(packet)
        assert _equal(weights, replica)


def test_one_ulp_changes_of_one_percent_ship_over_100x_smaller_than_bf16():
    generator = torch.Generator().manual_seed(0)
    weights = {"w": (torch.randn(1024, 1024, generator=generator) * 0.02).to(torch.bfloat16)}
    sender = DeltaSender(weights, encoding="sparse")
    sender.packet()  # the anchor
    flat = weights["w"].view(-1)
    moved = torch.rand(flat.shape, generator=generator) < 0.01
    bits = _bits(flat).clone()
    bits[moved] += torch.where(torch.rand(int(moved.sum()), generator=generator) < 0.5, 1, -1).to(torch.int16)
    flat.copy_(bits.view(torch.bfloat16))
    packet = sender.packet()
    full = flat.numel() * 2
    assert packet.changes["w"].count == int(moved.sum())
    assert full / packet.nbytes() >= 100, full / packet.nbytes()
    tiles = encode_change(sender._shipped["w"], weights["w"], "tiles", 64)  # (shipped == current now)
    assert tiles.count == 0


def _chain(seed: int, count: int = 4):
    weights = _weights(seed)
    sender = DeltaSender(weights, anchor_every=None)
    generator = torch.Generator().manual_seed(seed + 7)
    packets = []
    for sync in range(count):
        _step(weights, generator)
        packets.append(sender.packet(step=sync))
    return weights, packets


def _receiver(weights):
    return DeltaReceiver({k: torch.zeros_like(v) for k, v in weights.items()})


def test_missing_repeated_and_reordered_packets_are_refused_without_touching_the_replica():
    weights, packets = _chain(11)
    receiver = _receiver(weights)
    with pytest.raises(PacketError, match="no anchor"):
        receiver.apply(packets[1])
    receiver.apply(packets[0])
    receiver.apply(packets[1])
    snapshot = copy.deepcopy(receiver.tensors)
    with pytest.raises(PacketError, match="repeated or older"):
        receiver.apply(packets[1])
    with pytest.raises(PacketError, match="out of order"):
        receiver.apply(packets[3])  # packet 3 is missing
    assert _equal(snapshot, receiver.tensors) and receiver.sequence == packets[1].sequence
    receiver.apply(packets[2])
    receiver.apply(packets[3])
    assert _equal(weights, receiver.tensors)


@pytest.mark.parametrize("part", ["positions", "differences", "values"])
def test_corrupted_packets_are_refused_without_touching_the_replica(part):
    encoding = "tiles" if part == "values" else "sparse"
    weights = _weights(5)
    sender = DeltaSender(weights, encoding=encoding)
    receiver = _receiver(weights)
    receiver.apply(sender.packet())
    _step(weights, torch.Generator().manual_seed(6))
    packet = sender.packet()
    name = next(iter(packet.changes))
    tensor = getattr(packet.changes[name], part)
    raw = tensor.view(torch.uint8).view(-1)
    raw[len(raw) // 2] ^= 0x10  # one flipped bit in transit
    snapshot = copy.deepcopy(receiver.tensors)
    with pytest.raises(PacketError, match="corrupted"):
        receiver.apply(packet)
    assert _equal(snapshot, receiver.tensors)


def test_a_replica_that_does_not_match_is_refused():
    weights, packets = _chain(12, count=2)
    receiver = _receiver(weights)
    receiver.apply(packets[0])
    name = next(iter(packets[1].changes))
    receiver.tensors[name].view(-1)[0] += 1  # the replica drifted (an edit the sender never saw)
    snapshot = copy.deepcopy(receiver.tensors)
    with pytest.raises(PacketError, match="does not hold what the packet was made against"):
        receiver.apply(packets[1])
    assert _equal(snapshot, receiver.tensors)


def test_a_wrong_result_checksum_rolls_back_every_tensor():
    weights, packets = _chain(13, count=2)
    receiver = _receiver(weights)
    receiver.apply(packets[0])
    names = list(packets[1].changes)
    assert len(names) >= 2
    packets[1].after[names[-1]] += 1  # the last tensor's result will not match
    snapshot = copy.deepcopy(receiver.tensors)
    with pytest.raises(PacketError, match="does not match the sender"):
        receiver.apply(packets[1])
    assert _equal(snapshot, receiver.tensors) and receiver.sequence == packets[0].sequence


def test_anchors_restart_the_chain_and_mismatched_anchors_are_refused():
    weights = _weights(14)
    sender = DeltaSender(weights, anchor_every=2)
    receiver = _receiver(weights)
    receiver.apply(sender.packet())
    _step(weights, torch.Generator().manual_seed(1))
    sender.packet()  # a delta the receiver never gets
    anchor = sender.packet()
    assert anchor.is_anchor
    receiver.apply(anchor)  # an anchor needs no predecessor: the replica recovers
    assert _equal(weights, receiver.tensors)
    other = DeltaReceiver({"x": torch.zeros(3)})
    with pytest.raises(PacketError, match="name different tensors"):
        other.apply(anchor)


def test_checksum_is_position_sensitive_and_device_independent():
    tensor = (torch.randn(1000) * 0.1).to(torch.bfloat16)
    swapped = tensor.clone()
    swapped[[3, 700]] = tensor[[700, 3]]
    assert tensor_checksum(swapped) != tensor_checksum(tensor)
    assert tensor_checksum(tensor.clone()) == tensor_checksum(tensor)
    zero_extended = torch.zeros(1001, dtype=torch.bfloat16)
    zero_extended[:1000] = tensor
    assert tensor_checksum(zero_extended) != tensor_checksum(tensor)


@settings(max_examples=25)
@given(values=st.lists(st.integers(0, 2**63 - 1), min_size=0, max_size=200))
def test_varint_round_trip_and_matches_a_naive_leb128(values):
    array = np.array(values, dtype=np.uint64)
    encoded = _varint_encode(array)
    naive = bytearray()
    for value in values:
        while True:
            byte = value & 0x7F
            value >>= 7
            naive.append(byte | (0x80 if value else 0))
            if not value:
                break
    assert encoded == bytes(naive)
    assert _varint_decode(encoded, len(values)).tolist() == values


@settings(max_examples=25)
@given(values=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=100))
def test_zigzag_round_trip(values):
    array = np.array(values, dtype=np.int64)
    zig = _zigzag(array)
    assert all(int(z) == (2 * v if v >= 0 else -2 * v - 1) for z, v in zip(zig.tolist(), values, strict=True))
    assert _unzigzag(zig).tolist() == values


def test_sender_rejects_bad_settings():
    with pytest.raises(ValueError, match="encoding"):
        DeltaSender({"w": torch.ones(3)}, encoding="zip")
    with pytest.raises(ValueError, match="anchor_every"):
        DeltaSender({"w": torch.ones(3)}, anchor_every=0)
    with pytest.raises(TypeError, match="floating"):
        DeltaSender({"w": torch.ones(3, dtype=torch.int64)})


def test_stale_anchors_and_malformed_packets_are_refused_without_touching_the_replica():
    weights = _weights(15)
    sender = DeltaSender(weights, anchor_every=None)
    receiver = _receiver(weights)
    first = sender.packet()
    receiver.apply(first)
    _step(weights, torch.Generator().manual_seed(2))
    second = sender.packet()
    receiver.apply(second)
    snapshot = copy.deepcopy(receiver.tensors)
    with pytest.raises(PacketError, match="stale"):
        receiver.apply(first)  # a replayed anchor would roll the replica back
    bad_anchor = copy.deepcopy(first)
    bad_anchor.sequence = 99
    bad_anchor.after[next(reversed(bad_anchor.after))] ^= 1
    with pytest.raises(PacketError, match="does not match the sender"):
        receiver.apply(bad_anchor)  # verified before anything is written
    _step(weights, torch.Generator().manual_seed(3))
    third = sender.packet()
    del third.after[next(iter(third.changes))]
    with pytest.raises(PacketError, match="no result checksum"):
        receiver.apply(third)
    assert _equal(snapshot, receiver.tensors)
    receiver.reset()
    receiver.apply(first)  # after a reset an older anchor is accepted again
    with pytest.raises(ValueError, match="tile_size"):
        DeltaSender(weights, tile_size=48)


@pytest.mark.parametrize(
    ("dtype", "pattern"),
    [
        (torch.bfloat16, "plus_minus_minus_plus"),
        (torch.float32, "d_minus_2d_d"),
        (torch.float64, "two_sign_flips"),
    ],
)
def test_checksum_catches_changes_that_cancel_in_a_weighted_sum(dtype, pattern):
    """Patterns that a linear checksum (weights times bits) cannot see: each must change it."""
    tensor = (torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 0.1).to(dtype)
    edited = tensor.clone()
    bits = _bits(edited)
    if pattern == "plus_minus_minus_plus":
        bits[500:504] += torch.tensor([1, -1, -1, 1], dtype=bits.dtype)
    elif pattern == "d_minus_2d_d":
        bits[[10, 12, 14]] += torch.tensor([3, -6, 3], dtype=bits.dtype)
    else:
        edited[[3, 9]] = -edited[[3, 9]]
    assert not torch.equal(_bits(edited), _bits(tensor))
    assert tensor_checksum(edited) != tensor_checksum(tensor)
    assert tensor_checksum(tensor.reshape(10, 100)) != tensor_checksum(tensor)  # the shape counts too


def test_an_anchor_the_replica_cannot_hold_is_refused():
    weights = {"a": torch.randn(8), "b": torch.randn(8)}
    shared = torch.zeros(8)
    receiver = DeltaReceiver({"a": shared, "b": shared})  # tied: one storage under two names
    with pytest.raises(PacketError, match="do not hold the anchor"):
        receiver.apply(DeltaSender(weights).packet())
    assert receiver.sequence is None
