"""torchrun worker: DenseBlockAdamW / DenseBlockSGD under FSDP2 (``fully_shard``) and DDP against a
single-process run computed here on a plain copy (the independent reference).

``--scenario train``: (1) the same full gradients every step (random, fresh per step; FSDP2 gets each
rank's shard of them): after N steps with reselection, for AdamW and SGD, every selection strategy,
bf16 and fp32, and group settings changed mid-run (density 0.25 -> 1.0 -> 0.25, ``dense_below``
there and back), the sharded weights are bit-identical to the single-process ones, the active global
tile sets are equal, each rank holds exactly the state rows of its own tiles (bit-equal to the
reference's rows for them), its ``state_bytes`` is its share, and the full state dict equals the
single-process state dict; (2) DDP with real backward passes on per-rank data: every rank equals a
single-process optimizer given the reduced gradients; (3) a full state dict round trip into a fresh
FSDP2 model and optimizer, the single-process state dict and the sharded one loaded directly (the
latter holding at most one tensor's gathered state at a time), all continuing bit-identically; a
``torch.distributed.checkpoint`` save in the middle of a run that then goes on to the end (the
uninterrupted run, whose weights are written out), for AdamW and for SGD with momentum,
``"off_principal"`` and a density changed before the save; (4) a shard boundary inside a tile
raises the documented ``ValueError``.
``--scenario resume``: a fresh job loads each checkpoint into a differently initialised model and a
fresh optimizer (set to the saved density first; its state-creating step at lr 0 must not
all-gather weights), continues, and must end bit-identical to the uninterrupted run and to a
single-process run from scratch.
"""

from __future__ import annotations

import contextlib
import time
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _common import finish, start, write_result
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from sparse_rl_optim import DenseBlockAdamW, DenseBlockSGD
from sparse_rl_optim.distributed import is_dtensor
from sparse_rl_optim.optim import dense_block

TILE = 32
STEPS = 7  # reselections after steps 3 and 6
SAVE_AT = 4
#: name -> shape. On 2 ranks: "a" 8 + 8 rows; "b" 3 + 2 rows (uneven); "c" 4 + 3 rows, with a partial
#: last tile; "d" 1 + 0 rows (rank 1 holds nothing); "bias" (1-D) and "small" (120 < dense_below
#: elements) are handled densely and their shard boundaries (elements 20 and 60) fall inside tiles.
SHAPES = {"a": (16, 64), "b": (5, 96), "c": (7, 40), "d": (1, 256), "bias": (40,), "small": (6, 20)}
BLOCKED = ("a", "b", "c", "d")
SETTINGS = dict(density=0.25, tile_size=TILE, reselect_every=3, dense_below=200, principal_rank=2)


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        for name, shape in SHAPES.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape, generator=generator).to(dtype)))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum((param.float() * inputs[name]).sin().sum() for name, param in self.named_parameters())


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bit patterns (so -0.0 != 0.0 and NaNs compare by payload)."""
    integer = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    tensor = tensor.detach().contiguous()
    return tensor.view(integer) if tensor.is_floating_point() else tensor


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def full_gradients(step: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Fresh, non-zero full gradients for ``step``, the same on every rank; rows scaled over orders
    of magnitude (so the gradient ranking moves tiles between ranks), a few exact -0.0."""
    generator = torch.Generator().manual_seed(1000 + step)
    grads = {}
    for name, shape in SHAPES.items():
        grad = torch.randn(shape, generator=generator)
        scale = torch.exp(2.0 * torch.randn(shape[0], generator=generator))
        grad = grad * (scale.view(-1, *[1] * (len(shape) - 1)) if len(shape) > 1 else scale)
        grad.view(-1)[:3] = -0.0
        grads[name] = grad.to(dtype)
    return grads


def make_optimizer(params, config: dict[str, Any]):
    kwargs = {key: value for key, value in config.items() if key not in ("cls", "dtype", "changes", "hsdp")}
    if config["cls"] == "adamw":
        return DenseBlockAdamW(params, lr=1e-2, weight_decay=0.01, **SETTINGS, **kwargs)
    return DenseBlockSGD(params, lr=0.05, weight_decay=0.01, **SETTINGS, **kwargs)


def apply_changes(optimizer, config: dict[str, Any], step: int) -> None:
    """The group settings that ``config["changes"]`` (``{step: {setting: value}}``) sets before ``step``."""
    optimizer.param_groups[0].update(config.get("changes", {}).get(step, {}))


def sharded_net(config: dict[str, Any], mesh, seed: int = 0) -> nn.Module:
    if config.get("hsdp"):  # a 2-D mesh: placements (Replicate(), Shard(0)), as HSDP makes
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("replicate", "shard"))
    return fully_shard(Net(config["dtype"], seed), mesh=mesh)


def set_sharded_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        param.grad = distribute_tensor(grads[name], param.device_mesh, param.placements, src_data_rank=None)


def set_plain_grads(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
    for name, param in params.items():
        param.grad = grads[name].clone()


class Reference:
    """The single-process run: plain copies of the initial weights, the same optimizer settings."""

    def __init__(self, config: dict[str, Any], seed: int = 0) -> None:
        self.net = Net(config["dtype"], seed)
        self.params = dict(self.net.named_parameters())
        self.optimizer = make_optimizer(list(self.params.values()), config)
        self.config = config

    def step(self, step: int) -> None:
        apply_changes(self.optimizer, self.config, step)
        set_plain_grads(self.params, full_gradients(step, self.config["dtype"]))
        self.optimizer.step()


def step_sharded(model: nn.Module, optimizer, config: dict[str, Any], step: int) -> None:
    apply_changes(optimizer, config, step)
    set_sharded_grads(model, full_gradients(step, config["dtype"]))
    optimizer.step()


def all_lists(value: list[int]) -> list[list[int]]:
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def compare(tag: str, model: nn.Module, optimizer, reference: Reference, failures: list[str]) -> dict[str, Any]:
    """Weights, active tile sets, per-rank state rows and bytes against the reference."""
    params = dict(model.named_parameters())
    for name, param in params.items():
        full = param.full_tensor()
        if not same_bits(full, reference.params[name].detach()):
            differ = int((bits(full) != bits(reference.params[name])).sum())
            failures.append(f"{tag}: weights of {name} differ from the single-process run in {differ} elements")
    active, ref_active = optimizer.active_tiles(), reference.optimizer.active_tiles()
    counts = {}
    row_keys = [
        key
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer")
        if key in reference.optimizer.state[reference.params["a"]]
    ]
    for name, param in params.items():
        ref_param = reference.params[name]
        mine = active[param]
        per_rank = all_lists(mine.tolist())
        union = sorted(set().union(*map(set, per_rank)))
        if union != ref_active[ref_param].tolist():
            failures.append(f"{tag}: active tiles of {name} {union} != single-process {ref_active[ref_param].tolist()}")
        if name not in BLOCKED:
            continue
        counts[name] = [len(ids) for ids in per_rank]
        if sum(counts[name]) != len(union):
            failures.append(f"{tag}: ranks share active tiles of {name}: {per_rank}")
        # This rank's rows are the reference's rows of the same global tiles, bit for bit.
        state, ref_state = optimizer.state[param], reference.optimizer.state[ref_param]
        if not set(mine.tolist()) <= set(ref_state["tile_ids"].tolist()):
            continue  # reported above
        slots = torch.searchsorted(ref_state["tile_ids"], mine)
        for key in (*row_keys, "tile_steps"):
            if key in ref_state and not same_bits(state[key], ref_state[key][slots]):
                failures.append(f"{tag}: rank {dist.get_rank()} {key} rows of {name} differ from the reference's")
    report, ref_report = optimizer.state_bytes_report(), reference.optimizer.state_bytes_report()
    expected_rows = 4 * TILE * len(row_keys) * sum(active[params[name]].numel() for name in BLOCKED)
    if report["rows"] != expected_rows:
        failures.append(f"{tag}: rank {dist.get_rank()} holds {report['rows']} row bytes, expected {expected_rows}")
    rows = torch.tensor([report["rows"]])
    dist.all_reduce(rows)
    if int(rows) != ref_report["rows"]:
        failures.append(f"{tag}: row bytes over the ranks {int(rows)} != single-process {ref_report['rows']}")
    return {"counts": counts, "rows": all_lists([report["rows"]]), "ref_rows": ref_report["rows"]}


def compare_full_state_dict(tag: str, full: dict[str, Any], reference: Reference, failures: list[str]) -> None:
    """The full (gathered) optimizer state dict equals the single-process one, key by key, bit by bit."""
    ref = reference.optimizer.state_dict()
    for index, name in enumerate(reference.params):
        mine, theirs = full["state"].get(name), ref["state"].get(index)
        if mine is None or set(mine) != set(theirs):
            failures.append(
                f"{tag}: full state of {name} has keys {mine and sorted(mine)}, single process {sorted(theirs)}"
            )
            continue
        for key, value in theirs.items():
            ok = same_bits(mine[key], value) if isinstance(value, torch.Tensor) else mine[key] == value
            if not ok:
                failures.append(f"{tag}: full state dict {name}.{key} differs from the single-process state dict")


#: Every tile active for a while, then back to density 0.25 (step 3), and again through ``dense_below``
#: (steps 4 to 5): neither return falls on a periodic reselection, so only the changed count reselects.
DENSE_ROUND_TRIP = {
    2: {"density": 1.0},
    3: {"density": 0.25},
    4: {"dense_below": 1 << 20},
    5: {"dense_below": SETTINGS["dense_below"]},
}
CONFIGS = [
    *(
        {"cls": "adamw", "select": select, "dtype": dtype}
        for select in ("grad", "random", "off_principal")
        for dtype in (torch.bfloat16, torch.float32)
    ),
    *(
        {"cls": "sgd", "momentum": 0.9, "select": select, "dtype": dtype}
        for select in ("grad", "random", "off_principal")
        for dtype in (torch.bfloat16, torch.float32)
    ),
    {"cls": "sgd", "momentum": 0.0, "select": "grad", "dtype": torch.float32},
    {"cls": "sgd", "momentum": 0.9, "nesterov": True, "select": "grad", "dtype": torch.bfloat16, "rest": "sgd"},
    {
        "cls": "adamw",
        "select": "grad",
        "dtype": torch.bfloat16,
        "rest": "sgd",
        "rest_lr": 0.05,
        "changes": {5: {"density": 0.5}},
    },
    {"cls": "adamw", "select": "grad", "dtype": torch.float32, "changes": DENSE_ROUND_TRIP},
    {"cls": "adamw", "select": "grad", "dtype": torch.bfloat16, "hsdp": True},
    {"cls": "adamw", "select": "grad", "dtype": torch.bfloat16, "rest": "sgd", "rest_lr": 0.05, "backend": "triton"},
    {"cls": "sgd", "momentum": 0.9, "select": "off_principal", "dtype": torch.float32, "hsdp": True},
]
#: The runs that are checkpointed (and resumed by the second job). The second changes its density before
#: the save: the resume builds its optimizer with the saved density (the documented recipe).
SAVED = [
    {"cls": "adamw", "select": "grad", "dtype": torch.bfloat16},
    {
        "cls": "sgd",
        "momentum": 0.9,
        "select": "off_principal",
        "dtype": torch.float32,
        "changes": {3: {"density": 0.5}},
    },
]


@contextlib.contextmanager
def no_warnings_of_ours(tag: str, failures: list[str]) -> Iterator[None]:
    """Fail on warnings from sparse_rl_optim (e.g. the state-creating step at lr 0 of DCP's loaders
    must not warn about an all-zero gradient)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        if "dense-block" in str(warning.message) or "DenseBlock" in str(warning.message):
            failures.append(f"{tag}: unexpected warning {warning.message}")


def describe(config: dict[str, Any]) -> str:
    return ",".join(f"{k}={str(v).replace('torch.', '')}" for k, v in config.items())


def save_and_continue(args, mesh, index: int, config: dict[str, Any], failures: list[str]) -> None:
    """Run ``config`` to ``SAVE_AT``, save it (DCP: resumed by the second job), load its state three
    ways into fresh optimizers here, and go on to ``STEPS`` with all of them."""
    tag = "saved " + describe(config)
    model = sharded_net(config, mesh)
    optimizer = make_optimizer(list(model.parameters()), config)
    reference = Reference(config)
    for step in range(1, SAVE_AT + 1):
        step_sharded(model, optimizer, config, step)
        reference.step(step)
    full_options = StateDictOptions(full_state_dict=True)
    full_model = get_model_state_dict(model, options=full_options)
    full_optim = get_optimizer_state_dict(model, optimizer, options=full_options)
    compare_full_state_dict(tag + " at save", full_optim, reference, failures)
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
        checkpoint_id=str(args.out / f"checkpoint{index}"),
    )
    # (a) the full state dict into a fresh FSDP2 model and optimizer (its state-creating step at lr 0
    # included; at the initial density: unlike DCP's load, this one takes another density's state)
    model_b = sharded_net(config, mesh, seed=7)
    optimizer_b = make_optimizer(list(model_b.parameters()), config)
    set_model_state_dict(model_b, full_model, options=full_options)
    with no_warnings_of_ours(tag + " full state dict load", failures):
        set_optimizer_state_dict(model_b, optimizer_b, full_optim, options=full_options)
    # (b) the single-process state dict (plain tensors, ids as keys) through load_state_dict
    model_c = sharded_net(config, mesh, seed=8)
    set_model_state_dict(model_c, full_model, options=full_options)
    optimizer_c = make_optimizer(list(model_c.parameters()), config)
    with no_warnings_of_ours(tag + " single-process state dict load", failures):
        optimizer_c.load_state_dict(reference.optimizer.state_dict())
    # (c) the sharded state dict (DTensors, as DCP hands it over) through load_state_dict, which holds
    # at most one tensor's full state at a time
    model_d = sharded_net(config, mesh, seed=9)
    set_model_state_dict(model_d, full_model, options=full_options)
    optimizer_d = make_optimizer(list(model_d.parameters()), config)
    sharded_optim = optimizer.state_dict()
    with no_warnings_of_ours(tag + " sharded state dict load", failures), peak_full_state() as peak:
        optimizer_d.load_state_dict(sharded_optim)
    one_tensor = max(
        sum(value.numel() * value.element_size() for value in entry.values() if is_dtensor(value))
        for entry in sharded_optim["state"].values()
    )
    if not 0 < peak["bytes"] <= one_tensor:
        failures.append(
            f"{tag}: load_state_dict held {peak['bytes']} bytes of gathered state at once, "
            f"more than one tensor's full state ({one_tensor} bytes)"
        )
    del sharded_optim
    for step in range(SAVE_AT + 1, STEPS + 1):
        for net, opt in ((model, optimizer), (model_b, optimizer_b), (model_c, optimizer_c), (model_d, optimizer_d)):
            step_sharded(net, opt, config, step)
        reference.step(step)
    compare(tag + " uninterrupted", model, optimizer, reference, failures)
    compare(tag + " full state dict round trip", model_b, optimizer_b, reference, failures)
    compare(tag + " single-process state dict", model_c, optimizer_c, reference, failures)
    compare(tag + " sharded state dict", model_d, optimizer_d, reference, failures)
    final = {name: param.full_tensor() for name, param in model.named_parameters()}
    if dist.get_rank() == 0:
        torch.save(final, args.out / f"uninterrupted{index}.pt")


@contextlib.contextmanager
def peak_full_state() -> Iterator[dict[str, int]]:
    """The most bytes of state that ``load_state_dict`` all-gathered (``dense_block._full``) and
    held at the same time, in ``peak["bytes"]`` (tensors are followed until they are freed)."""
    original = dense_block._full
    live, peak = [0], {"bytes": 0}

    def release(size: int) -> None:
        live[0] -= size

    def tracked(value: Any) -> Any:
        out = original(value)
        if is_dtensor(value):
            size = out.numel() * out.element_size()
            live[0] += size
            peak["bytes"] = max(peak["bytes"], live[0])
            weakref.finalize(out, release, size)
        return out

    dense_block._full = tracked
    try:
        yield peak
    finally:
        dense_block._full = original


@contextlib.contextmanager
def counting_weight_gathers(params: list[torch.Tensor]) -> Iterator[list[int]]:
    """How often the full tensor of one of ``params`` is all-gathered, in ``count[0]``."""
    from torch.distributed.tensor import DTensor

    original, watched, count = DTensor.full_tensor, {id(param) for param in params}, [0]

    def full_tensor(self, *args, **kwargs):
        count[0] += id(self) in watched
        return original(self, *args, **kwargs)

    DTensor.full_tensor = full_tensor
    try:
        yield count
    finally:
        DTensor.full_tensor = original


def train(args, mesh, failures: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for config in CONFIGS:
        tag = describe(config)
        model = sharded_net(config, mesh)
        optimizer = make_optimizer(list(model.parameters()), config)
        reference = Reference(config)
        rounds = []
        for step in range(1, STEPS + 1):
            step_sharded(model, optimizer, config, step)
            reference.step(step)
            rounds.append(reference.optimizer.active_tiles()[reference.params["a"]].tolist())
        results[tag] = compare(tag, model, optimizer, reference, failures)
        results[tag]["reselection_moved_tiles"] = rounds[2] != rounds[3] or rounds[5] != rounds[6]
        full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
        compare_full_state_dict(tag, full, reference, failures)

    # DDP: real backward passes on different data per rank, gradients averaged by DDP.
    for config in (
        {"cls": "adamw", "select": "grad", "dtype": torch.float32},
        {"cls": "sgd", "momentum": 0.9, "select": "off_principal", "dtype": torch.float32},
    ):
        tag = "ddp " + describe(config)
        net = Net(config["dtype"])
        ddp = DistributedDataParallel(net)
        optimizer = make_optimizer(list(ddp.parameters()), config)
        reference = Reference(config)
        for step in range(1, STEPS + 1):
            generator = torch.Generator().manual_seed(50 * step + dist.get_rank())
            inputs = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
            optimizer.zero_grad()
            ddp(inputs).backward()
            for name, param in net.named_parameters():
                reference.params[name].grad = param.grad.clone()
            optimizer.step()
            reference.optimizer.step()
        for name, param in net.named_parameters():
            replicas = [torch.empty_like(param) for _ in range(dist.get_world_size())]
            dist.all_gather(replicas, param.detach())
            if not all(same_bits(replica, reference.params[name].detach()) for replica in replicas):
                failures.append(f"{tag}: weights of {name} differ from the single-process run")
        for param, ids in optimizer.active_tiles().items():
            name = next(n for n, p in net.named_parameters() if p is param)
            if ids.tolist() != reference.optimizer.active_tiles()[reference.params[name]].tolist():
                failures.append(f"{tag}: active tiles of {name} differ")

    # Full state dict round trip, the single-process and the sharded state dict loaded directly, DCP save mid-run.
    for index, config in enumerate(SAVED):
        save_and_continue(args, mesh, index, config, failures)

    # A blocked tensor whose shard boundary falls inside a tile.
    misaligned = fully_shard(nn.Linear(48, 4, bias=False), mesh=mesh)  # rows 2 + 2: boundary at element 96
    optimizer = DenseBlockAdamW(misaligned.parameters(), tile_size=64, dense_below=0, density=0.5)
    weight = misaligned.weight
    weight.grad = distribute_tensor(torch.ones(4, 48), mesh, weight.placements, src_data_rank=None)
    try:
        optimizer.step()
        results["misaligned_error"] = None
    except ValueError as error:
        results["misaligned_error"] = str(error)
    return results


def resume(args, mesh, failures: list[str]) -> dict[str, Any]:
    resumed = {}
    for index, config in enumerate(SAVED):
        tag = "resumed " + describe(config)
        checkpoint = str(args.out / f"checkpoint{index}")
        model = sharded_net(config, mesh, seed=3)  # other weights: the load must bring them
        optimizer = make_optimizer(list(model.parameters()), config)
        # DCP loads into the shapes of the state created here, which follow the density (without this,
        # "Size mismatch between saved torch.Size([16]) and current: torch.Size([8]) for optim.state.a.tile_ids"):
        # the saved settings first, the recipe of the module docstring.
        saved = {"optim": {"param_groups": [{"density": 0.0, "dense_below": 0} for _ in optimizer.param_groups]}}
        dcp.load(saved, checkpoint_id=checkpoint)
        for group, saved_group in zip(optimizer.param_groups, saved["optim"]["param_groups"], strict=True):
            group.update(saved_group)
        model_state = get_model_state_dict(model)
        with no_warnings_of_ours(tag + " load", failures):
            with counting_weight_gathers(list(model.parameters())) as gathers:
                optim_state = get_optimizer_state_dict(model, optimizer)  # creates the state (a step at lr 0)
            dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint)
            set_model_state_dict(model, model_state)
            set_optimizer_state_dict(model, optimizer, optim_state)
        if gathers[0]:
            failures.append(f"{tag}: the state-creating step at lr 0 all-gathered {gathers[0]} weights")
        reference = Reference(config)
        for step in range(1, SAVE_AT + 1):
            reference.step(step)
        for step in range(SAVE_AT + 1, STEPS + 1):
            step_sharded(model, optimizer, config, step)
            reference.step(step)
        compare(tag, model, optimizer, reference, failures)
        uninterrupted = torch.load(args.out / f"uninterrupted{index}.pt")
        for name, param in model.named_parameters():
            if not same_bits(param.full_tensor(), uninterrupted[name]):
                failures.append(f"{tag}: weights of {name} differ from the uninterrupted run of the first job")
        full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
        compare_full_state_dict(tag, full, reference, failures)
        resumed[tag] = sorted(uninterrupted)
    return {"compared_with_uninterrupted": resumed}


def main() -> None:
    args, mesh = start(__doc__ or "")
    began = time.perf_counter()
    failures: list[str] = []
    torch.manual_seed(0)
    results = (train if args.scenario == "train" else resume)(args, mesh, failures)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, failures)
    failures = [failure for rank_failures in everyone for failure in rank_failures]
    results["failures"] = failures
    results["seconds"] = round(time.perf_counter() - began, 2)
    write_result(args.out, args.scenario, results)
    if dist.get_rank() == 0:
        for failure in failures:
            print("FAILED:", failure)
    finish(1 if failures else 0)


if __name__ == "__main__":
    main()
