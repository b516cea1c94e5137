"""RLSGD on the Triton path: groups tensors for the fused step kernel and turns its per-tile
outputs into :class:`~sparse_rl_optim.optim.sgd.GateStats`.

Tensors the kernel does not take (fp64, non-contiguous params or grads, buffers that are not fp32)
run the torch reference one at a time, and report the same fields, so callers never see a gap.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparse_rl_optim.bf16 import compute_dtype, gate_view_bits, stochastic_seed
from sparse_rl_optim.tiles import DEFAULT_TILE_SIZE, _sum_per_tile

__all__ = ["triton_rlsgd"]


def triton_rlsgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    rounding: str,
    step_seed: int,
    collect_gate_stats: bool,
    record_changes: bool = False,
    element_offsets: list[int] | None = None,
    tensor_indices: list[int] | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> list | None:
    """The formula of ``_single_tensor_rlsgd`` through the fused kernel, bit-equal to it.

    Returns per-param :class:`GateStats` when ``collect_gate_stats`` or ``record_changes``; with
    ``record_changes`` they also carry the per-tile change counts and the changed elements with their
    old bits (what :class:`~sparse_rl_optim.PrecisionGateTracker` needs instead of a snapshot).
    """
    from sparse_rl_optim.kernels.launch import STEP_DTYPES, rlsgd_step_triton
    from sparse_rl_optim.optim.sgd import GateStats, _single_tensor_rlsgd, _step_scalars

    indices = list(range(len(params))) if tensor_indices is None else tensor_indices
    stats: list[GateStats | None] = [None] * len(params)
    groups: dict[tuple[torch.device, torch.dtype, torch.dtype], list[int]] = {}
    reference: list[int] = []
    for slot, (param, grad) in enumerate(zip(params, grads, strict=True)):
        buffer = momentum_buffers[slot]
        if (
            param.dtype in STEP_DTYPES
            and grad.dtype in STEP_DTYPES
            and param.is_contiguous()
            and grad.is_contiguous()
            and grad.shape == param.shape  # else the reference raises torch's error
            and (
                buffer is None
                or (buffer.dtype == torch.float32 and buffer.is_contiguous() and buffer.shape == param.shape)
            )
        ):
            groups.setdefault((param.device, param.dtype, grad.dtype), []).append(slot)
        else:
            reference.append(slot)

    for slot in reference:
        before = gate_view_bits(params[slot].detach()).reshape(-1).clone() if record_changes else None
        buffers = [momentum_buffers[slot]]
        result = _single_tensor_rlsgd(
            [params[slot]],
            [grads[slot]],
            buffers,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            maximize=maximize,
            rounding=rounding,
            step_seed=step_seed,
            collect_gate_stats=True,
            element_offsets=None if element_offsets is None else [element_offsets[slot]],
            tensor_indices=[indices[slot]],
        )
        momentum_buffers[slot] = buffers[0]
        entry = result[0]
        if record_changes:
            after = gate_view_bits(params[slot].detach()).reshape(-1)
            changed = before != after
            entry.tile_changed = _sum_per_tile(changed.to(torch.int32), tile_size)
            entry.changed_indices = changed.nonzero().reshape(-1)
            entry.old_bits = before[entry.changed_indices]
            entry.old_checksum = before.sum(dtype=torch.int64)
        stats[slot] = entry

    step_lr, decay = _step_scalars(torch.float32, lr, weight_decay)
    for (device, _, _), slots in groups.items():
        buffers: list[Tensor] | None = None
        first_step = [False] * len(slots)
        if momentum != 0:
            buffers = []
            for position, slot in enumerate(slots):
                if momentum_buffers[slot] is None:
                    momentum_buffers[slot] = torch.empty(
                        params[slot].shape, dtype=compute_dtype(params[slot].dtype), device=device
                    )
                    first_step[position] = True
                buffers.append(momentum_buffers[slot])
        report = rlsgd_step_triton(
            [params[slot].detach() for slot in slots],
            [grads[slot] for slot in slots],
            buffers,
            first_step,
            lr=step_lr,
            decay=decay,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            maximize=maximize,
            stochastic=rounding == "stochastic",
            seeds=[stochastic_seed(step_seed, indices[slot]) for slot in slots],
            stream_offsets=None if element_offsets is None else [element_offsets[slot] for slot in slots],
            tile_size=tile_size,
            gate_stats=collect_gate_stats or record_changes,
            record=record_changes,
        )
        for slot, result in zip(slots, report.tensors, strict=True):
            stats[slot] = GateStats(
                intended=result.intended,
                swallowed=result.swallowed,
                tile_changed=result.tile_changed,
                changed_indices=result.changed_indices,
                old_bits=result.old_bits,
                old_checksum=result.old_checksum,
            )
    if not (collect_gate_stats or record_changes):
        return None
    return stats
