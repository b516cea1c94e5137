"""Python launchers for the Triton kernels: argument checks, launch tables, grids.

The kernels themselves live in :mod:`.rlsgd_step`, :mod:`.dense_block_step` and :mod:`.tiles`;
nothing here does arithmetic on weights. Importing this module imports Triton; set
``TRITON_INTERPRET=1`` before importing it to run the kernels on CPU tensors (slow; used by the
tests).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
from torch import Tensor

from sparse_rl_optim.bf16 import _GOLDEN, _HASH_MASK
from sparse_rl_optim.kernels.bits import BF16, FP16, FP32
from sparse_rl_optim.kernels.dense_block_step import ADAMW, SGD, dense_block_step_kernel
from sparse_rl_optim.kernels.rlsgd_step import rlsgd_step_kernel
from sparse_rl_optim.kernels.tiles import (
    apply_tiles_kernel,
    count_changed_tiles_kernel,
    pack_block_tiles_kernel,
    pack_tiles_kernel,
)
from sparse_rl_optim.tiles import _bits_dtype, num_tiles

__all__ = [
    "STEP_DTYPES",
    "StepReport",
    "TensorStepResult",
    "apply_tiles_triton",
    "block_size",
    "count_changed_tiles_triton",
    "dense_block_step_triton",
    "interpreting",
    "pack_changed_tiles",
    "pack_tiles_triton",
    "rlsgd_step_triton",
]

_KIND = {torch.bfloat16: BF16.value, torch.float16: FP16.value, torch.float32: FP32.value}
#: Param and grad dtypes the step kernel handles (others take the torch reference).
STEP_DTYPES = tuple(_KIND)
#: Elements whose old bits one launch may record for the tracker (a bounded scratch of 2 bytes
#: each plus a 1-bit change set, whatever the model size); steps without recording are one launch.
_RECORD_ELEMENTS = 1 << 24


#: Triton reads TRITON_INTERPRET when the kernels are decorated, i.e. when this package imported them.
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when they were
    imported; setting it later has no effect on them)."""
    return _INTERPRETING


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device and stream: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def block_size(tile_size: int) -> int:
    """Elements per program of the elementwise kernels: whole tiles, 4096 on a GPU (a measured sweet
    spot of memory-bound elementwise kernels), 16384 in the interpreter (each program costs a Python
    round trip there)."""
    return max(tile_size, 16384 if interpreting() else 4096)


def _launch_options(block: int) -> dict[str, object]:
    # No FMA contraction: the reference rounds the product and the difference separately.
    return {"num_warps": 8 if block >= 4096 else 4, "enable_fp_fusion": False}


# -- tile kernels ------------------------------------------------------------------------------


def count_changed_tiles_triton(old_bits: Tensor, new_bits: Tensor, tile_size: int) -> Tensor:
    """Per-tile counts of differing 16-bit patterns of two flat int16 tensors (int32)."""
    numel = old_bits.numel()
    counts = torch.zeros(num_tiles(numel, tile_size), dtype=torch.int32, device=old_bits.device)
    if numel == 0:
        return counts
    block = block_size(tile_size)
    grid = (triton.cdiv(numel, block),)
    with on_device(old_bits.device):
        count_changed_tiles_kernel[grid](
            old_bits.contiguous(),
            new_bits.contiguous(),
            counts,
            numel,
            BLOCK=block,
            TILE=tile_size,
            **_launch_options(block),
        )
    return counts


def _as_bits(flat: Tensor) -> Tensor:
    return flat.view(_bits_dtype(flat.dtype))


def pack_tiles_triton(
    source: Tensor, other: Tensor | None, tile_counts: Tensor | None, tile_ids: Tensor | None, tile_size: int
) -> tuple[Tensor, Tensor]:
    """Pack the active tiles of a flat contiguous tensor; slots by a prefix sum over the tiles.
    Returns ``(tile_ids int64, values [n_active, tile_size])``. One host sync: the output size."""
    device = source.device
    n_tiles = num_tiles(source.numel(), tile_size)
    if tile_ids is None:
        active = tile_counts.to(device) != 0
        slots = torch.cumsum(active, dim=0, dtype=torch.int64) - 1
        n_active = int(slots[-1]) + 1 if n_tiles else 0
        slots = torch.where(active, slots, -1)
    else:
        n_active = tile_ids.numel()
        slots = torch.full((n_tiles,), -1, dtype=torch.int64, device=device)
        slots[tile_ids] = torch.arange(n_active, device=device)
    packed_ids = torch.empty(n_active, dtype=torch.int64, device=device)
    values = torch.empty(n_active, tile_size, dtype=source.dtype, device=device)
    if n_active:
        bits = _as_bits(source)
        with on_device(device):
            pack_tiles_kernel[(n_tiles,)](
                bits,
                _as_bits(other) if other is not None else bits,
                slots,
                packed_ids,
                _as_bits(values),
                source.numel(),
                XOR=other is not None,
                TILE=tile_size,
                num_warps=_tile_warps(tile_size),
            )
    return packed_ids, values


def apply_tiles_triton(target: Tensor, values: Tensor, tile_ids: Tensor, tile_size: int, xor: bool) -> None:
    """Write (or XOR) packed tile rows into a flat contiguous tensor, in place."""
    if tile_ids.numel() == 0:
        return
    with on_device(target.device):
        apply_tiles_kernel[(tile_ids.numel(),)](
            _as_bits(target),
            tile_ids.to(torch.int64).contiguous(),
            _as_bits(values.contiguous()),
            target.numel(),
            XOR=xor,
            TILE=tile_size,
            num_warps=_tile_warps(tile_size),
        )


def _tile_warps(tile_size: int) -> int:
    """Warps for a program that moves one tile: about 8 elements per thread (16 bytes of bf16)."""
    return max(1, min(8, tile_size // 256))


# -- the fused step ----------------------------------------------------------------------------


@dataclass
class _BlockPlan:
    """Which tensor and element range each program of a step launch handles (cached per layout)."""

    block_tensor: Tensor  # int32 [n_blocks]
    block_start: Tensor  # int64 [n_blocks], element offset of the block in its tensor
    first_block: list[int]
    n_blocks: int


@lru_cache(maxsize=16)
def _plan_blocks(numels: tuple[int, ...], block: int, device: torch.device) -> _BlockPlan:
    blocks_per_tensor = [triton.cdiv(n, block) for n in numels]
    first_block, total = [], 0
    for count in blocks_per_tensor:
        first_block.append(total)
        total += count
    counts = torch.tensor(blocks_per_tensor, dtype=torch.int64)
    block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first = torch.tensor(first_block, dtype=torch.int64)
    block_start = (torch.arange(total, dtype=torch.int64) - first[block_tensor]) * block
    return _BlockPlan(block_tensor.to(torch.int32).to(device), block_start.to(device), first_block, total)


@dataclass
class TensorStepResult:
    """What one step kernel reported for one tensor.

    ``tile_changed``: int32 per tile, elements whose gate view changed; ``intended``/``swallowed``:
    0-dim int64 (with gate stats); ``changed_indices``/``old_bits``/``old_checksum``: flat int64
    indices of the changed elements, their int16 gate-view bits before the step, and the int64 sum
    of all old int16 patterns (when recording).
    """

    tile_changed: Tensor | None = None
    intended: Tensor | None = None
    swallowed: Tensor | None = None
    changed_indices: Tensor | None = None
    old_bits: Tensor | None = None
    old_checksum: Tensor | None = None


@dataclass
class StepReport:
    """Per-tensor results of one fused step, plus the launch-wide per-tile change counts in block
    layout (what :func:`pack_changed_tiles` compacts in one launch)."""

    tensors: list[TensorStepResult]
    tile_changed: Tensor
    plan: _BlockPlan
    tile_size: int
    block: int


_TABLES: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}


def _device_table(values: tuple[int, ...], device: torch.device) -> Tensor:
    """The launch table as an int64 device tensor, cached by content: params and (usually) grads
    keep their storage from step to step, so a steady-state step uploads nothing."""
    key = (device, values)
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= 16:
            _TABLES.clear()
        table = _TABLES[key] = torch.tensor(values, dtype=torch.int64).to(device)
    return table


def _aligned(tensors: list[Tensor]) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def rlsgd_step_triton(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    first_step: list[bool],
    *,
    lr: float,
    decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    stochastic: bool,
    seeds: list[int],
    stream_offsets: list[int] | None = None,
    tile_size: int,
    count_tiles: bool = False,
    gate_stats: bool = False,
    record: bool = False,
    skip_unchanged_writes: bool = True,
) -> StepReport:
    """One fused RLSGD step over contiguous tensors that share device, param dtype and grad dtype
    (and whose grads and fp32 buffers have the params' sizes: the caller checks).

    ``lr``/``decay`` are the fp32 step scalars of :func:`sparse_rl_optim.optim.sgd._step_scalars`;
    ``momentum_buffers`` are fp32 (``first_step[i]``: buffer ``i`` is fresh and gets ``d``);
    ``seeds`` the per-tensor stochastic-rounding seeds; ``stream_offsets`` the flat index of each
    tensor's first element in its random stream (a shard of a larger tensor; default 0).
    ``skip_unchanged_writes`` stores only weights whose bits changed (predicated stores) instead of
    every weight (vector stores); both give the same weights.
    """
    device = params[0].device
    block = block_size(tile_size)
    tiles_per_block = block // tile_size
    numels = tuple(p.numel() for p in params)
    plan = _plan_blocks(numels, block, device)
    n_tensors = len(params)
    results = [TensorStepResult() for _ in params]
    has_momentum = momentum_buffers is not None
    buffers = momentum_buffers if has_momentum else params
    addresses = [p.data_ptr() for p in params] + [g.data_ptr() for g in grads] + [b.data_ptr() for b in buffers]
    seed_mixes = [(seed * _GOLDEN) & _HASH_MASK for seed in seeds]
    table = _device_table(
        (
            *addresses,
            *numels,
            *seed_mixes,
            *(stream_offsets or [0] * n_tensors),
            *[int(flag) for flag in first_step],
        ),
        device,
    )
    param_addresses, grad_addresses, buffer_addresses, numel_table, seed_table, offset_table, first_table = table.split(
        n_tensors
    )
    int32 = {"dtype": torch.int32, "device": device}
    tile_changed = torch.empty(plan.n_blocks * tiles_per_block if count_tiles or record else 0, **int32)
    block_intended = torch.empty(plan.n_blocks if gate_stats else 0, **int32)
    block_swallowed = torch.empty(plan.n_blocks if gate_stats else 0, **int32)
    block_checksum = torch.empty(plan.n_blocks if record else 0, **int32)
    blocks_per_launch = max(1, _RECORD_ELEMENTS // block) if record else max(plan.n_blocks, 1)
    recorded: list[tuple[Tensor, Tensor, Tensor]] = []
    aligned = _aligned(params) and _aligned(grads) and _aligned(buffers) and not interpreting()
    with on_device(device):
        for first in range(0, plan.n_blocks, blocks_per_launch):
            count = min(blocks_per_launch, plan.n_blocks - first)
            words = torch.empty(count * block // 32 if record else 0, **int32)
            old_bits = torch.empty(count * block if record else 0, dtype=torch.int16, device=device)
            rlsgd_step_kernel[(count,)](
                param_addresses,
                grad_addresses,
                buffer_addresses,
                numel_table,
                seed_table,
                offset_table,
                first_table,
                plan.block_tensor[first:],
                plan.block_start[first:],
                tile_changed[first * tiles_per_block :],
                block_intended[first:],
                block_swallowed[first:],
                block_checksum[first:],
                words,
                old_bits,
                lr,
                decay,
                momentum,
                1.0 - dampening,
                PARAM_KIND=_KIND[params[0].dtype],
                GRAD_KIND=_KIND[grads[0].dtype],
                HAS_MOMENTUM=has_momentum,
                NESTEROV=nesterov,
                MAXIMIZE=maximize,
                STOCHASTIC=stochastic,
                HAS_DECAY=decay != 1.0,
                COUNT_TILES=count_tiles or record,
                GATE_STATS=gate_stats,
                RECORD=record,
                SKIP_UNCHANGED_WRITES=skip_unchanged_writes,
                ALIGNED=aligned,
                BLOCK=block,
                TILE=tile_size,
                **_launch_options(block),
            )
            if record:
                recorded.append(_changed_elements(words, old_bits, plan, first, block))

    if count_tiles or record:
        for index, result in enumerate(results):
            start = plan.first_block[index] * tiles_per_block
            result.tile_changed = tile_changed[start : start + num_tiles(numels[index], tile_size)]
    if gate_stats or record:
        # Per-block sums to per-tensor sums (blocks never straddle tensors).
        sums = torch.zeros((3, n_tensors), dtype=torch.int64, device=device)
        for row, per_block in enumerate((block_intended, block_swallowed, block_checksum)):
            if per_block.numel():
                sums[row].index_add_(0, plan.block_tensor, per_block.to(torch.int64))
        for index, result in enumerate(results):
            if gate_stats:
                result.intended, result.swallowed = sums[0, index], sums[1, index]
            if record:
                result.old_checksum = sums[2, index]
    if record:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        tensor_of = torch.cat([empty, *(r[0] for r in recorded)])
        indices = torch.cat([empty, *(r[1] for r in recorded)])
        old = torch.cat([empty.to(torch.int16), *(r[2] for r in recorded)])
        # Blocks run tensor by tensor, so the changed elements arrive grouped by tensor, sorted.
        sizes = torch.bincount(tensor_of, minlength=n_tensors).tolist()
        for result, part_indices, part_old in zip(results, indices.split(sizes), old.split(sizes), strict=True):
            result.changed_indices, result.old_bits = part_indices, part_old
    return StepReport(results, tile_changed, plan, tile_size, block)


def pack_changed_tiles(params: list[Tensor], report: StepReport) -> list[tuple[Tensor, Tensor]]:
    """Compact the tiles a fused step changed, for all its tensors in one launch: slots come from a
    prefix sum over the launch's per-tile counts (deterministic, sorted by tensor then tile).
    Returns per tensor ``(tile_ids int64, values [n_active, tile_size])`` (views of one buffer).
    ``params`` are the step's tensors, in its order; the step must have counted tiles. A tile of an
    fp32 tensor is active when a gate view (bf16 rounding) changed: smaller fp32 changes are not
    packed. One host sync: the number of active tiles per tensor, to size the output."""
    plan, tile_size = report.plan, report.tile_size
    if any(r.tile_changed is None for r in report.tensors):
        raise ValueError("the step did not count tiles: call rlsgd_step_triton(..., count_tiles=True)")
    if len(params) != len(report.tensors) or any(
        r.tile_changed.numel() != num_tiles(p.numel(), tile_size) for p, r in zip(params, report.tensors, strict=False)
    ):
        raise ValueError("pack_changed_tiles needs the params of the step, in its order")
    device = params[0].device
    active = report.tile_changed != 0
    slots = torch.cumsum(active, dim=0, dtype=torch.int64) - 1
    # Active tiles per tensor: prefix sums at the end of each tensor's tile slots (one sync for all).
    tiles_per_block = report.block // tile_size
    ends = [plan.first_block[i] * tiles_per_block + num_tiles(p.numel(), tile_size) for i, p in enumerate(params)]
    padded_slots = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), slots + 1])
    totals = padded_slots[torch.tensor(ends, device=device)].tolist() if params else []
    counts = [totals[0], *(b - a for a, b in itertools.pairwise(totals))] if totals else []
    n_active = totals[-1] if totals else 0
    packed_ids = torch.empty(n_active, dtype=torch.int64, device=device)
    values = torch.empty(n_active, tile_size, dtype=_bits_dtype(params[0].dtype), device=device)
    if n_active:
        table = torch.tensor([p.data_ptr() for p in params] + [p.numel() for p in params], dtype=torch.int64)
        table = table.to(device)
        with on_device(device):
            pack_block_tiles_kernel[(plan.n_blocks,)](
                table[: len(params)],
                table[len(params) :],
                plan.block_tensor,
                plan.block_start,
                torch.where(active, slots, -1),
                packed_ids,
                values,
                ELEMENT_BYTES=params[0].element_size(),
                ALIGNED=_aligned(params) and not interpreting(),
                BLOCK=report.block,
                TILE=tile_size,
                **_launch_options(report.block),
            )
    return [
        (ids, rows.view(param.dtype))
        for param, ids, rows in zip(params, packed_ids.split(counts), values.split(counts), strict=True)
    ]


def _changed_elements(
    words: Tensor, old_bits: Tensor, plan: _BlockPlan, first: int, block: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(tensor index, element index, old bits) of every element the change bit-set marks. Only the
    non-zero words are expanded (RL changes ~1% of the weights)."""
    word_index = (words != 0).nonzero().reshape(-1)
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = ((words[word_index].unsqueeze(1) >> shifts) & 1).bool()
    positions = (word_index.unsqueeze(1) * 32 + shifts)[bits]  # sorted: words, then bits, ascend
    blocks = positions // block + first
    tensor_of = plan.block_tensor[blocks].to(torch.int64)
    element = plan.block_start[blocks] + positions % block
    return tensor_of, element, old_bits[positions]


# -- the dense-block step ----------------------------------------------------------------------


def dense_block_step_triton(
    params: list[Tensor],
    grads: list[Tensor],
    tile_ids: list[Tensor],
    tile_steps: list[Tensor] | None,
    states1: list[Tensor] | None,
    states2: list[Tensor] | None,
    bias_table: Tensor | None,
    *,
    algorithm: str,
    lr: float,
    decay: float,
    maximize: bool,
    tile_size: int,
    beta1: float = 0.0,
    one_minus_beta1: float = 0.0,
    beta2: float = 0.0,
    one_minus_beta2: float = 0.0,
    eps: float = 0.0,
    momentum: float = 0.0,
    dampening_keep: float = 1.0,
    nesterov: bool = False,
) -> None:
    """One fused dense-block step (:mod:`.dense_block_step`) over tensors that share device, param
    dtype and grad dtype, in place: params, state rows and tile steps.

    ``algorithm``: ``"adamw"`` (``states1``/``states2`` the exp_avg/exp_avg_sq rows, ``bias_table``
    fp32 ``[capacity, 2]`` with a row for every step count reached) or ``"sgd"`` (``states1`` the
    momentum rows, or None with ``tile_steps`` without momentum; ``momentum != 0`` iff they are
    given). The caller checks: params and grads contiguous, of one shape, dtypes in
    :data:`STEP_DTYPES`; ``tile_ids`` int64 contiguous, sorted; ``tile_steps`` int32 contiguous
    ``[len(tile_ids)]``; state rows fp32 contiguous ``[len(tile_ids), tile_size]``. The scalars are
    the fp32 values of the reference (Python floats). Tensors without active tiles are skipped.
    """
    if algorithm not in ("adamw", "sgd"):
        raise ValueError(f"algorithm must be 'adamw' or 'sgd', got {algorithm!r}")
    adamw = algorithm == "adamw"
    has_momentum = adamw or states1 is not None
    active = [i for i, ids in enumerate(tile_ids) if ids.numel()]
    if not active:
        return
    device = params[active[0]].device
    rows_per_program = block_size(tile_size) // tile_size
    row_counts = tuple(tile_ids[i].numel() for i in active)
    plan = _plan_blocks(row_counts, rows_per_program, device)

    def pick(tensors: list[Tensor] | None) -> list[Tensor]:
        # Unused tables point at the params (never dereferenced: the constexpr flags skip them).
        return [(tensors if tensors is not None else params)[i] for i in active]

    tensors = [pick(params), pick(grads), pick(states1), pick(states2 if adamw else None), pick(tile_ids)]
    steps = pick(tile_steps if has_momentum else None)
    n_tensors = len(active)
    table = _device_table(
        (
            *(t.data_ptr() for group in (*tensors, steps) for t in group),
            *(params[i].numel() for i in active),
            *row_counts,
        ),
        device,
    )
    param_table, grad_table, state1_table, state2_table, id_table, step_table, numel_table, row_table = table.split(
        n_tensors
    )
    if bias_table is None:
        bias_table = torch.ones(1, 2, dtype=torch.float32, device=device)
    aligned = all(_aligned(group) for group in (*tensors, steps)) and not interpreting()
    block = rows_per_program * tile_size
    with on_device(device):
        dense_block_step_kernel[(plan.n_blocks,)](
            param_table,
            grad_table,
            state1_table,
            state2_table,
            id_table,
            step_table,
            numel_table,
            row_table,
            plan.block_tensor,
            plan.block_start,
            bias_table,
            bias_table.shape[0],
            lr,
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            eps,
            decay,
            momentum,
            dampening_keep,
            ALGORITHM=ADAMW.value if adamw else SGD.value,
            PARAM_KIND=_KIND[params[active[0]].dtype],
            GRAD_KIND=_KIND[grads[active[0]].dtype],
            HAS_DECAY=decay != 1.0,
            MAXIMIZE=maximize,
            HAS_MOMENTUM=has_momentum and not adamw,
            NESTEROV=nesterov and has_momentum and not adamw,
            ALIGNED=aligned,
            ROWS=rows_per_program,
            TILE=tile_size,
            **_launch_options(block),
        )
