"""The dense-block step on the Triton path: groups tensors for the fused gather -> update -> scatter
kernel (:mod:`sparse_rl_optim.kernels.dense_block_step`), one launch per (device, param dtype, grad
dtype).

Tensors the kernel does not take (fp64 params or grads, non-contiguous params or grads, a grad of
another shape, tile ids that are not 1-D int64, step counts that are not int32 contiguous, state
rows that are not fp32 contiguous ``[len(tile_ids), tile_size]``, anything on another device) run
the torch reference one at a time, so callers never see a gap. Tensors without active tiles are
skipped (the reference does nothing to them either).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["triton_dense_block_adamw", "triton_dense_block_sgd"]

_GroupKey = tuple[torch.device, torch.dtype, torch.dtype]


def _partition(
    params: list[Tensor],
    grads: list[Tensor],
    tile_ids: list[Tensor],
    tile_steps: list[Tensor | None] | None,
    states: list[list[Tensor | None]],
    tile_size: int,
) -> tuple[dict[_GroupKey, list[int]], list[int]]:
    """``(groups for the kernel, slots for the reference)``; slots without active tiles are in neither."""
    from sparse_rl_optim.kernels.launch import STEP_DTYPES

    groups: dict[_GroupKey, list[int]] = {}
    reference: list[int] = []
    for slot, (param, grad, ids) in enumerate(zip(params, grads, tile_ids, strict=True)):
        if ids.numel() == 0:
            continue
        device, rows = param.device, ids.numel()
        steps = tile_steps[slot] if tile_steps is not None else None
        if (
            param.dtype in STEP_DTYPES
            and grad.dtype in STEP_DTYPES
            and param.is_contiguous()
            and grad.is_contiguous()
            and grad.shape == param.shape  # else the reference raises torch's error
            and grad.device == device
            and ids.dim() == 1
            and ids.dtype == torch.int64
            and ids.device == device
            and (
                steps is None
                or (
                    steps.dtype == torch.int32
                    and steps.is_contiguous()
                    and steps.shape == (rows,)
                    and steps.device == device
                )
            )
            and all(
                rows_of[slot].dtype == torch.float32
                and rows_of[slot].is_contiguous()
                and rows_of[slot].shape == (rows, tile_size)
                and rows_of[slot].device == device
                for rows_of in states
            )
        ):
            groups.setdefault((device, param.dtype, grad.dtype), []).append(slot)
        else:
            reference.append(slot)
    return groups, reference


def _ids(tile_ids: list[Tensor], slots: list[int]) -> list[Tensor]:
    """The kernel reads the int64 ids from contiguous storage (a copy only where they are not)."""
    return [tile_ids[slot].contiguous() for slot in slots]


def triton_dense_block_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    tile_ids: list[Tensor],
    tile_steps: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    bias_table: Tensor,
    *,
    lr: float,
    beta1: float,
    one_minus_beta1: float,
    beta2: float,
    one_minus_beta2: float,
    eps: float,
    decay: float,
    maximize: bool,
    tile_size: int,
) -> None:
    """:func:`~sparse_rl_optim.optim.dense_block_functional._single_tensor_dense_block_adamw` through
    the fused kernel, bit-equal to it (same arguments; the scalars already rounded to fp32)."""
    from sparse_rl_optim.kernels.launch import dense_block_step_triton
    from sparse_rl_optim.optim.dense_block_functional import _single_tensor_dense_block_adamw

    scalars = dict(
        lr=lr,
        beta1=beta1,
        one_minus_beta1=one_minus_beta1,
        beta2=beta2,
        one_minus_beta2=one_minus_beta2,
        eps=eps,
        decay=decay,
        maximize=maximize,
        tile_size=tile_size,
    )
    groups, reference = _partition(params, grads, tile_ids, tile_steps, [exp_avgs, exp_avg_sqs], tile_size)
    for slot in reference:
        _single_tensor_dense_block_adamw(
            [params[slot]],
            [grads[slot]],
            [tile_ids[slot]],
            [tile_steps[slot]],
            [exp_avgs[slot]],
            [exp_avg_sqs[slot]],
            bias_table,
            **scalars,
        )
    for (device, _, _), slots in groups.items():
        dense_block_step_triton(
            [params[slot].detach() for slot in slots],
            [grads[slot] for slot in slots],
            _ids(tile_ids, slots),
            [tile_steps[slot] for slot in slots],
            [exp_avgs[slot] for slot in slots],
            [exp_avg_sqs[slot] for slot in slots],
            bias_table.to(device=device, dtype=torch.float32).contiguous(),
            algorithm="adamw",
            **scalars,
        )


def triton_dense_block_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    tile_ids: list[Tensor],
    tile_steps: list[Tensor | None],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening_keep: float,
    nesterov: bool,
    decay: float,
    maximize: bool,
    tile_size: int,
) -> None:
    """:func:`~sparse_rl_optim.optim.dense_block_functional._single_tensor_dense_block_sgd` through
    the fused kernel, bit-equal to it (same arguments; the scalars already rounded to fp32)."""
    from sparse_rl_optim.kernels.launch import dense_block_step_triton
    from sparse_rl_optim.optim.dense_block_functional import _single_tensor_dense_block_sgd

    scalars = dict(
        lr=lr,
        momentum=momentum,
        dampening_keep=dampening_keep,
        nesterov=nesterov,
        decay=decay,
        maximize=maximize,
        tile_size=tile_size,
    )
    has_momentum = momentum != 0
    steps = tile_steps if has_momentum else None  # without momentum the reference ignores both
    states = [momentum_buffers] if has_momentum else []
    groups, reference = _partition(params, grads, tile_ids, steps, states, tile_size)
    for slot in reference:
        _single_tensor_dense_block_sgd(
            [params[slot]],
            [grads[slot]],
            [tile_ids[slot]],
            [tile_steps[slot]],
            [momentum_buffers[slot]],
            **scalars,
        )
    for slots in groups.values():
        dense_block_step_triton(
            [params[slot].detach() for slot in slots],
            [grads[slot] for slot in slots],
            _ids(tile_ids, slots),
            [tile_steps[slot] for slot in slots] if has_momentum else None,
            [momentum_buffers[slot] for slot in slots] if has_momentum else None,
            None,
            None,
            algorithm="sgd",
            lr=lr,
            decay=decay,
            maximize=maximize,
            tile_size=tile_size,
            momentum=momentum,
            dampening_keep=dampening_keep,
            nesterov=nesterov,
        )
