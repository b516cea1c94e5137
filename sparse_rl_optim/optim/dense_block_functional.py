"""The dense-block step, functional form: AdamW or SGD on the active tiles of each tensor.

Laid out like ``torch/optim/adamw.py``: :func:`dense_block_adamw` and :func:`dense_block_sgd`
dispatch to ``_single_tensor_*`` (the readable reference, the ground truth) or, on CUDA tensors, to
the fused Triton gather -> update -> scatter kernel (:mod:`sparse_rl_optim.kernels.dense_block_step`),
which is tested bit-equal to the reference.

State layout per tensor (what :class:`~sparse_rl_optim.DenseBlockAdamW` keeps): ``tile_ids`` (sorted
int64 ids of the active tiles, :mod:`sparse_rl_optim.tiles` geometry), ``tile_steps`` (int32, the
steps each active tile has taken since it became active) and dense moment rows
``[len(tile_ids), tile_size]`` in fp32, row ``r`` for tile ``tile_ids[r]`` (columns past the end of a
partial last tile stay 0).
"""

from __future__ import annotations

import functools
import struct

import torch
from torch import Tensor

from sparse_rl_optim._backend import check_triton_available, resolve_backend
from sparse_rl_optim.bf16 import compute_dtype, round_nearest
from sparse_rl_optim.tiles import _check_tile_ids, num_tiles

__all__ = ["bias_corrections", "dense_block_adamw", "dense_block_sgd"]


def _fp32(value: float) -> float:
    """``value`` rounded to the nearest fp32, as a Python float (so torch and Triton use it exactly)."""
    return struct.unpack("f", struct.pack("f", value))[0]


@functools.lru_cache(maxsize=16)
def _bias_table(beta1: float, beta2: float, capacity: int, device: torch.device) -> Tensor:
    # Vectorized in float64 (a schedule that changes the betas every step rebuilds it every step).
    steps = torch.arange(capacity, dtype=torch.float64)
    table = torch.stack([1.0 - torch.pow(beta1, steps), torch.sqrt(1.0 - torch.pow(beta2, steps))], dim=1)
    table[0] = 1.0  # row 0 is never read (a tile's first step is s = 1); 1 keeps it finite
    return table.to(torch.float32).to(device)


def bias_corrections(beta1: float, beta2: float, max_step: int, device: torch.device | str) -> Tensor:
    """Adam's bias corrections per step count, fp32 ``[>= max_step + 1, 2]``: row ``s`` holds
    ``fp32(1 - beta1**s)`` and ``fp32(sqrt(1 - beta2**s))`` (computed in float64, as
    ``torch.optim.AdamW`` does with Python floats; row 0 is unused). The reference and the kernel
    both look tiles up here, so each active tile gets its own bias correction. Cached per device and
    grown by doubling, so a step uploads nothing."""
    capacity = 1 << max(6, max_step.bit_length())  # >= max_step + 1
    return _bias_table(float(beta1), float(beta2), capacity, torch.device(device))


def _sqrt_rn(value: Tensor) -> Tensor:
    """Correctly rounded square root (fp32; fp64 stays fp64). torch's CPU fp32 ``sqrt`` is off by one ulp on ~15% of
    inputs (measured); the float64 root rounded once to fp32 is exact (53 >= 2 * 24 + 2 bits), as
    Triton's ``sqrt_rn`` is."""
    return value.to(torch.float64).sqrt().to(value.dtype)


def _whole_tile_rows(tile_ids: Tensor, numel: int, tile_size: int) -> int:
    """How many of the sorted ``tile_ids`` are whole tiles (all but, perhaps, the last tile of the tensor)."""
    if numel % tile_size == 0:
        return tile_ids.numel()
    return int(torch.searchsorted(tile_ids, numel // tile_size))


def _gather_rows(tensor: Tensor, tile_ids: Tensor, tile_size: int, dtype: torch.dtype) -> Tensor:
    """The given tiles of a tensor (row-major flat order) as rows ``[n, tile_size]`` in ``dtype``;
    elements past the end of a partial last tile read as 0."""
    flat = tensor.detach().reshape(-1)
    numel = flat.numel()
    whole = _whole_tile_rows(tile_ids, numel, tile_size)
    rows = torch.zeros(tile_ids.numel(), tile_size, dtype=dtype, device=flat.device)
    full_tiles = flat[: numel - numel % tile_size].view(-1, tile_size)
    rows[:whole] = full_tiles.index_select(0, tile_ids[:whole]).to(dtype)
    if whole < tile_ids.numel():
        rows[whole, : numel % tile_size] = flat[numel - numel % tile_size :].to(dtype)
    return rows


def _scatter_rows(param: Tensor, new_rows: Tensor, tile_ids: Tensor, tile_size: int) -> None:
    """Round the rows to the param dtype (to nearest even) and write them into its tiles."""
    values = new_rows if new_rows.dtype == param.dtype else round_nearest(new_rows, param.dtype)
    flat = param.detach().reshape(-1)  # a view if param is contiguous, else a copy written back below
    numel = flat.numel()
    whole = _whole_tile_rows(tile_ids, numel, tile_size)
    flat[: numel - numel % tile_size].view(-1, tile_size).index_copy_(0, tile_ids[:whole], values[:whole])
    if whole < tile_ids.numel():
        flat[numel - numel % tile_size :] = values[whole, : numel % tile_size]
    if not param.is_contiguous():
        param.detach().copy_(flat.view(param.shape))


def _check_all_tile_ids(params: list[Tensor], tile_ids: list[Tensor], tile_size: int) -> None:
    """Tile ids the kernel can trust: 1-D, sorted, distinct, in range (else a ValueError)."""
    for param, ids in zip(params, tile_ids, strict=True):
        _check_tile_ids(ids, num_tiles(param.numel(), tile_size))


def _check_lists(params: list[Tensor], *lists: list) -> None:
    if any(len(values) != len(params) for values in lists):
        raise ValueError("dense-block step: every per-tensor list must have one entry per param")


def dense_block_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    tile_ids: list[Tensor],
    tile_steps: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    tile_size: int,
    max_step: int,
    backend: str = "auto",
    check_tile_ids: bool = True,
) -> None:
    r"""AdamW on the active tiles of each tensor, in place. For each active tile (``s`` = its step
    count after this step, ``tile_steps`` incremented in place), elementwise in fp32, each operation
    rounded separately (no FMA)::

        g     = fp32(grad)                       (-g if maximize)
        m     = beta1 * m + (1 - beta1) * g
        v     = beta2 * v + (1 - beta2) * (g * g)
        denom = sqrt(v) / fp32(sqrt(1 - beta2**s)) + eps          (sqrt correctly rounded)
        p32   = fp32(p) * fp32(1 - lr * weight_decay)             (skipped if weight_decay == 0)
        p     = round_nearest( p32 - (lr / fp32(1 - beta1**s)) * (m / denom) )

    The scalars ``lr``, ``beta1``, ``1 - beta1``, ``beta2``, ``1 - beta2``, ``eps`` are rounded to
    fp32 first. Elements outside the active tiles are not touched. ``max_step`` bounds the tiles'
    step counts after this step (the optimizer's step count), to size the bias-correction table
    (a larger count reads the table's last row). ``tile_ids`` must be sorted, distinct and in range:
    checked unless ``check_tile_ids=False`` (the optimizers, whose ids are so by construction; the
    check reads them on the host, a sync per tensor on a GPU).
    """
    _check_lists(params, grads, tile_ids, tile_steps, exp_avgs, exp_avg_sqs)
    if check_tile_ids:
        _check_all_tile_ids(params, tile_ids, tile_size)
    options = dict(
        lr=_fp32(lr),
        beta1=_fp32(beta1),
        one_minus_beta1=_fp32(1.0 - beta1),
        beta2=_fp32(beta2),
        one_minus_beta2=_fp32(1.0 - beta2),
        eps=_fp32(eps),
        decay=_fp32(1.0 - _fp32(_fp32(lr) * _fp32(weight_decay))),
        maximize=maximize,
        tile_size=tile_size,
    )
    if not params:
        return
    table = bias_corrections(beta1, beta2, max_step, params[0].device)
    if _use_triton(backend, params):
        from sparse_rl_optim.optim._dense_block_triton import triton_dense_block_adamw

        triton_dense_block_adamw(params, grads, tile_ids, tile_steps, exp_avgs, exp_avg_sqs, table, **options)
        return
    _single_tensor_dense_block_adamw(params, grads, tile_ids, tile_steps, exp_avgs, exp_avg_sqs, table, **options)


def _use_triton(backend: str, params: list[Tensor]) -> bool:
    if resolve_backend(backend, params) != "triton":
        return False
    for device in {p.device for p in params}:
        check_triton_available(device, "dense-block backend='triton'")
    return True


def _single_tensor_dense_block_adamw(
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
    """The reference: one tensor at a time, the formula of :func:`dense_block_adamw` op by op."""
    for param, grad, ids, steps, exp_avg, exp_avg_sq in zip(
        params, grads, tile_ids, tile_steps, exp_avgs, exp_avg_sqs, strict=True
    ):
        if ids.numel() == 0:
            continue
        work_dtype = compute_dtype(param.dtype)
        g = _gather_rows(grad, ids, tile_size, work_dtype)
        if maximize:
            g = -g
        param32 = _gather_rows(param, ids, tile_size, work_dtype)
        steps.add_(1)
        rows = steps.to(torch.int64).clamp(max=bias_table.shape[0] - 1)  # as the kernel: never past the end
        corrections = bias_table.to(param.device, work_dtype)[rows]  # [n, 2]
        bias1, bias2_sqrt = corrections[:, 0:1], corrections[:, 1:2]
        exp_avg.copy_(exp_avg * beta1 + g * one_minus_beta1)
        exp_avg_sq.copy_(exp_avg_sq * beta2 + (g * g) * one_minus_beta2)
        denom = _sqrt_rn(exp_avg_sq) / bias2_sqrt + eps
        step_size = torch.full_like(bias1, lr) / bias1
        update = step_size * (exp_avg / denom)
        if decay != 1.0:
            param32 = param32 * decay
        _scatter_rows(param, param32 - update, ids, tile_size)


def dense_block_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    tile_ids: list[Tensor],
    tile_steps: list[Tensor | None],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    tile_size: int,
    backend: str = "auto",
    check_tile_ids: bool = True,
) -> None:
    r"""SGD on the active tiles of each tensor, in place; RLSGD's formula
    (:class:`~sparse_rl_optim.RLSGD`, nearest rounding) restricted to the tiles, with the momentum
    buffer (fp32 rows ``[len(tile_ids), tile_size]``) only on them::

        buf = g                                   (a tile's first step: tile_steps == 0)
        buf = momentum * buf + (1 - dampening) * g
        d   = g + momentum * buf if nesterov else buf     (d = g without momentum)
        p   = round_nearest( fp32(p) * fp32(1 - lr * wd) - fp32(lr) * d )

    With ``momentum == 0`` pass ``None`` for ``tile_steps`` and ``momentum_buffers``. ``tile_ids``:
    as :func:`dense_block_adamw`.
    """
    _check_lists(params, grads, tile_ids, tile_steps, momentum_buffers)
    if check_tile_ids:
        _check_all_tile_ids(params, tile_ids, tile_size)
    options = dict(
        lr=_fp32(lr),
        momentum=_fp32(momentum),
        dampening_keep=_fp32(1.0 - dampening),
        nesterov=nesterov,
        decay=_fp32(1.0 - _fp32(_fp32(lr) * _fp32(weight_decay))),
        maximize=maximize,
        tile_size=tile_size,
    )
    if momentum != 0 and any(
        steps is None or buffer is None for steps, buffer in zip(tile_steps, momentum_buffers, strict=True)
    ):
        raise ValueError("dense_block_sgd with momentum needs tile_steps and momentum_buffers for every param")
    if not params:
        return
    if _use_triton(backend, params):
        from sparse_rl_optim.optim._dense_block_triton import triton_dense_block_sgd

        triton_dense_block_sgd(params, grads, tile_ids, tile_steps, momentum_buffers, **options)
        return
    _single_tensor_dense_block_sgd(params, grads, tile_ids, tile_steps, momentum_buffers, **options)


def _single_tensor_dense_block_sgd(
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
    """The reference: one tensor at a time, the formula of :func:`dense_block_sgd` op by op."""
    for param, grad, ids, steps, buffer in zip(params, grads, tile_ids, tile_steps, momentum_buffers, strict=True):
        if ids.numel() == 0:
            continue
        work_dtype = compute_dtype(param.dtype)
        direction = _gather_rows(grad, ids, tile_size, work_dtype)
        if maximize:
            direction = -direction
        if momentum != 0:
            fresh = (steps == 0).unsqueeze(1)
            buffer.copy_(torch.where(fresh, direction, buffer * momentum + direction * dampening_keep))
            steps.add_(1)
            direction = direction + buffer * momentum if nesterov else buffer
        param32 = _gather_rows(param, ids, tile_size, work_dtype)
        if decay != 1.0:
            param32 = param32 * decay
        _scatter_rows(param, param32 - direction * lr, ids, tile_size)
