"""Triton mirrors of the bf16 bit math in :mod:`sparse_rl_optim.bf16` (the one home of these rules;
the constants come from there). Written with integer ops on bit patterns because the Triton
interpreter truncates fp32 -> bf16 casts and does bf16 arithmetic on raw bits (../shared notes),
and because integer ops round the same way on every GPU.

Values travel as uint32 holding a 16-bit pattern in the low half (``bits16``).
"""

import triton
import triton.language as tl

from sparse_rl_optim import bf16 as _bf16

GOLDEN: tl.constexpr = tl.constexpr(_bf16._GOLDEN)
HASH_MUL_1: tl.constexpr = tl.constexpr(_bf16._HASH_MUL_1)
HASH_MUL_2: tl.constexpr = tl.constexpr(_bf16._HASH_MUL_2)
BF16_NAN: tl.constexpr = tl.constexpr(_bf16._BF16_CANONICAL_NAN)

#: Storage kinds of params and grads (a constexpr per kernel specialisation).
BF16: tl.constexpr = tl.constexpr(0)
FP16: tl.constexpr = tl.constexpr(1)
FP32: tl.constexpr = tl.constexpr(2)


@triton.jit
def is_finite32(x):
    """Finite fp32 (not inf, not NaN), from the exponent bits."""
    return (x.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000


@triton.jit
def negate32(x):
    """``-x`` for fp32, as torch computes it (the sign bit flipped: ``-(+0) == -0``). Triton 3.6
    compiles unary minus as ``0.0 - x``, which gives ``+0`` for ``+0`` (measured on sm_90 PTX)."""
    return (x.to(tl.uint32, bitcast=True) ^ 0x80000000).to(tl.float32, bitcast=True)


@triton.jit
def bf16_bits_to_fp32(bits16):
    """The exact fp32 value of a bf16 pattern."""
    return (bits16.to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def fp32_to_bf16_bits_rtne(x):
    """Round-to-nearest-even fp32 -> bf16 pattern: ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``; NaN
    becomes the canonical quiet NaN 0x7FC0 (as torch's ``.to(torch.bfloat16)``)."""
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where(x != x, BF16_NAN, rounded)


@triton.jit
def fp32_to_fp16_bits_rtne(x):
    """Round-to-nearest-even fp32 -> fp16 pattern (the cast rounds correctly in the interpreter too)."""
    return x.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)


@triton.jit
def fp16_bits_to_fp32(bits16):
    return bits16.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def random_bits16(element_index, seed_mix):
    """Counter-based 16 random bits of element ``element_index`` (int64): the hash of
    :func:`sparse_rl_optim.bf16.random_bits16`, with ``seed_mix = (seed * GOLDEN) mod 2**32``.
    uint32 arithmetic wraps mod 2**32 exactly as the reference masks."""
    x = element_index.to(tl.uint32) + seed_mix.to(tl.uint32)
    x = x ^ (x >> 16)
    x = x * HASH_MUL_1
    x = x ^ (x >> 15)
    x = x * HASH_MUL_2
    x = x ^ (x >> 16)
    return x >> 16


@triton.jit
def fp32_to_bf16_bits_stochastic(x, random16):
    """Stochastic rounding to bf16: add 16 random bits to the fp32 pattern, keep the top half;
    non-finite values round to nearest (the carry could turn a NaN into inf)."""
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + random16) >> 16
    return tl.where(is_finite32(x), rounded, fp32_to_bf16_bits_rtne(x))


@triton.jit
def _fp16_step(bits16, UP: tl.constexpr):
    """The fp16 neighbour of a finite fp16 pattern towards +inf (``UP``) or -inf."""
    magnitude = bits16 & 0x7FFF
    negative = (bits16 & 0x8000) != 0
    if UP:
        stepped = tl.where(negative, bits16 - 1, bits16 + 1)
        from_zero = 0x0001  # from +-0 to the smallest subnormal of the direction's sign
    else:
        stepped = tl.where(negative, bits16 + 1, bits16 - 1)
        from_zero = 0x8001
    return tl.where(magnitude == 0, from_zero, stepped)


@triton.jit
def fp32_to_fp16_bits_stochastic(x, random16):
    """Stochastic rounding to fp16, as :func:`sparse_rl_optim.bf16.stochastic_round`: round up to
    the next fp16 value with probability ``(x - lower) / (upper - lower)``, resolved to 2**-16;
    round to nearest outside the finite fp16 range. Every operation here is exact: the gap is a
    power of two, so the division is a multiplication by its exact reciprocal."""
    nearest = fp32_to_fp16_bits_rtne(x)
    nearest32 = fp16_bits_to_fp32(nearest)
    lower = tl.where(nearest32 > x, _fp16_step(nearest, False), nearest)
    upper = _fp16_step(lower, True)
    lower32 = fp16_bits_to_fp32(lower)
    gap = fp16_bits_to_fp32(upper) - lower32
    gap_exponent = (gap.to(tl.uint32, bitcast=True) >> 23) & 0xFF
    reciprocal = ((254 - gap_exponent) << 23).to(tl.float32, bitcast=True)
    threshold = (x - lower32) * reciprocal * 65536.0
    rounded = tl.where(random16.to(tl.float32) < threshold, upper, lower)
    usable = is_finite32(nearest32) & is_finite32(gap) & is_finite32(x)
    return tl.where(usable, rounded, nearest)


@triton.jit
def element_pointers(address, offsets, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed pointers to ``offsets`` of the tensor at integer ``address``. With ``ALIGNED`` (the
    launcher checked a 16-byte aligned address; blocks start at multiples of BLOCK) the hints tell
    the compiler that runs of 16 elements are contiguous and 16-byte aligned: vector loads/stores."""
    pointers = address.to(tl.pointer_type(DTYPE)) + offsets
    if ALIGNED:
        pointers = tl.max_contiguous(tl.multiple_of(pointers, 16), 16)
    return pointers


@triton.jit
def masked_load(pointers, mask, other):
    """``tl.load`` that takes ``mask=None`` for a full block (Triton refuses ``other`` without a mask)."""
    if mask is None:
        return tl.load(pointers)
    else:
        return tl.load(pointers, mask=mask, other=other)


@triton.jit
def masked_store(pointers, values, mask):
    if mask is None:
        tl.store(pointers, values)
    else:
        tl.store(pointers, values, mask=mask)


@triton.jit
def load_as_fp32(address, offsets, mask, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """Load elements of a bf16/fp16/fp32 tensor at integer ``address`` as fp32, exactly; also
    returns the stored pattern (uint32; the low 16 bits for bf16/fp16). ``mask`` may be None (a
    full block: no predication, so the loads vectorise)."""
    if KIND == FP32:
        value = masked_load(element_pointers(address, offsets, tl.float32, ALIGNED), mask, 0.0)
        return value, value.to(tl.uint32, bitcast=True)
    else:
        bits = masked_load(element_pointers(address, offsets, tl.uint16, ALIGNED), mask, 0).to(tl.uint32)
        if KIND == BF16:
            return bf16_bits_to_fp32(bits), bits
        else:
            return fp16_bits_to_fp32(bits), bits
