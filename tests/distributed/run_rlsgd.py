"""torchrun worker: RLSGD under FSDP2 (``fully_shard``) and DDP against a single-process run.

``--scenario train``: (1) the same gradients set explicitly: FSDP2 and DDP weights after N steps are
bit-identical to a single-process run, for several RLSGD settings and paths; (2) real data-parallel
training on half batches against single-process training on the whole batch: the gradient reduction
order differs, so the weights agree within a stated tolerance (figures written out); (3) a
``torch.distributed.checkpoint`` save in the middle of a run, which then goes on to the end
(the uninterrupted run); full state dicts round-trip.
``--scenario resume``: a fresh job loads that checkpoint into a differently initialised model and
optimizer, continues, and must end bit-identical to the uninterrupted run.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _common import finish, start, write_result
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from sparse_rl_optim import RLSGD, DenseBlockAdamW

STEPS = 6
SAVE_AT = 3


class TinyNet(nn.Module):
    """Shapes that shard unevenly on 2 ranks (5 and 3 rows; 1 row, leaving rank 1 empty), biases, an
    embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.up = nn.Linear(16, 5)
        self.down = nn.Linear(5, 3, bias=False)
        self.out = nn.Linear(3, 7)
        self.score = nn.Linear(3, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.down(torch.relu(self.up(self.embed(tokens)))))
        return self.out(hidden) * torch.sigmoid(self.score(hidden))


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyNet().to(torch.bfloat16)
    with torch.no_grad():  # RL-scale weights around 1e-2..1, so the bf16 gate matters
        for param in model.parameters():
            param.mul_(4.0)
    return model


def shard(model: nn.Module, mesh) -> nn.Module:
    for layer in (model.embed, model.up, model.down, model.out, model.score):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def gradients(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    """Fresh, non-zero full gradients for ``step``, equal on every rank (a generator per step)."""
    generator = torch.Generator().manual_seed(1000 + step)
    return {
        name.replace("module.", ""): (torch.randn(param.shape, generator=generator) * 0.05).to(torch.bfloat16)
        for name, param in model.named_parameters()
    }


def set_gradients(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        name = name.replace("module.", "")
        grad = full[name]
        if isinstance(param, DTensor):  # the shard FSDP2's reduce-scatter would leave (torch's own split)
            grad = distribute_tensor(grad, param.device_mesh, param.placements)
        param.grad = grad.clone()


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name.replace("module.", ""): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        same = torch.equal(got[name].view(torch.int16), want[name].view(torch.int16))
        assert same, f"{what}: {name} differs in {(got[name] != want[name]).sum()} elements"


def run_explicit(model: nn.Module, settings: dict, steps: range, optimizer: RLSGD | None = None) -> RLSGD:
    optimizer = optimizer or RLSGD(model.parameters(), **settings)
    for step in steps:
        set_gradients(model, gradients(model, step))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


SETTINGS = {
    "nearest": dict(lr=0.1),
    "stochastic_momentum": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, rounding="stochastic"),
    "stochastic_reference": dict(lr=0.1, rounding="stochastic", foreach=False, momentum=0.5, dampening=0.1),
    "triton_stochastic": dict(lr=0.1, rounding="stochastic", backend="triton", momentum=0.9),
}


def explicit_gradients(mesh) -> dict:
    """Same gradients: FSDP2 and DDP equal a single-process run bit for bit."""
    results = {}
    for label, settings in SETTINGS.items():
        reference = make_model(0)
        torch.manual_seed(7)  # the stochastic-rounding step seeds (after make_model, which seeds too)
        run_explicit(reference, settings, range(STEPS))
        want = full_weights(reference)
        moved = sum(int((want[n] != make_model(0).state_dict()[n]).sum()) for n in want)
        assert moved > 0, f"{label}: the reference run changed nothing, the comparison would be empty"

        # Ranks seeded differently, as trainers do (TRL: set_seed(seed, device_specific=True)):
        # rank 0's step seeds, broadcast, must reproduce the single-process run seeded like rank 0.
        sharded = shard(make_model(0), mesh)
        torch.manual_seed(7 + dist.get_rank())
        optimizer = run_explicit(sharded, settings, range(STEPS))
        assert_bit_equal(full_weights(sharded), want, f"FSDP2 {label}")
        for param in sharded.parameters():
            assert isinstance(param, DTensor)
            buffer = optimizer.state[param].get("momentum_buffer")
            if settings.get("momentum"):
                assert isinstance(buffer, DTensor) and buffer.placements == param.placements, label
                assert buffer.to_local().shape == param.to_local().shape, label
        if settings.get("momentum"):
            # Each rank holds the fp32 buffers of its own shards only; together, one full set.
            local_numel = sum(param.to_local().numel() for param in sharded.parameters())
            assert optimizer.state_bytes() == 4 * local_numel, (optimizer.state_bytes(), local_numel)
            total = torch.tensor([optimizer.state_bytes()])
            dist.all_reduce(total)
            assert int(total) == 4 * sum(param.numel() for param in sharded.parameters())

        replicated = DistributedDataParallel(make_model(0))
        torch.manual_seed(7 + dist.get_rank())
        run_explicit(replicated, settings, range(STEPS))
        assert_bit_equal(full_weights(replicated), want, f"DDP {label}")
        results[label] = {"changed_elements": moved}

    # Stochastic steps share rank 0's seed through one broadcast per step, whatever each rank's
    # param groups: here rank 0 has an extra group, stepped, and one never stepped (no hang, where a
    # broadcast per stepped group would wait forever; the replicas stay equal).
    model = make_model(0)
    groups = [{"params": list(model.parameters())}]
    extra = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    if dist.get_rank() == 0:
        groups += [{"params": [extra]}, {"params": [nn.Parameter(torch.ones(2, dtype=torch.bfloat16))]}]
    torch.manual_seed(dist.get_rank())
    uneven = RLSGD(groups, lr=0.1, rounding="stochastic")
    for step in range(2):
        set_gradients(model, gradients(model, step))
        extra.grad = torch.full((3,), 0.01, dtype=torch.bfloat16)
        uneven.step()
    mine = torch.cat([p.detach().reshape(-1).view(torch.int16) for p in model.parameters()]).int()  # gloo: no int16
    theirs = mine.clone()
    dist.broadcast(theirs, src=0)
    assert torch.equal(mine, theirs), "replicas stepped with different seeds"

    # A gradient laid out unlike its DTensor parameter is refused, not stepped against the wrong shard.
    # The same check serves the dense-block optimizers.
    model = shard(make_model(0), mesh)
    for optimizer in (RLSGD(model.parameters(), lr=0.1), DenseBlockAdamW(model.parameters(), lr=1e-3)):
        param = next(model.parameters())
        param.grad = torch.ones(param.shape, dtype=param.dtype)
        try:
            optimizer.step()
        except RuntimeError as error:
            assert "DTensor" in str(error) and type(optimizer).__name__ in str(error), error
        else:
            raise AssertionError(f"{type(optimizer).__name__} stepped a plain gradient on a DTensor parameter")
    return results


def real_training(mesh) -> dict:
    """Real data-parallel training: each rank a half batch; the reference the whole batch. The
    gradient reduction order (and for bf16 the rounding of the reduced gradients) differs, so the
    weights agree within a tolerance, stated relative to how far training moved them."""
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 11, (8, 4), generator=generator) for _ in range(STEPS)]
    targets = [torch.randint(0, 7, (8, 4), generator=generator) for _ in range(STEPS)]

    def train(model: nn.Module, halves: bool) -> dict[str, torch.Tensor]:
        optimizer = RLSGD(model.parameters(), lr=0.1)
        for tokens, target in zip(batches, targets, strict=True):
            if halves:
                tokens, target = tokens.chunk(world)[rank], target.chunk(world)[rank]
            logits = model(tokens).float()
            loss = nn.functional.cross_entropy(logits.reshape(-1, 7), target.reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return full_weights(model)

    report = {}
    for dtype, tolerance in ((torch.float32, REAL_TOLERANCE_FP32), (torch.bfloat16, REAL_TOLERANCE_BF16)):

        def fresh(dtype: torch.dtype = dtype) -> nn.Module:
            return make_model(0).to(dtype)

        start_weights = {n: w.float() for n, w in fresh().state_dict().items()}
        want = {n: w.float() for n, w in train(fresh(), halves=False).items()}
        movement = max(float((want[n] - start_weights[n]).abs().max()) for n in want)
        for label, model in (("fsdp2", shard(fresh(), mesh)), ("ddp", DistributedDataParallel(fresh()))):
            got = {n: w.float() for n, w in train(model, halves=True).items()}
            worst = max(float((got[n] - want[n]).abs().max()) for n in want)
            entry = {
                "elements": sum(w.numel() for w in want.values()),
                "moved_by_training": sum(int((want[n] != start_weights[n]).sum()) for n in want),
                "differing_from_single_process": sum(int((got[n] != want[n]).sum()) for n in want),
                "max_abs_difference": worst,
                "max_movement": movement,
                "relative": worst / movement,
            }
            report[f"{label}_{str(dtype).removeprefix('torch.')}"] = entry
            assert entry["moved_by_training"] > 0
            assert worst <= tolerance * movement, (label, dtype, entry)
    return report


#: Stated tolerances of real data-parallel training against one process, as a fraction of the largest
#: change training made to any weight: fp32 sums in another order (last-bit differences); bf16 also
#: rounds the reduced gradient to bf16 and then the weights, so some weights land one or two bf16 steps
#: apart (measured: 25 of 308 weights, at most 5.7% of the largest change).
REAL_TOLERANCE_FP32 = 1e-4
REAL_TOLERANCE_BF16 = 0.1


def checkpoint_settings() -> dict:
    return dict(lr=0.05, momentum=0.9, rounding="stochastic", weight_decay=0.01)


def save_and_continue(mesh, out) -> dict:
    """The uninterrupted run, with a DCP checkpoint after SAVE_AT steps; full state dicts round-trip."""
    model = shard(make_model(0), mesh)
    torch.manual_seed(11 + dist.get_rank())  # ranks seeded differently, as trainers do
    optimizer = run_explicit(model, checkpoint_settings(), range(SAVE_AT))
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(out / "dcp"))
    torch.save(torch.get_rng_state(), out / f"rng_{dist.get_rank()}.pt")

    # A full state dict (gathered, on CPU) loads into a fresh optimizer and reproduces the state.
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    buffers = {fqn: entry["momentum_buffer"] for fqn, entry in full["state"].items()}
    assert buffers and all(not isinstance(b, DTensor) and b.dtype == torch.float32 for b in buffers.values())
    fresh = RLSGD(model.parameters(), **checkpoint_settings())
    set_optimizer_state_dict(model, fresh, optim_state_dict=full, options=StateDictOptions(full_state_dict=True))
    for param in model.parameters():
        held, loaded = optimizer.state[param]["momentum_buffer"], fresh.state[param]["momentum_buffer"]
        assert isinstance(loaded, DTensor) and loaded.dtype == torch.float32
        assert torch.equal(held.to_local(), loaded.to_local())
    # And through the plain torch API: a full (unsharded) buffer lands as this rank's shard.
    plain = optimizer.state_dict()
    plain["state"] = {  # new entries: state_dict() shares the live ones
        index: {**entry, "momentum_buffer": entry["momentum_buffer"].full_tensor()}
        for index, entry in plain["state"].items()
    }
    again = RLSGD(model.parameters(), **checkpoint_settings())
    again.load_state_dict(plain)
    for param in model.parameters():
        loaded = again.state[param]["momentum_buffer"]
        assert isinstance(loaded, DTensor)
        assert torch.equal(optimizer.state[param]["momentum_buffer"].to_local(), loaded.to_local())

    run_explicit(model, checkpoint_settings(), range(SAVE_AT, STEPS), optimizer)
    weights = full_weights(model)
    if dist.get_rank() == 0:
        torch.save(weights, out / "uninterrupted.pt")
    return {"saved_at": SAVE_AT, "steps": STEPS}


def resume(mesh, out) -> dict:
    """A fresh job: another initialisation, load the checkpoint, continue; equal the uninterrupted run."""
    model = shard(make_model(1), mesh)  # different weights: the load must replace them
    optimizer = RLSGD(model.parameters(), **checkpoint_settings())
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(out / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    torch.set_rng_state(torch.load(out / f"rng_{dist.get_rank()}.pt"))
    run_explicit(model, checkpoint_settings(), range(SAVE_AT, STEPS), optimizer)
    want = torch.load(out / "uninterrupted.pt")
    assert_bit_equal(full_weights(model), want, "resumed from DCP")
    # Control: without the optimizer state (momentum buffers) the run diverges.
    control = shard(make_model(1), mesh)
    control_state, _ = get_state_dict(control, RLSGD(control.parameters(), **checkpoint_settings()))
    dcp.load({"model": control_state}, checkpoint_id=str(out / "dcp"))
    set_state_dict(control, [], model_state_dict=control_state, optim_state_dict={})
    torch.set_rng_state(torch.load(out / f"rng_{dist.get_rank()}.pt"))
    run_explicit(control, checkpoint_settings(), range(SAVE_AT, STEPS))
    got = full_weights(control)
    assert any(not torch.equal(got[n], want[n]) for n in want), "the control run should diverge"
    return {"resumed_equal": True}


def main() -> None:
    args, mesh = start(__doc__)
    if args.scenario == "train":
        result = {"explicit": explicit_gradients(mesh), "real": real_training(mesh)}
        dist.barrier()
        result["checkpoint"] = save_and_continue(mesh, args.out)
        write_result(args.out, "rlsgd_train", result)
    else:
        write_result(args.out, "rlsgd_resume", resume(mesh, args.out))
    if dist.get_rank() == 0:
        print(json.dumps({"scenario": args.scenario}))
    finish()


if __name__ == "__main__":
    main()
