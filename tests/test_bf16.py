"""The bf16 gate math against formulas written out here."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import bf16_bits, fp32_of_bf16_bits, rtne_fp32_to_bf16_bits

from sparse_rl_optim.bf16 import (
    PATH_NOT_TAKEN_ETA,
    bf16_ulp,
    gate_view_bits,
    random_bits16,
    stochastic_round,
    unchanged_path_not_taken,
    update_changes_weight,
)

ALL_BF16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
FINITE_BF16 = ALL_BF16[torch.isfinite(ALL_BF16)]


def ulp_formula(value: float) -> float:
    """2**(e - 7) for |value| in [2**e, 2**(e+1)), with e clamped to the normal range."""
    if value == 0:
        return 2.0**-133
    exponent = math.frexp(abs(value))[1] - 1
    return 2.0 ** (max(exponent, -126) - 7)


def test_ulp_of_every_bf16_value():
    ulps = bf16_ulp(ALL_BF16)
    finite = torch.isfinite(ALL_BF16)
    assert torch.isnan(ulps[~finite]).all()
    expected = torch.tensor([ulp_formula(v) for v in FINITE_BF16.float().tolist()])
    assert torch.equal(ulps[finite], expected)
    # the gate band: ulp/|w| in (2**-8, 2**-7] for normal values
    normal = FINITE_BF16.float().abs() >= 2.0**-126
    ratio = ulps[finite][normal] / FINITE_BF16.float().abs()[normal]
    assert (ratio > 2.0**-8).all() and (ratio <= 2.0**-7).all()


def test_ulp_is_the_distance_to_the_next_value():
    positive = FINITE_BF16[(FINITE_BF16 > 0) & (FINITE_BF16 < 3e38)]
    next_up = (positive.view(torch.int16) + 1).view(torch.bfloat16)
    assert torch.equal(next_up.float() - positive.float(), bf16_ulp(positive))


@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-6, 1e-4, 1e-2, 1.0]))
def test_update_changes_weight_matches_rounding_formula(seed, scale):
    generator = torch.Generator().manual_seed(seed)
    weight = (0.05 * torch.randn(2000, generator=generator)).to(torch.bfloat16)
    update = scale * torch.randn(2000, generator=generator)
    expected = rtne_fp32_to_bf16_bits(fp32_of_bf16_bits(bf16_bits(weight)) - update.numpy()) != bf16_bits(weight)
    np.testing.assert_array_equal(update_changes_weight(weight, update).numpy(), expected)


def test_half_ulp_is_the_gate():
    weight = torch.tensor([1.5, 1.5, 1.5, 1.5, 1.5078125, 1.0], dtype=torch.bfloat16)  # ulp 2**-7
    half = 2.0**-8
    update = torch.tensor([half * 0.99, -half * 0.99, half * 1.01, half, half, half * 0.99])
    # below half an ulp: swallowed; above: changes; a tie goes to the even mantissa (1.5 is even,
    # 1.5078125 odd); just below a power of two the grid is twice as fine, so 1.0 moves down sooner.
    assert update_changes_weight(weight, update).tolist() == [False, False, True, False, True, True]


def test_path_not_taken_rule_is_bitwise_equality_for_bf16():
    assert PATH_NOT_TAKEN_ETA < 2.0**-8
    values = FINITE_BF16
    bits = values.view(torch.int16)
    for offset in (1, 2, 3, 17):
        neighbour = (bits + offset).view(torch.bfloat16)
        keep = torch.isfinite(neighbour) & ((bits >= 0) == ((bits + offset) >= 0))
        old, new = values[keep], neighbour[keep]
        unchanged = unchanged_path_not_taken(old, new)
        bitwise_equal = old.view(torch.int16) == new.view(torch.int16)
        assert torch.equal(unchanged, bitwise_equal)
    same = unchanged_path_not_taken(values, values.clone())
    assert same.all()


@given(seed=st.integers(0, 2**31 - 1))
def test_path_not_taken_rule_on_random_pairs(seed):
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, FINITE_BF16.numel(), (2, 5000), generator=generator)
    old, new = FINITE_BF16[index[0]], FINITE_BF16[index[1]]
    both_zero = (old == 0) & (new == 0)  # +0 and -0: equal by the rule, different bits
    bitwise_equal = old.view(torch.int16) == new.view(torch.int16)
    assert torch.equal(unchanged_path_not_taken(old, new), bitwise_equal | both_zero)


def test_gate_view_bits():
    x32 = torch.tensor([1.0, 1.00390625, 1.001, -2.5])
    assert torch.equal(gate_view_bits(x32), x32.to(torch.bfloat16).view(torch.int16))
    x16 = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    assert gate_view_bits(x16).data_ptr() == x16.data_ptr()  # a view, no copy


def test_stochastic_round_bf16_keeps_nan_and_inf():
    values = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.3895e38, 0.0, -0.0])
    rounded = stochastic_round(values, torch.bfloat16, random_bits16(0, 0, values.numel()))
    assert math.isnan(rounded[0])
    assert rounded[1] == float("inf") and rounded[2] == -float("inf")
    largest_bf16 = torch.finfo(torch.bfloat16).max
    assert rounded[3].item() in (largest_bf16, float("inf"))  # rounds down, or up past the largest value
    assert rounded[4] == 0 and rounded[5] == 0


def test_stochastic_round_bf16_probability_matches_dropped_bits():
    value = torch.tensor([1.0 + 2.0**-9])  # a quarter of the way from 1.0 to the next bf16 (1 + 2**-7)
    samples = stochastic_round(value.expand(100_000).contiguous(), torch.bfloat16, random_bits16(1, 0, 100_000))
    up = (samples.float() > 1.0).float().mean().item()
    assert abs(up - 0.25) < 0.01


@given(seed=st.integers(0, 2**32 - 1), start=st.integers(0, 2**40))
def test_random_bits_are_uniform_and_slice_consistent(seed, start):
    bits = random_bits16(seed, start, 1 << 16)
    assert bits.dtype == torch.int32 and int(bits.min()) >= 0 and int(bits.max()) < 1 << 16
    # uniform: each of 16 bins of the top 4 bits holds 1/16 of the draws (chi-square, 15 dof, p ~ 1e-6)
    counts = torch.bincount(bits >> 12, minlength=16).double()
    chi_square = ((counts - 4096) ** 2 / 4096).sum().item()
    assert chi_square < 55
    # any slice can be generated on its own
    assert torch.equal(random_bits16(seed, start + 1000, 50), bits[1000:1050])
    assert not torch.equal(random_bits16(seed ^ 1, start, 64), bits[:64])
