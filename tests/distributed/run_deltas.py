"""torchrun worker: sharded delta packets under FSDP2 (``fully_shard``) and DDP, 2 ranks, gloo.

Every rank trains its part (a half batch, SGD on bf16 weights, plus in-place edits writing NaNs with
a payload, infinities and negative zeros into a parameter the loss does not use) and makes its shard
packet with a :class:`ShardedDeltaSender` per encoding (``sparse``, ``tiles``, ``auto``; an anchor
every 3 packets); rank 0 gathers them. After every sync rank 0 checks that

* the reassembled packet equals, byte for byte (``packet_to_bytes``), the packet a single-process
  :class:`DeltaSender` makes from the full weights (``full_tensor()``, gathered separately); for
  ``auto`` the same changed positions and new values where the encoding chosen differs;
* a plain model on rank 0 that started equal and applied every packet is bit-equal to the full
  weights;
* a missing, repeated, foreign (previous sync's) or corrupted (bytes flipped in transit) shard packet
  raises ``PacketError`` and leaves the replica untouched.

The same for a DDP model (rank 0 encodes the replica, rank 1 lists empty spans). Rank 0 writes the
per-sync sizes (``deltas.json``) for the launching test.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from _common import finish, start, write_result
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from sparse_rl_optim.deltas import (
    DeltaReceiver,
    DeltaSender,
    PacketError,
    ShardedDeltaSender,
    assemble_packets,
    gather_packets,
    gather_shard_packets,
    packet_to_bytes,
    shard_packet_from_bytes,
    shard_packet_to_bytes,
)
from sparse_rl_optim.deltas.encoding import decode_into

STEPS = 7
ENCODINGS = ("sparse", "tiles", "auto")
_INT16 = torch.int16


class Net(nn.Module):
    """Uneven shards on 2 ranks: 7 rows (4 + 3, shard boundaries inside 64-element tiles), a bias of
    1 row (rank 1 holds none of it), an embedding, and a parameter the loss does not use."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 45)
        self.up = nn.Linear(45, 7)
        self.down = nn.Linear(7, 1)
        self.out = nn.Linear(1, 5)
        self.extra = nn.Parameter(torch.randn(5, 13))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.down(torch.relu(self.up(self.embed(tokens))))))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return Net().to(torch.bfloat16)


def shard(model: nn.Module, mesh) -> nn.Module:
    for layer in (model.embed, model.up, model.down, model.out):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().view(-1).view(_INT16)


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        assert torch.equal(bits(got[name]), bits(want[name])), f"{what}: {name} differs"


def special_edits(model: nn.Module, step: int) -> None:
    """Write special values into this rank's shard of ``extra`` (the loss does not use it)."""
    param = model.extra
    local = param.to_local() if isinstance(param, DTensor) else param
    if local.numel() == 0:
        return
    flat = local.detach().view(-1)
    patterns = torch.tensor([0x7FC3, 0xFF80 - 0x10000, 0x8000 - 0x10000, 0x7F80, 0x0001], dtype=_INT16)
    at = (step * 3 + torch.arange(2) * 5 + dist.get_rank()) % flat.numel()
    with torch.no_grad():
        flat.view(_INT16)[at] = patterns[(step + torch.arange(2)) % len(patterns)]


def changes_as_values(packet, replica: dict[str, torch.Tensor]) -> dict[str, tuple[list, list]]:
    """Per changed tensor, the positions and new bit patterns the packet writes into ``replica``."""
    out = {}
    for name, encoded in packet.changes.items():
        positions, values = decode_into(replica[name], encoded)
        order = positions.argsort()
        out[name] = (positions[order].tolist(), values[order].tolist())
    return out


def refused(receiver: DeltaReceiver, replica: nn.Module, attempt, what: str) -> str:
    before = {n: p.detach().clone() for n, p in replica.named_parameters()}
    try:
        receiver.apply(attempt())
    except PacketError as error:
        assert_bit_equal({n: p.detach() for n, p in replica.named_parameters()}, before, f"after refusing {what}")
        return str(error)
    raise AssertionError(f"{what} was not refused")


def broken_sets(packets, previous) -> dict:
    """Ways a set of shard packets for one sync can go wrong, as functions returning the full packet."""
    flipped = bytearray(shard_packet_to_bytes(packets[1]))
    flipped[len(flipped) - 3] ^= 0x04  # in the last payload tensor's bytes
    header = bytearray(shard_packet_to_bytes(packets[0]))
    at = header.index(b'"span\\":[') + len(b'"span\\":[')  # (the packet's JSON, escaped in safetensors' JSON)
    assert chr(header[at]).isdigit()
    header[at] ^= 0x01  # the start of a span: 0 <-> 1, 2 <-> 3, ...

    def corrupted_in_memory():
        copies = copy.deepcopy(packets)
        victim = next(p for p in copies if p.changes)
        encoded = next(iter(victim.changes.values()))
        payload = encoded.values if encoded.values is not None else encoded.differences
        payload.view(-1).view(torch.uint8)[0] ^= 0x20
        return assemble_packets(copies)

    return {
        "missing rank 1": lambda: assemble_packets(packets[:1]),
        "rank 0 twice": lambda: assemble_packets([packets[0], packets[0], packets[1]]),
        "rank 1 from the previous sync": lambda: assemble_packets([packets[0], previous[1]]),
        "payload bytes flipped in transit": lambda: assemble_packets(
            [packets[0], shard_packet_from_bytes(bytes(flipped))]
        ),
        "header bytes flipped in transit": lambda: assemble_packets(
            [shard_packet_from_bytes(bytes(header)), packets[1]]
        ),
        "payload corrupted in memory": corrupted_in_memory,
    }


def run_fsdp(mesh) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = shard(make_model(), mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    senders = {enc: ShardedDeltaSender(model, encoding=enc, anchor_every=3) for enc in ENCODINGS}
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor), name
    # Rank 0: a full replica per encoding, and the single-process sender over the full weights.
    replicas = {enc: make_model() for enc in ENCODINGS} if rank == 0 else {}
    receivers = {enc: DeltaReceiver(replica) for enc, replica in replicas.items()}
    initial = full_weights(model)  # a collective: every rank
    reference_weights = initial if rank == 0 else {}
    references = {enc: DeltaSender(reference_weights, encoding=enc, anchor_every=3) for enc in replicas}

    generator = torch.Generator().manual_seed(5)
    report: dict = {enc: [] for enc in ENCODINGS}
    report["refused"] = {}
    report["auto_choices_differing"] = 0
    previous: dict = {}
    for step in range(STEPS):
        tokens = torch.randint(0, 11, (8, 6), generator=generator)
        target = torch.randint(0, 5, (8, 6), generator=generator)
        if step:  # step 0: the anchor of the initial weights
            logits = model(tokens.chunk(world)[rank]).float()
            loss = nn.functional.cross_entropy(logits.reshape(-1, 5), target.chunk(world)[rank].reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            special_edits(model, step)
        gathered = {}
        for enc in ENCODINGS:
            shard_packets = gather_shard_packets(senders[enc].packet(step=step))
            gathered[enc] = (None if shard_packets is None else assemble_packets(shard_packets), shard_packets)
            if rank != 0:
                assert shard_packets is None
        truth = full_weights(model)  # gathered independently of the packets
        if rank != 0:
            continue
        for name, tensor in truth.items():
            reference_weights[name].copy_(tensor)
        for enc in ENCODINGS:
            assembled, shard_packets = gathered[enc]
            want = references[enc].packet(step=step)
            if enc != "auto" or packet_to_bytes(assembled) == packet_to_bytes(want):
                assert packet_to_bytes(assembled) == packet_to_bytes(want), f"{enc} step {step}"
            else:  # auto decided on summed shard sizes: the same changes, perhaps another encoding
                report["auto_choices_differing"] += 1
                assert assembled.before == want.before and assembled.after == want.after, f"{enc} step {step}"
                state = dict(replicas[enc].named_parameters())
                assert changes_as_values(assembled, state) == changes_as_values(want, state), f"{enc} step {step}"
            replica = replicas[enc]
            if not assembled.is_anchor and enc in previous:
                for what, attempt in broken_sets(shard_packets, previous[enc]).items():
                    report["refused"].setdefault(f"{enc}: {what}", refused(receivers[enc], replica, attempt, what))
            receivers[enc].apply(assembled)
            assert_bit_equal(dict(replica.named_parameters()), truth, f"{enc} replica after step {step}")
            previous[enc] = shard_packets
            report[enc].append(
                {
                    "step": step,
                    "anchor": assembled.is_anchor,
                    "changed": sum(c.count for c in assembled.changes.values()),
                    "full_packet_bytes": assembled.nbytes(),
                    "full_packet_file_bytes": len(packet_to_bytes(assembled)),
                    "shard_bytes": sum(p.nbytes() for p in shard_packets),
                    "shard_wire_bytes": sum(len(shard_packet_to_bytes(p)) for p in shard_packets),
                }
            )
    return report


def run_ddp() -> dict:
    rank = dist.get_rank()
    model = DistributedDataParallel(make_model(), find_unused_parameters=True)  # (extra)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    sender = ShardedDeltaSender(model.module, anchor_every=None)
    if rank == 0:
        replica = make_model()
        receiver = DeltaReceiver(replica)
        reference_weights = full_weights(model.module)
        reference = DeltaSender(reference_weights, encoding="sparse", anchor_every=None)
    generator = torch.Generator().manual_seed(6)
    changed = []
    for step in range(4):
        if step:
            tokens = torch.randint(0, 11, (8, 6), generator=generator).chunk(2)[rank]
            target = torch.randint(0, 5, (8, 6), generator=generator).chunk(2)[rank]
            loss = nn.functional.cross_entropy(model(tokens).float().reshape(-1, 5), target.reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        packet = sender.packet(step=step)
        if rank != 0:
            assert not packet.changes and not packet.full and set(packet.spans.values()) == {(0, 0)}
        assembled = gather_packets(packet)
        if rank == 0:
            for name, tensor in full_weights(model.module).items():
                reference_weights[name].copy_(tensor)
            assert packet_to_bytes(assembled) == packet_to_bytes(reference.packet(step=step)), f"DDP step {step}"
            receiver.apply(assembled)
            assert_bit_equal(dict(replica.named_parameters()), full_weights(model.module), f"DDP step {step}")
            changed.append(sum(c.count for c in assembled.changes.values()))
    return {"changed": changed}


def main() -> None:
    args, mesh = start("sharded delta packets")
    report = {"fsdp2": run_fsdp(mesh), "ddp": run_ddp()}
    write_result(args.out, "deltas", report)
    finish()


if __name__ == "__main__":
    main()
