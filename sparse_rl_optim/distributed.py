"""Parameters spread over processes: FSDP2 shards (``DTensor``) and DDP replicas.

The one home for what the optimizers, the tracker and the deltas need to know about a parameter
that lives on several ranks:

* :func:`local_tensor`: the part this rank holds (the local shard of a ``DTensor``, sharing its
  storage, so in-place updates reach the parameter; any other tensor as it is).
* :func:`shard_span`: which flat elements of the full tensor that part is. FSDP2 shards dim 0
  (``Shard(0)``, chunks of ``ceil(dim0 / world)`` rows), so a local shard is one contiguous range
  ``[start, stop)`` of the row-major flat tensor; element indices that must be global (stochastic
  rounding's random stream, tile ids, delta positions) are ``start + local index``.
* :func:`counts_here`: whether this rank's copy counts in a global sum, so that a sum over ranks
  counts every element once (shards count everywhere; a replica only on one rank).
* :func:`all_reduce_sum`: one in-place sum over the default process group (a no-op without one).

Only ``Shard(0)`` and ``Replicate()`` placements are supported (what FSDP2 and HSDP make);
others raise a ``NotImplementedError`` that names them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "ShardSpan",
    "all_reduce_sum",
    "broadcast_int",
    "counts_here",
    "is_distributed",
    "is_dtensor",
    "is_main_rank",
    "is_sharded",
    "local_parts",
    "local_tensor",
    "merge_shards_",
    "shard_like",
    "shard_span",
    "shard_spans",
    "split_rows_like",
    "wrap_like",
]


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter or its grad)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_rank() -> bool:
    """Global rank 0 of a multi-rank run, or a single process: where replicated figures count once
    and where warnings and logs are written."""
    return not is_distributed() or dist.get_rank() == 0


def local_tensor(tensor: Tensor) -> Tensor:
    """The elements this rank holds: a ``DTensor``'s local shard (same storage, no copy, no
    communication), any other tensor itself."""
    if is_dtensor(tensor):
        with torch.no_grad():
            return tensor.to_local()
    return tensor


def local_parts(param: Tensor, owner: str) -> tuple[Tensor, Tensor]:
    """``(param, param.grad)`` as this rank holds them (:func:`local_tensor`), for an optimizer
    (``owner``, named in errors) to step. A ``DTensor`` param needs a ``DTensor`` grad laid out the
    same way (what FSDP2 leaves after its reduce-scatter); anything else would step one shard with
    another part's gradient, so it raises."""
    grad = param.grad
    if is_dtensor(param) != is_dtensor(grad):
        kinds = {True: "a DTensor", False: "a plain tensor"}
        raise RuntimeError(
            f"{owner}: a parameter of shape {tuple(param.shape)} is {kinds[is_dtensor(param)]} but its gradient is "
            f"{kinds[is_dtensor(grad)]}; set gradients laid out like their parameters (e.g. distribute_tensor)."
        )
    if is_dtensor(param) and (param.placements != grad.placements or param.device_mesh != grad.device_mesh):
        raise RuntimeError(
            f"{owner}: the gradient of a DTensor parameter of shape {tuple(param.shape)} has placements "
            f"{tuple(grad.placements)} on {grad.device_mesh}; its parameter has {tuple(param.placements)} on "
            f"{param.device_mesh}. Reduce it first (FSDP2 does, in backward)."
        )
    return local_tensor(param), local_tensor(grad)


def wrap_like(local: Tensor, like: Tensor) -> Tensor:
    """``local`` as a tensor laid out like ``like``: a ``DTensor`` with ``like``'s mesh, placements,
    global shape and stride when ``like`` is one (no communication), else ``local`` itself. Used for
    param-shaped optimizer state, so ``torch.distributed.checkpoint`` saves it sharded."""
    if not is_dtensor(like):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def shard_like(value: Tensor, like: Tensor) -> Tensor:
    """``value`` laid out like ``like``: a full (plain) tensor of ``like``'s global shape becomes this
    rank's shard of it as a ``DTensor`` (a local slice, no communication); anything else is returned
    as it is. Lets a full optimizer state dict load into an optimizer over FSDP2 params."""
    if not is_dtensor(like) or is_dtensor(value):
        return value
    if value.shape != like.shape:
        raise ValueError(
            f"cannot shard a tensor of shape {tuple(value.shape)} like a parameter of shape {tuple(like.shape)}"
        )
    return split_rows_like(value, like)  # the rows of dim 0 that like's shard holds


@dataclass(frozen=True)
class ShardSpan:
    """Flat elements ``[start, stop)`` of the full (row-major) tensor held on this rank."""

    start: int
    stop: int
    global_shape: torch.Size

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def global_numel(self) -> int:
        return math.prod(self.global_shape)

    @property
    def is_whole(self) -> bool:
        """This rank holds every element (a plain tensor or a replicated ``DTensor``)."""
        return self.start == 0 and self.stop == self.global_numel


def _check_placements(tensor: Tensor) -> None:
    from torch.distributed.tensor import Replicate, Shard

    for placement in tensor.placements:
        if type(placement) is Replicate:
            continue
        if type(placement) is Shard and placement.dim == 0:
            continue
        raise NotImplementedError(
            f"sparse_rl_optim supports DTensors sharded on dim 0 (FSDP2's Shard(0)) or replicated; got placements "
            f"{tuple(tensor.placements)} for a tensor of shape {tuple(tensor.shape)}"
        )


def shard_span(tensor: Tensor) -> ShardSpan:
    """Where this rank's elements sit in the full tensor (see the module docstring)."""
    if not is_dtensor(tensor):
        return ShardSpan(0, tensor.numel(), tensor.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _check_placements(tensor)
    local_shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if tensor.dim() == 0:
        return ShardSpan(0, 1, tensor.shape)
    inner = math.prod(tensor.shape[1:])
    start = offset[0] * inner if local_shape[0] else 0
    return ShardSpan(start, start + local_shape[0] * inner, tensor.shape)


def counts_here(tensor: Tensor) -> bool:
    """Whether this rank's copy of ``tensor`` counts in a sum over all ranks of the default group:
    a ``DTensor`` counts on the ranks at coordinate 0 of each mesh dim it is replicated over (so each
    shard counts once, whichever dim it is sharded on); any other tensor, being a replica (DDP), on
    global rank 0 only."""
    if not is_dtensor(tensor):
        return is_main_rank()
    from torch.distributed.tensor import Replicate, Shard

    if any(not isinstance(placement, (Replicate, Shard)) for placement in tensor.placements):
        raise NotImplementedError(f"cannot count a DTensor with placements {tuple(tensor.placements)} once")
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the tensor's mesh
        return False
    return all(
        coordinate[mesh_dim] == 0
        for mesh_dim, placement in enumerate(tensor.placements)
        if type(placement) is Replicate
    )


def _in_place(collective: Callable[[Tensor], object], tensor: Tensor, group: object = None) -> Tensor:
    """Run the in-place ``collective`` on ``tensor``; under NCCL (which takes CUDA tensors only) a
    CPU tensor goes through the current CUDA device and back."""
    if dist.get_backend(group) == "nccl" and tensor.device.type == "cpu":
        on_device = tensor.to(f"cuda:{torch.cuda.current_device()}")
        collective(on_device)
        tensor.copy_(on_device)
    else:
        collective(tensor)
    return tensor


def broadcast_int(value: int, src: int = 0) -> int:
    """``value`` as global rank ``src`` has it, on every rank of the default process group (``value``
    itself with one process). A collective: every rank must call it, in the same order."""
    if not is_distributed():
        return value
    shared = torch.tensor([value], dtype=torch.int64)
    return int(_in_place(lambda tensor: dist.broadcast(tensor, src=src), shared).item())


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` in place over the default process group (nothing to do with one process)."""
    if not is_distributed():
        return tensor
    return _in_place(dist.all_reduce, tensor)


# -- geometry of every rank, exact merges and row-sharded state (the dense-block optimizers) -------


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` split over more than one rank (a ``Shard`` placement on a
    mesh dim of size > 1). The same answer on every rank, so it can decide whether to communicate."""
    if not is_dtensor(tensor):
        return False
    from torch.distributed.tensor import Shard

    _check_placements(tensor)
    mesh = tensor.device_mesh
    return any(type(p) is Shard and mesh.size(dim) > 1 for dim, p in enumerate(tensor.placements))


def shard_spans(tensor: Tensor) -> list[ShardSpan]:
    """:func:`shard_span` of every rank of ``tensor``'s mesh (one per mesh coordinate, row-major
    over the mesh; replicas repeat a span), computed locally: no communication. A plain tensor has
    one span, the whole tensor."""
    if not is_dtensor(tensor):
        return [shard_span(tensor)]
    import itertools

    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    _check_placements(tensor)
    mesh_shape = tuple(tensor.device_mesh.shape)
    if tensor.dim() == 0:
        return [ShardSpan(0, 1, tensor.shape)] * math.prod(mesh_shape)
    inner = math.prod(tensor.shape[1:])
    spans = []
    for coordinate in itertools.product(*(range(size) for size in mesh_shape)):
        local_shape, offset = _compute_local_shape_and_global_offset(
            tensor.shape, mesh_shape, list(coordinate), tensor.placements
        )
        start = int(offset[0]) * inner if local_shape[0] else 0
        spans.append(ShardSpan(start, start + int(local_shape[0]) * inner, tensor.shape))
    return spans


def merge_shards_(values: Tensor, like: Tensor) -> Tensor:
    """Merge, in place, a tensor of which each shard of ``like`` filled its own part (and left
    zeros elsewhere): afterwards every rank holds every part. A sum over the process groups of the
    mesh dims that shard ``like`` (replicas of a shard merge among themselves), taken over the bits
    (the integer view of the same width), so the merge is an exact copy: ``-0.0`` and NaN payloads
    survive, unlike ``x + 0.0``. ``values`` must be contiguous, 4 or 8 bytes per element (fp32,
    int32, int64, fp64). Nothing to do unless ``like`` :func:`is_sharded`."""
    if not is_sharded(like):
        return values
    from torch.distributed.tensor import Shard

    if not values.is_contiguous():
        raise ValueError("merge_shards_ needs a contiguous tensor")
    integer = {4: torch.int32, 8: torch.int64}.get(values.element_size())
    if integer is None or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"merge_shards_ merges 4- or 8-byte real elements, not {values.dtype}")
    bits = values if not values.is_floating_point() else values.view(integer)
    mesh = like.device_mesh
    for dim, placement in enumerate(like.placements):
        if type(placement) is not Shard or mesh.size(dim) == 1:
            continue
        group = mesh.get_group(dim)
        _in_place(lambda tensor, group=group: dist.all_reduce(tensor, group=group), bits, group)
    return values


def split_rows_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (any shape; a tensor every rank holds whole) as a ``DTensor`` on ``like``'s mesh
    with ``like``'s placements, each rank keeping its chunk of ``full``'s dim 0 (the chunks
    ``distribute_tensor`` makes; a copy, no communication). For optimizer state whose rows are not
    the param's rows (per-tile state), so ``torch.distributed.checkpoint`` saves it sharded instead
    of deduplicating one rank's plain copy. A plain ``like``: ``full`` itself."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _check_placements(like)
    local_shape, offset = compute_local_shape_and_global_offset(full.shape, like.device_mesh, like.placements)
    if full.dim() == 0:
        local = full.clone()
    elif not offset:  # this rank is not in like's mesh
        local = full[:0].clone()
    else:
        start = int(offset[0]) if local_shape[0] else 0
        local = full[start : start + int(local_shape[0])].clone(memory_format=torch.contiguous_format)
    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=full.shape, stride=full.stride()
    )
