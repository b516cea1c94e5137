"""The compiled RLSGD step: ``torch.compile`` (inductor) of the per-tensor formula over lists of
parameters, one fused pass over each, bit-equal to ``_single_tensor_rlsgd``.

Per tensor, in the compute dtype (fp32 for bf16/fp16 params), each op rounded separately (no FMA)::

    d   = -g if maximize else g
    buf = d (first step)  or  momentum * buf + (1 - dampening) * d ;   d = d + momentum * buf if nesterov else buf
    p   = round( p * decay - d * lr )                 (``* decay`` only when decay != 1)

A step makes one compiled call per group of tensors that share a variant (param type and
requires_grad, param and grad dtype, device, first-step or running momentum buffers, flags), on
lists of tensors: a call costs ~25 us of dynamo guards and inductor wrapper plus ~1.5 us per tensor
(2-core CPU), where stepping a bf16 1024x1024 tensor takes ~110 us. Each kernel is compiled for one
layout (the shapes of its tensors, static: cheaper guards, no symbolic sizes), so a model compiles
once (seconds to tens of seconds, growing with the number of tensors) and steps with it from then
on. The per-step numbers (lr, decay, momentum, 1 - dampening, the stochastic rounding seeds) enter
as tensors, not as constants baked into the kernel, so a new lr does not recompile.
"""

from __future__ import annotations

import struct
import types
from collections.abc import Callable

import torch
from torch import Tensor

from sparse_rl_optim._warnings import warn
from sparse_rl_optim.bf16 import _GOLDEN, _HASH_MASK, compute_dtype, stochastic_round, stochastic_seed
from sparse_rl_optim.optim.sgd import GateStats, _multi_tensor_rlsgd, _single_tensor_rlsgd, _step_scalars

# Pinned whatever the environment says, since each changes rounding: FMA contraction, fast math, and
# inductor's default of dropping a round trip fp32 -> fp16/bf16 -> fp32 inside a fused kernel.
# size_asserts off: the wrapper would check every input's sizes and strides again after dynamo's guards.
_INDUCTOR_OPTIONS = {
    "cpp.enable_floating_point_contract_flag": "off",
    "cpp.enable_unsafe_math_opt_flag": False,
    "emulate_precision_casts": True,
    "size_asserts": False,
}

#: (variant, shapes) -> compiled step, shared by every optimizer in the process.
_KERNELS: dict[tuple, Callable] = {}
#: (device, dtype, bits of the hyperparameters) -> (scalars tensor, apply decay): most steps reuse it.
_SCALARS: dict[tuple, tuple[Tensor, bool]] = {}
#: Set once torch.compile has failed: from then on every step takes the foreach path.
_compile_failed = False


def _compiled_rlsgd(
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
    element_offsets: list[int] | None = None,
) -> list[GateStats] | None:
    """``_multi_tensor_rlsgd`` with one compiled call per group of tensors of one variant: same
    arguments, same results bit for bit (NaN payloads aside). Tensors with at most one element,
    non-contiguous params or grads, grads of another shape, and momentum buffers that are
    non-contiguous or not in the compute dtype take the reference path. If torch.compile fails, warns
    once and takes the foreach path from then on. Gate stats count a weight that was NaN and stays NaN
    as unchanged, whatever the payloads (the reference compares the bits)."""
    global _compile_failed
    options = dict(
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        maximize=maximize,
        rounding=rounding,
        step_seed=step_seed,
        collect_gate_stats=collect_gate_stats,
        element_offsets=element_offsets,
    )
    if _compile_failed:
        return _multi_tensor_rlsgd(params, grads, momentum_buffers, **options)
    if torch.is_grad_enabled():  # dynamo guards on the grad mode: one mode, one kernel
        with torch.no_grad():
            return _compiled_rlsgd(params, grads, momentum_buffers, **options)

    # Per tensor only what routing and grouping need: this loop is most of the step's Python time.
    groups: dict[tuple, tuple[list[int], list[torch.Size], list[tuple]]] = {}
    reference: list[int] = []
    use_buffers = momentum != 0
    for index, (param, grad) in enumerate(zip(params, grads, strict=True)):
        shape = param.shape
        buffer = momentum_buffers[index] if use_buffers else None
        # Odd tensors (empty or one element, non-contiguous, grads of another shape, buffers not
        # contiguous or not in the compute dtype) take the reference path.
        fits = param.is_contiguous() and grad.is_contiguous() and grad.shape == shape and shape.numel() > 1
        if buffer is not None:
            fits = fits and buffer.is_contiguous() and buffer.dtype == compute_dtype(param.dtype)
        if fits:
            momentum_mode = "running" if buffer is not None else "first" if use_buffers else "none"
            # Type and requires_grad too: dynamo guards on them (a Parameter is not a Tensor).
            variant = (type(param), param.requires_grad, param.dtype, grad.dtype, param.device, momentum_mode)
            group = groups.get(variant)
            if group is None:
                group = groups[variant] = ([], [], [])
            group[0].append(index)
            group[1].append(shape)
            # Strides too: is_contiguous() ignores the strides of size-1 dimensions, dynamo does not.
            group[2].append((param.stride(), grad.stride(), None if buffer is None else buffer.stride()))
        else:
            reference.append(index)

    stats: list[GateStats | None] = [None] * len(params)
    group_list = list(groups.items())
    for position, (variant, (indices, shapes, strides)) in enumerate(group_list):
        *_, param_dtype, _, device, momentum_mode = variant
        work_dtype = compute_dtype(param_dtype)
        scalars, apply_decay = _scalars(device, work_dtype, lr, weight_decay, momentum, dampening)
        stochastic = rounding == "stochastic" and work_dtype != param_dtype
        seeds = None
        if stochastic:
            # (seed * 0x9E3779B9 + first element's index) mod 2**32 of each tensor: the hash adds the
            # element index to the product mod 2**32 (which would overflow int64 unreduced).
            values = [
                (stochastic_seed(step_seed, index) * _GOLDEN + (element_offsets[index] if element_offsets else 0))
                & _HASH_MASK
                for index in indices
            ]
            seeds = torch.tensor(values, dtype=torch.int64, device=device)
        if momentum_mode == "first":
            for index, shape in zip(indices, shapes, strict=True):
                momentum_buffers[index] = torch.empty(shape, dtype=work_dtype, device=device)
        flags = dict(
            maximize=maximize,
            momentum_mode=momentum_mode,
            nesterov=nesterov,
            dampen=dampening != 0,
            apply_decay=apply_decay,
            stochastic=stochastic,
            stats=collect_gate_stats,
        )
        # Lists (dynamo guards on the type of a sequence), copied whole where they can be.
        whole = len(indices) == len(params)  # indices are then 0, 1, ...
        group_params = list(params) if whole else [params[index] for index in indices]
        group_grads = list(grads) if whole else [grads[index] for index in indices]
        group_buffers = None
        if use_buffers:
            group_buffers = list(momentum_buffers) if whole else [momentum_buffers[index] for index in indices]
        try:
            counts = _kernel((*variant, *flags.values(), tuple(shapes), tuple(strides)))(
                group_params, group_grads, group_buffers, scalars, seeds, **flags
            )
        except Exception as error:  # no C++ compiler, a platform dynamo does not support, ...
            # Compilation fails before the kernel runs: this group and the rest are still to do.
            _compile_failed = True
            warn(f"RLSGD: torch.compile failed ({type(error).__name__}: {error}); using the foreach path instead.")
            if momentum_mode == "first":
                for index in indices:
                    momentum_buffers[index] = None
            reference.extend(index for _, (rest, *_) in group_list[position:] for index in rest)
            break
        if counts is not None:
            for index, (intended, swallowed) in zip(indices, counts, strict=True):
                stats[index] = GateStats(intended=intended, swallowed=swallowed)

    if reference:
        # Bit-equal by definition; tensor_indices keep each tensor's random stream.
        reference_buffers = [momentum_buffers[i] for i in reference]
        reference_stats = _single_tensor_rlsgd(
            [params[i] for i in reference],
            [grads[i] for i in reference],
            reference_buffers,
            **{**options, "element_offsets": [element_offsets[i] for i in reference] if element_offsets else None},
            tensor_indices=reference,
        )
        for slot, index in enumerate(reference):
            momentum_buffers[index] = reference_buffers[slot]
            if reference_stats is not None:
                stats[index] = reference_stats[slot]
    return stats if collect_gate_stats else None  # type: ignore[return-value]


def _scalars(
    device: torch.device, dtype: torch.dtype, lr: float, weight_decay: float, momentum: float, dampening: float
) -> tuple[Tensor, bool]:
    """``[lr, decay, momentum, 1 - dampening]`` as the compute dtype holds them, in one tensor (the
    same tensor while the hyperparameters stay the same), and whether to apply the decay."""
    key = (device, dtype, struct.pack("4d", lr, weight_decay, momentum, dampening))  # bits: -0.0 is not 0.0
    cached = _SCALARS.get(key)
    if cached is None:
        if len(_SCALARS) >= 64:  # an lr schedule makes a new one every step
            _SCALARS.clear()
        step_lr, decay = _step_scalars(dtype, lr, weight_decay)
        values = torch.tensor([step_lr, decay, momentum, 1 - dampening], dtype=dtype, device=device)
        cached = _SCALARS[key] = (values, decay != 1.0)
    return cached


def _kernel(key: tuple) -> Callable:
    """The compiled :func:`_step` of one variant and layout."""
    kernel = _KERNELS.get(key)
    if kernel is None:
        # A code object of its own per key: dynamo keeps the graphs of a code object together, and
        # past torch._dynamo.config.recompile_limit (8) of them silently runs it uncompiled. The key
        # fixes what dynamo guards on (types, requires_grad, dtypes, device, flags, list lengths,
        # shapes; contiguous strides), so each code object compiles once, however many layouts a
        # process steps (tests, several models). What else dynamo guards on (dispatch keys, as of
        # inference tensors) would recompile within the code object, up to that limit.
        code = _step.__code__.replace(co_name=f"_rlsgd_step_{len(_KERNELS)}")
        variant = types.FunctionType(code, _step.__globals__, code.co_name)
        variant.__kwdefaults__ = _step.__kwdefaults__
        kernel = torch.compile(variant, dynamic=False, fullgraph=True, options=_INDUCTOR_OPTIONS)
        _KERNELS[key] = kernel
    return kernel


def _step(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor] | None,
    scalars: Tensor,
    seeds: Tensor | None,
    *,
    maximize: bool,
    momentum_mode: str,
    nesterov: bool,
    dampen: bool,
    apply_decay: bool,
    stochastic: bool,
    stats: bool,
) -> list[tuple[Tensor, Tensor]] | None:
    """Step contiguous params in place, and their momentum buffers (contiguous, compute dtype).
    ``scalars`` is ``[lr, decay, momentum, 1 - dampening]`` in the compute dtype; ``seeds[k]`` is
    ``(seed * 0x9E3779B9) mod 2**32`` of tensor k's stochastic seed. Returns the counts
    ``(intended, swallowed)`` of each tensor if ``stats``."""
    lr, decay, momentum, damping = scalars[0], scalars[1], scalars[2], scalars[3]
    counts = []
    for k, param in enumerate(params):
        direction = grads[k].to(scalars.dtype)
        if maximize:
            direction = -direction
        if momentum_mode == "first":
            buffers[k].copy_(direction)
        elif momentum_mode == "running":
            buffers[k].copy_(buffers[k] * momentum + (direction * damping if dampen else direction))
        if momentum_mode != "none":
            direction = direction + buffers[k] * momentum if nesterov else buffers[k]
        param32 = param.to(scalars.dtype)
        if apply_decay:
            param32 = param32 * decay
        scaled_update = direction * lr
        new32 = param32 - scaled_update
        if param.dtype == new32.dtype:
            new_value = new32
        elif stochastic:
            random_bits = _random_bits16(seeds[k], new32.numel(), param.device).view(param.shape)
            if param.dtype == torch.float16:
                new_value = _stochastic_round_fp16(new32, random_bits)
            else:
                new_value = stochastic_round(new32, param.dtype, random_bits)
        else:
            new_value = new32.to(param.dtype)
        if stats:
            intended = scaled_update != 0
            counts.append((intended.sum(), (intended & _gate_view_unchanged(param, new_value)).sum()))
        param.copy_(new_value)
    return counts if stats else None


def _random_bits16(seed_offset: Tensor, count: int, device: torch.device) -> Tensor:
    """``sparse_rl_optim.bf16.random_bits16`` for elements ``0 .. count``, the seed a tensor and
    already multiplied (seed * 0x9E3779B9 would overflow int64). Below 2**63 throughout."""
    x = (torch.arange(count, dtype=torch.int64, device=device) + seed_offset) & _HASH_MASK
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _HASH_MASK
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _HASH_MASK
    x = x ^ (x >> 16)
    return (x >> 16).to(torch.int32)


def _stochastic_round_fp16(value: Tensor, random_bits: Tensor) -> Tensor:
    """The fp16 branch of ``sparse_rl_optim.bf16.stochastic_round``, op for op, with
    :func:`_nextafter_fp16` for ``torch.nextafter``."""
    nearest = value.to(torch.float16)
    lower = torch.where(nearest.to(value.dtype) > value, _nextafter_fp16(nearest, up=False), nearest)
    upper = _nextafter_fp16(lower, up=True)
    gap = upper.to(value.dtype) - lower.to(value.dtype)
    prob_up = (value - lower.to(value.dtype)) / gap
    rounded = torch.where(random_bits.to(value.dtype) < prob_up * 65536.0, upper, lower)
    return torch.where(torch.isfinite(nearest) & torch.isfinite(gap), rounded, nearest)


def _nextafter_fp16(x: Tensor, *, up: bool) -> Tensor:
    """``torch.nextafter(x, +-inf)`` for fp16, on the bit pattern: inductor computes an fp16
    nextafter in fp32 and rounds back, which gives ``x`` itself (torch 2.13)."""
    bits = x.view(torch.int16)
    away_from_zero = x > 0 if up else x < 0
    stepped = torch.where(away_from_zero, bits + 1, bits - 1)  # one step in magnitude, sign kept
    smallest = torch.full_like(bits, 0x0001 if up else -0x7FFF)  # the smallest subnormal, + or - (0x8001)
    stepped = torch.where(x == 0, smallest, stepped).view(torch.float16)
    return torch.where(torch.isnan(x) | (torch.isinf(x) & away_from_zero), x, stepped)


def _gate_view_unchanged(old: Tensor, new: Tensor) -> Tensor:
    """Whether the gate view (the bf16/fp16 value, or the bf16 rounding of an fp32/fp64 one) keeps
    its bits: same value and sign, or NaN before and after. By value, not by bitcasting ``new``:
    inductor stores a NaN as 0xFFFF but bitcasts the same value in registers to 0x7FC0."""
    if old.dtype not in (torch.bfloat16, torch.float16):
        old, new = old.to(torch.bfloat16), new.to(torch.bfloat16)
    same_value = (old == new) & (torch.signbit(old) == torch.signbit(new))
    return torch.where(torch.isnan(new), torch.isnan(old), same_value)
