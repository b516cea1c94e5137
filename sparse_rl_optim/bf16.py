"""bf16 bit math: the one home for ulps, rounding and the precision gate.

A bf16 value is the top 16 bits of an fp32 value: 1 sign bit, 8 exponent bits, 7 mantissa bits.
Everything in the package that asks "did this stored weight change, and why (not)?" goes through
this module, so the optimizers, the tracker, the kernels and the deltas agree bit for bit.

Conventions used everywhere:

* "Changed" means the stored bit pattern changed. This counts ``-0.0 -> +0.0`` as a change and
  two identical NaN bit patterns as no change.
* For fp32 (and fp64) tensors the *gate view* is the bf16 value an inference engine running in
  bf16 would load (round to nearest even); for bf16 and fp16 tensors it is the stored value itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "PATH_NOT_TAKEN_ETA",
    "bf16_ulp",
    "bits_view_dtype",
    "compute_dtype",
    "gate_view_bits",
    "random_bits16",
    "round_nearest",
    "stochastic_round",
    "stochastic_seed",
    "unchanged_path_not_taken",
    "update_changes_weight",
]

#: The tolerance of "The Path Not Taken" (arXiv 2511.08567): a weight is unchanged if
#: ``|w_new - w| <= eta * max(|w|, |w_new|)``. Since eta < 2**-8, for bf16 values this is
#: exactly bitwise equality (see :func:`unchanged_path_not_taken`).
PATH_NOT_TAKEN_ETA = 1e-3

_BF16_EXPONENT_MASK = 0x7F80
_BF16_MANTISSA_BITS = 7
_FP32_LOW_HALF_MASK = -65536  # 0xFFFF0000 as a signed int32: clears the 16 bits bf16 drops

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an update is computed in: fp32 for bf16/fp16 storage, the storage dtype otherwise."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def bits_view_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of :func:`gate_view_bits` for a tensor of ``dtype`` (bf16 or fp16)."""
    return dtype if dtype in _LOW_PRECISION else torch.bfloat16


def gate_view_bits(tensor: Tensor) -> Tensor:
    """The 16-bit pattern an inference engine sees, as int16: the stored bits of bf16/fp16 tensors
    (a view, no copy) and ``bits(bf16_rtne(x))`` for fp32/fp64 tensors (a new tensor; every NaN
    maps to the canonical quiet NaN ``0x7FC0``)."""
    if tensor.dtype in _LOW_PRECISION:
        return tensor.view(torch.int16) if tensor.is_contiguous() else tensor.contiguous().view(torch.int16)
    if not tensor.is_floating_point():
        raise TypeError(f"gate_view_bits needs a floating-point tensor, got {tensor.dtype}")
    bits = tensor.to(torch.bfloat16).view(torch.int16)
    # torch's vectorised and scalar conversions give NaN different patterns (0xFFFF, 0x7FC0): one
    # canonical NaN, so every path (and the kernels) agree on "changed".
    return torch.where(torch.isnan(tensor), torch.tensor(_BF16_CANONICAL_NAN, dtype=torch.int16), bits)


def bf16_ulp(weight: Tensor) -> Tensor:
    """Unit in the last place of bf16 values, as fp32: ``2**(max(e, -126) - 7)`` for ``|w|`` in
    ``[2**e, 2**(e+1))`` (so ``ulp/|w|`` is in ``(2**-8, 2**-7]`` for normal values); NaN for
    inf/NaN. The precision gate: an update smaller than about ``ulp/2`` leaves ``w`` unchanged."""
    if weight.dtype != torch.bfloat16:
        weight = weight.to(torch.bfloat16)
    exponent = (weight.contiguous().view(torch.int16).to(torch.int32) & _BF16_EXPONENT_MASK) >> _BF16_MANTISSA_BITS
    # Subnormals (exponent field 0) share the spacing of the smallest normal binade.
    unbiased = torch.clamp(exponent, min=1) - 127 - _BF16_MANTISSA_BITS
    ulp = torch.exp2(unbiased.to(torch.float32))
    return torch.where(exponent == 0xFF, torch.full_like(ulp, float("nan")), ulp)


def round_nearest(value: Tensor, dtype: torch.dtype) -> Tensor:
    """Round-to-nearest-even from the compute dtype to ``dtype`` (NaN stays NaN, overflow gives inf)."""
    return value.to(dtype)


_HASH_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_HASH_MUL_1 = 0x7FEB352D
_HASH_MUL_2 = 0x2C1B3C6D
#: The NaN pattern torch's fp32 -> bf16 conversion produces (and the kernels write).
_BF16_CANONICAL_NAN = 0x7FC0


def stochastic_seed(step_seed: int, tensor_index: int) -> int:
    """The 32-bit seed of one tensor in one step: ``(step_seed + tensor_index * 0x9E3779B9) mod 2**32``."""
    return (step_seed + tensor_index * _GOLDEN) & _HASH_MASK


def random_bits16(seed: int, start: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """16 random bits (int32 in ``[0, 2**16)``) for elements ``start .. start+count`` of a tensor.

    A counter-based generator: element ``i`` gets ``hash32(i + seed * 0x9E3779B9) >> 16`` with an
    integer hash (xor-shift-multiply; multipliers below 2**31 so int64 arithmetic never overflows).
    So any slice of a tensor can be generated on its own, in any order, on any device, and a kernel
    can compute the same bits: the foreach, chunked and Triton paths agree bit for bit.
    """
    offsets = torch.arange(start, start + count, dtype=torch.int64, device=device)
    x = (offsets + ((seed * _GOLDEN) & _HASH_MASK)) & _HASH_MASK
    x = x ^ (x >> 16)
    x = (x * _HASH_MUL_1) & _HASH_MASK
    x = x ^ (x >> 15)
    x = (x * _HASH_MUL_2) & _HASH_MASK
    x = x ^ (x >> 16)
    return (x >> 16).to(torch.int32)


def stochastic_round(value: Tensor, dtype: torch.dtype, random_bits: Tensor) -> Tensor:
    """Unbiased stochastic rounding of an fp32 tensor to bf16 or fp16: ``E[round(x)] = x`` (to 2**-16).

    ``random_bits`` holds one uniform integer in ``[0, 2**16)`` per element (see :func:`random_bits16`).
    bf16: add it to the fp32 bit pattern, then clear the low 16 bits (rounds the magnitude up with
    probability ``dropped_bits / 2**16``; exactly unbiased on fp32 inputs). fp16: round up to the next
    fp16 value with probability ``(x - lower) / (upper - lower)``, resolved to 2**-16. NaN and inf pass
    through unchanged. Any other target dtype (fp32, fp64) is returned as is: no coarser grid.
    """
    if value.dtype != torch.float32:
        raise TypeError(f"stochastic rounding needs an fp32 input, got {value.dtype}")
    random_bits = random_bits.reshape(value.shape)
    if dtype == torch.bfloat16:
        bits = (value.contiguous().view(torch.int32) + random_bits) & _FP32_LOW_HALF_MASK
        rounded = bits.view(torch.float32).to(torch.bfloat16)  # exact: the low half is zero
        # The carry can turn a NaN payload into inf or flip its sign: keep non-finite inputs as they are.
        return torch.where(torch.isfinite(value), rounded, value.to(torch.bfloat16))
    if dtype == torch.float16:
        nearest = value.to(torch.float16)
        neg_inf = torch.full_like(nearest, float("-inf"))
        pos_inf = torch.full_like(nearest, float("inf"))
        lower = torch.where(nearest.to(value.dtype) > value, torch.nextafter(nearest, neg_inf), nearest)
        upper = torch.nextafter(lower, pos_inf)
        gap = upper.to(value.dtype) - lower.to(value.dtype)
        prob_up = (value - lower.to(value.dtype)) / gap
        rounded = torch.where(random_bits.to(value.dtype) < prob_up * 65536.0, upper, lower)
        # Outside the finite fp16 range (and for NaN/inf) fall back to round-to-nearest.
        return torch.where(torch.isfinite(nearest) & torch.isfinite(gap), rounded, nearest)
    return value.to(dtype)


def update_changes_weight(weight: Tensor, update: Tensor) -> Tensor:
    """Whether subtracting ``update`` changes the stored bf16 ``weight``, exactly, by the rounding
    rule ``bf16_rtne(fp32(w) - fp32(update)) != w`` (bitwise). Roughly: ``|update| >= bf16_ulp(w)/2``."""
    if weight.dtype != torch.bfloat16:
        raise TypeError(f"update_changes_weight needs a bf16 weight, got {weight.dtype}")
    new_weight = (weight.to(torch.float32) - update.to(torch.float32)).to(torch.bfloat16)
    return gate_view_bits(new_weight) != gate_view_bits(weight)


def unchanged_path_not_taken(old: Tensor, new: Tensor, eta: float = PATH_NOT_TAKEN_ETA) -> Tensor:
    """The sparsity rule of "The Path Not Taken": ``|new - old| <= eta * max(|old|, |new|)``.

    Evaluated in fp64 (exact for bf16 inputs). For bf16 values and ``eta < 2**-8`` this equals
    bitwise equality, except that ``+0.0`` and ``-0.0`` count as equal here and NaN never does:
    two distinct bf16 values differ by at least ``2**-8`` of the larger magnitude.
    """
    old64, new64 = old.to(torch.float64), new.to(torch.float64)
    return (new64 - old64).abs() <= eta * torch.maximum(old64.abs(), new64.abs())
