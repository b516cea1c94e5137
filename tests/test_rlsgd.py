"""RLSGD against the written-out formula (numpy, op by op), against torch.optim.SGD, and against the
conventions of torch.optim."""

from __future__ import annotations

import io
import math
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from reference import bf16_bits, bits_equal, fp32_of_bf16_bits, rtne_fp32_to_bf16_bits, sgd_step_bf16_bits

from sparse_rl_optim import RLSGD, optimizer_state_bytes, rlsgd
from sparse_rl_optim.optim import sgd as rlsgd_module
from sparse_rl_optim.optim.sgd import _multi_tensor_rlsgd, _single_tensor_rlsgd

SHAPES = [(0,), (1,), (7,), (128,), (1000,), (3, 5), (33, 65), (64, 64), (2, 3, 4), (17, 1, 9), (0, 4), (257, 129)]


def random_bf16(shape, scale, generator):
    return (scale * torch.randn(shape, generator=generator)).to(torch.bfloat16)


def make_param(data: torch.Tensor, grad: torch.Tensor) -> torch.nn.Parameter:
    param = torch.nn.Parameter(data.clone())
    param.grad = grad.clone()
    return param


def expected_nearest(param_before: torch.Tensor, grad: torch.Tensor, lr: float, **kwargs) -> np.ndarray:
    return sgd_step_bf16_bits(bf16_bits(param_before), grad.float().numpy(), lr, **kwargs)


# --- bit-exact against the formula -----------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
def test_nearest_bf16_bit_exact_on_1e5_elements(foreach):
    generator = torch.Generator().manual_seed(1234)
    checked = 0
    for lr in (0.1, 0.125, 0.37, 1e-3, 2.5):
        for shape in SHAPES:
            for transpose in (False, True):
                data = random_bf16(shape, 0.05, generator)
                grad = random_bf16(shape, 0.03, generator)
                target = data.clone()
                if transpose:  # a non-contiguous param and grad (a no-op view for 1-d shapes)
                    target, data, grad = target.transpose(0, -1), data.transpose(0, -1), grad.transpose(0, -1)
                rlsgd([target], [grad], [None], lr=lr, foreach=foreach)
                expected = expected_nearest(data, grad, lr)
                assert bits_equal(bf16_bits(target), expected).all(), f"lr={lr} shape={shape}"
                checked += data.numel()
    assert checked >= 100_000


@given(
    shape=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    lr=st.floats(1e-3, 4.0, allow_nan=False),
    weight_decay=st.sampled_from([0.0, 0.01, 0.1]),
    maximize=st.booleans(),
    transpose=st.booleans(),
    foreach=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
# Where rounding fp32(lr)*wd to fp32 before 1 - x matters (a double-rounded factor differs here).
@example(
    shape=[40, 40, 40], lr=1.6203316156642067, weight_decay=0.1, maximize=False, transpose=False, foreach=True, seed=0
)
def test_nearest_bf16_bit_exact_random(shape, lr, weight_decay, maximize, transpose, foreach, seed):
    generator = torch.Generator().manual_seed(seed)
    data = random_bf16(tuple(shape), 0.05, generator)
    grad = random_bf16(tuple(shape), 0.03 * (1 + seed % 7), generator)
    if transpose and data.dim() >= 2:
        data, grad = data.transpose(0, -1), grad.transpose(0, -1)  # non-contiguous
    target, before = data.clone(), data.clone()
    rlsgd([target], [grad], [None], lr=lr, weight_decay=weight_decay, maximize=maximize, foreach=foreach)
    expected = expected_nearest(before, grad, lr, weight_decay=weight_decay, maximize=maximize)
    assert bits_equal(bf16_bits(target), expected).all()


def test_non_contiguous_views_update_in_place():
    generator = torch.Generator().manual_seed(5)
    base = random_bf16((40, 30), 0.05, generator)
    view = base[::2, 1::3]  # non-contiguous view into a larger tensor
    assert not view.is_contiguous()
    grad = random_bf16(view.shape, 0.05, generator)
    untouched = base.clone()
    before = view.clone()
    rlsgd([view], [grad], [None], lr=0.5)
    assert bits_equal(bf16_bits(base[::2, 1::3]), expected_nearest(before, grad, 0.5)).all()
    mask = torch.ones_like(base, dtype=torch.bool)
    mask[::2, 1::3] = False
    assert torch.equal(base[mask], untouched[mask])  # nothing outside the view was written


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_nearest_other_dtypes_match_formula(dtype):
    generator = torch.Generator().manual_seed(7)
    for shape in SHAPES:
        data = (0.05 * torch.randn(shape, generator=generator)).to(dtype)
        grad = (0.03 * torch.randn(shape, generator=generator)).to(dtype)
        param = make_param(data, grad)
        RLSGD([param], lr=0.3).step()
        p32 = data.float().numpy()
        expected32 = (p32 - (np.float32(0.3) * grad.float().numpy()).astype(np.float32)).astype(np.float32)
        expected = expected32.astype(np.float16) if dtype == torch.float16 else expected32
        np.testing.assert_array_equal(param.detach().numpy(), expected)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("nesterov", "dampening"), [(False, 0.0), (False, 0.3), (True, 0.0)])
def test_momentum_matches_formula_over_steps(nesterov, dampening, foreach):
    generator = torch.Generator().manual_seed(11)
    momentum, lr, wd = 0.9, 0.2, 0.05
    data = random_bf16((50, 21), 0.05, generator)
    param = torch.nn.Parameter(data.clone())
    with pytest.warns(UserWarning, match="shrinks every weight by 1% per step"):
        optimizer = RLSGD(
            [param],
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=wd,
            foreach=foreach,
        )
    bits = bf16_bits(data)
    buffer = None
    for _ in range(4):
        grad = random_bf16(data.shape, 0.05, generator)
        param.grad = grad
        optimizer.step()
        g = grad.float().numpy()
        if buffer is None:
            buffer = g.copy()
        else:
            buffer = (np.float32(momentum) * buffer).astype(np.float32)
            buffer = (buffer + (g if dampening == 0 else (g * np.float32(1 - dampening)).astype(np.float32))).astype(
                np.float32
            )
        direction = (g + (buffer * np.float32(momentum)).astype(np.float32)).astype(np.float32) if nesterov else buffer
        bits = sgd_step_bf16_bits(bits, g, lr, weight_decay=wd, direction=direction)
        assert bits_equal(bf16_bits(param.detach()), bits).all()
        state_buffer = optimizer.state[param]["momentum_buffer"]
        assert state_buffer.dtype == torch.float32
        np.testing.assert_array_equal(state_buffer.numpy(), buffer)


def test_nan_and_inf_gradients_follow_the_formula():
    data = torch.tensor([0.5, -0.25, 1.0, 2.0, 0.125, 3.0], dtype=torch.bfloat16)
    grad = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, 0.0, -2.0], dtype=torch.bfloat16)
    param = make_param(data, grad)
    RLSGD([param], lr=0.5).step()
    result = param.detach().float()
    assert math.isnan(result[0])
    assert result[1] == -float("inf") and result[2] == float("inf")
    assert bits_equal(bf16_bits(param.detach()), expected_nearest(data, grad, 0.5)).all()


# --- against torch.optim.SGD -----------------------------------------------------------------


def test_within_one_ulp_of_torch_sgd_at_bf16_exact_lr():
    generator = torch.Generator().manual_seed(3)
    data = random_bf16((300, 1000), 0.05, generator)
    grad = random_bf16((300, 1000), 0.03, generator)
    ours, theirs = make_param(data, grad), make_param(data, grad)
    RLSGD([ours], lr=0.125).step()
    torch.optim.SGD([theirs], lr=0.125).step()
    ours_f, theirs_f = ours.detach().float(), theirs.detach().float()
    differ = ours_f != theirs_f
    assert differ.float().mean().item() < 1e-3
    ulp = torch.exp2(torch.floor(torch.log2(torch.maximum(ours_f.abs(), theirs_f.abs()))) - 7)
    assert ((ours_f - theirs_f).abs() <= ulp).all()


def test_torch_sgd_rounds_lr_to_bf16_on_cpu():
    """Why results differ from torch at lr 0.1 (documented in the README): torch's CPU bf16 path acts
    as if lr were bf16(0.1) = 0.10009765625, which the written-out formula reproduces."""
    generator = torch.Generator().manual_seed(4)
    data = random_bf16((100_000,), 0.05, generator)
    grad = random_bf16((100_000,), 0.03, generator)
    theirs = make_param(data, grad)
    torch.optim.SGD([theirs], lr=0.1).step()
    torch_bits = bf16_bits(theirs.detach())
    with_fp32_lr = expected_nearest(data, grad, 0.1)
    with_bf16_lr = expected_nearest(data, grad, 0.10009765625)
    assert (torch_bits != with_fp32_lr).mean() > 0.01
    assert (torch_bits != with_bf16_lr).mean() < 1e-3


# --- foreach == reference ----------------------------------------------------------------------


@given(
    momentum=st.sampled_from([0.0, 0.9]),
    nesterov=st.booleans(),
    dampening=st.sampled_from([0.0, 0.25]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    maximize=st.booleans(),
    rounding=st.sampled_from(["nearest", "stochastic"]),
    bucket_numel=st.sampled_from([5, 64, 1 << 16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_foreach_bit_equal_to_reference(
    momentum, nesterov, dampening, weight_decay, maximize, rounding, bucket_numel, seed
):
    nesterov = nesterov and momentum != 0
    dampening = 0.0 if nesterov else dampening
    generator = torch.Generator().manual_seed(seed)
    dtypes = [torch.bfloat16, torch.float32, torch.bfloat16, torch.float16, torch.bfloat16, torch.bfloat16]
    shapes = [(31, 7), (5,), (0,), (64, 3), (9, 9), (12, 10)]
    initial = [(0.05 * torch.randn(s, generator=generator)).to(d) for s, d in zip(shapes, dtypes, strict=True)]
    runs = {}
    for name, fn in (("single", _single_tensor_rlsgd), ("multi", _multi_tensor_rlsgd)):
        params = [p.clone() for p in initial]
        params[-1] = params[-1].t()  # a non-contiguous param
        buffers: list = [None] * len(params)
        step_generator = torch.Generator().manual_seed(seed + 1)
        with mock.patch.dict(rlsgd_module._SCRATCH_NUMEL, {"cpu": bucket_numel}):
            for step in range(3):
                grads = [(0.05 * torch.randn(p.shape, generator=step_generator)).to(p.dtype) for p in params]
                stats = fn(
                    params,
                    grads,
                    buffers,
                    lr=0.3,
                    momentum=momentum,
                    dampening=dampening,
                    nesterov=nesterov,
                    weight_decay=weight_decay,
                    maximize=maximize,
                    rounding=rounding,
                    step_seed=1000 + step,
                    collect_gate_stats=True,
                )
        runs[name] = (params, buffers, stats)
    for a, b in zip(runs["single"][0], runs["multi"][0], strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))  # bitwise
    for a, b in zip(runs["single"][1], runs["multi"][1], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(runs["single"][2], runs["multi"][2], strict=True):
        assert int(a.intended) == int(b.intended) and int(a.swallowed) == int(b.swallowed)


def test_buckets_cover_every_element_once():
    numels = [(0, 10), (1, 0), (2, 3), (3, 17)]
    for bucket_numel in (1, 4, 7, 100):
        buckets = rlsgd_module._plan_buckets(numels, bucket_numel)
        assert all(sum(s.stop - s.start for s in bucket) <= bucket_numel for bucket in buckets)
        covered = {(s.index, e) for bucket in buckets for s in bucket for e in range(s.start, s.stop)}
        assert covered == {(i, e) for i, n in numels for e in range(n)}
        assert sum(s.stop - s.start for bucket in buckets for s in bucket) == 30


def test_foreach_flag_through_the_class():
    generator = torch.Generator().manual_seed(8)
    data = [random_bf16((20, 20), 0.05, generator) for _ in range(3)]
    grads = [random_bf16((20, 20), 0.05, generator) for _ in range(3)]
    results = []
    for foreach in (False, True):
        params = [make_param(d, g) for d, g in zip(data, grads, strict=True)]
        RLSGD(params, lr=0.25, foreach=foreach).step()
        results.append([p.detach() for p in params])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# --- stochastic rounding -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased(dtype):
    n = 200_000
    data = torch.full((n,), 1.0, dtype=dtype)
    # Below half the ulp just under 1.0 (bf16: 2**-9, fp16: 2**-12): nearest rounding never moves.
    update = 0.001 if dtype == torch.bfloat16 else 1e-4
    grad = torch.full((n,), 1.0, dtype=dtype)
    nearest = data.clone()
    rlsgd([nearest], [grad], [None], lr=update)
    torch.manual_seed(0)
    stochastic = data.clone()
    rlsgd([stochastic], [grad], [None], lr=update, rounding="stochastic")
    step = (stochastic.double() - 1.0).mean().item()
    lower_ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # the grid just below 1.0
    assert torch.equal(nearest, data)  # round-to-nearest swallowed every update
    p_down = update / lower_ulp
    standard_error = lower_ulp * math.sqrt(p_down * (1 - p_down) / n)
    assert abs(step - (-update)) < 5 * standard_error + 1e-7, (step, -update)


def test_stochastic_rounding_reproducible_under_manual_seed():
    generator = torch.Generator().manual_seed(2)
    data = random_bf16((500,), 0.05, generator)
    grad = random_bf16((500,), 0.01, generator)
    outcomes = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        param = make_param(data, grad)
        RLSGD([param], lr=0.1, rounding="stochastic").step()
        outcomes.append(param.detach().clone())
    assert torch.equal(outcomes[0], outcomes[1])
    assert not torch.equal(outcomes[0], outcomes[2])


def test_stochastic_rounding_lands_on_a_neighbour():
    generator = torch.Generator().manual_seed(9)
    data = random_bf16((5000,), 0.05, generator)
    grad = random_bf16((5000,), 0.05, generator)
    param = make_param(data, grad)
    RLSGD([param], lr=0.2, rounding="stochastic").step()
    exact = fp32_of_bf16_bits(bf16_bits(data)) - (np.float32(0.2) * grad.float().numpy()).astype(np.float32)
    down = fp32_of_bf16_bits((exact.view(np.uint32) >> 16).astype(np.uint16))  # truncated magnitude
    up_bits = (exact.view(np.uint32) >> 16).astype(np.uint16) + (exact.view(np.uint32) & 0xFFFF != 0)
    up = fp32_of_bf16_bits(up_bits.astype(np.uint16))
    result = param.detach().float().numpy()
    assert ((result == down) | (result == up)).all()
    assert (result == up).any() and (result == down).any()
    # and it is not round-to-nearest in disguise
    assert not np.array_equal(rtne_fp32_to_bf16_bits(exact), bf16_bits(param.detach()))


def test_one_seed_per_step_whatever_the_groups_and_their_gradients():
    """A step draws one seed from torch's generator when some group rounds stochastically (so every
    rank of a distributed job draws, and broadcasts, alike): not one per group, and also when a
    group has no gradient. Group 0 rounds with that seed (as the functional form given it); the
    other groups with different ones."""
    generator = torch.Generator().manual_seed(3)
    weights = [random_bf16((16, 16), 1.0, generator) for _ in range(2)]
    grads = [random_bf16((16, 16), 0.003, generator) for _ in range(2)]
    params = [make_param(w, g) for w, g in zip(weights, grads, strict=True)]
    idle = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))  # never gets a gradient
    optimizer = RLSGD(
        [{"params": [params[0]]}, {"params": [params[1]]}, {"params": [idle]}], lr=0.1, rounding="stochastic"
    )

    torch.manual_seed(0)
    first_draw, second_draw = torch.randint(0, 2**31, (2,)).tolist()
    torch.manual_seed(0)
    torch.randint(0, 2**31, (1,))  # what a step consumes
    expected_next = torch.randint(0, 2**31, (1,)).item()
    torch.manual_seed(0)
    optimizer.step()
    assert torch.randint(0, 2**31, (1,)).item() == expected_next
    assert first_draw != second_draw

    # Group 0 used the drawn seed; group 1, fed the same values, rounded differently.
    by_hand = [w.clone() for w in weights]
    rlsgd([by_hand[0]], [grads[0]], [None], lr=0.1, rounding="stochastic", step_seed=first_draw)
    assert torch.equal(params[0].detach(), by_hand[0])
    rlsgd([by_hand[1]], [grads[1]], [None], lr=0.1, rounding="stochastic", step_seed=first_draw)
    assert not torch.equal(params[1].detach(), by_hand[1])


# --- state -------------------------------------------------------------------------------------


def test_no_state_without_momentum():
    generator = torch.Generator().manual_seed(1)
    params = [make_param(random_bf16((30, 30), 0.05, generator), random_bf16((30, 30), 0.05, generator))]
    optimizer = RLSGD(params, lr=0.1)
    for _ in range(3):
        optimizer.step()
    assert optimizer.state_bytes() == 0
    # Only an empty entry per stepped param (torch.distributed.checkpoint takes an optimizer whose
    # state is empty for one that never stepped, and runs a dummy step on it): no tensors.
    assert optimizer.state_dict()["state"] == {0: {}}
    assert RLSGD(params, lr=0.1).state_dict()["state"] == {}
    with_momentum = RLSGD(params, lr=0.1, momentum=0.9)
    with_momentum.step()
    assert optimizer_state_bytes(with_momentum) == with_momentum.state_bytes() == 30 * 30 * 4  # fp32 buffer


def _train(optimizer, params, grads_per_step):
    for grads in grads_per_step:
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()


def test_state_dict_round_trip_exact_with_weights_only():
    generator = torch.Generator().manual_seed(21)
    initial = [random_bf16((16, 8), 0.05, generator), random_bf16((8,), 0.05, generator)]
    grads = [[random_bf16(p.shape, 0.05, generator) for p in initial] for _ in range(6)]

    straight = [torch.nn.Parameter(p.clone()) for p in initial]
    straight_opt = RLSGD(straight, lr=0.2, momentum=0.9, nesterov=True)
    _train(straight_opt, straight, grads)

    first = [torch.nn.Parameter(p.clone()) for p in initial]
    first_opt = RLSGD(first, lr=0.2, momentum=0.9, nesterov=True)
    _train(first_opt, first, grads[:3])
    buffer = io.BytesIO()
    torch.save(first_opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed_opt = RLSGD(resumed, lr=0.2, momentum=0.9, nesterov=True)
    resumed_opt.load_state_dict(loaded)
    for param in resumed:
        assert resumed_opt.state[param]["momentum_buffer"].dtype == torch.float32
    for saved, restored in zip(first, resumed, strict=True):
        assert torch.equal(first_opt.state[saved]["momentum_buffer"], resumed_opt.state[restored]["momentum_buffer"])
    _train(resumed_opt, resumed, grads[3:])
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)


def test_old_state_dict_without_new_keys_loads():
    param = make_param(torch.ones(4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16))
    optimizer = RLSGD([param], lr=0.5)
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        for key in ("rounding", "foreach", "maximize", "dampening"):
            del group[key]
    fresh = RLSGD([param], lr=0.5)
    with pytest.warns(UserWarning, match="did not save"):
        fresh.load_state_dict(state)
    assert fresh.param_groups[0]["rounding"] == "nearest"
    fresh.step()
    assert torch.equal(param.detach(), torch.full((4,), 0.5, dtype=torch.bfloat16))
    # and a pickled optimizer without the new attributes unpickles with defaults
    restored = RLSGD.__new__(RLSGD)
    restored.__setstate__({"defaults": {"lr": 0.5}, "state": {}, "param_groups": [{"params": [param], "lr": 0.5}]})
    assert restored.param_groups[0]["momentum"] == 0.0 and restored.gate_stats_enabled is False


# --- torch.optim conventions ----------------------------------------------------------------


def test_param_groups_have_their_own_lr_and_none_grads_are_skipped():
    a = make_param(torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16))
    b = make_param(torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16))
    frozen = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    optimizer = RLSGD([{"params": [a]}, {"params": [b, frozen], "lr": 0.25}], lr=0.5)
    optimizer.step()
    assert torch.equal(a.detach().float(), torch.full((3,), 0.5))
    assert torch.equal(b.detach().float(), torch.full((3,), 0.75))
    assert torch.equal(frozen.detach().float(), torch.ones(3))


def test_tensor_lr_and_maximize_and_closure():
    param = make_param(torch.ones(3, dtype=torch.bfloat16), torch.full((3,), 2.0, dtype=torch.bfloat16))
    optimizer = RLSGD([param], lr=torch.tensor(0.25), maximize=True)
    calls = []

    def closure():
        calls.append(1)
        return torch.tensor(3.0)

    loss = optimizer.step(closure)
    assert calls == [1] and float(loss) == 3.0
    assert torch.equal(param.detach().float(), torch.full((3,), 1.5))


def test_repr_and_errors():
    param = torch.nn.Parameter(torch.ones(2))
    text = repr(RLSGD([param], lr=0.1))
    assert "RLSGD" in text and "rounding: nearest" in text
    cases = [
        (dict(lr=-0.1), "learning rate"),
        (dict(lr=float("nan")), "learning rate"),
        (dict(lr=0.1, momentum=-0.5), "momentum"),
        (dict(lr=0.1, nesterov=True), "Nesterov"),
        (dict(lr=0.1, momentum=0.9, nesterov=True, dampening=0.1), "Nesterov"),
        (dict(lr=0.1, rounding="up"), "rounding"),
        (dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
        (dict(lr=torch.tensor([0.1, 0.2])), "1-element"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            RLSGD([param], **kwargs)
    optimizer = RLSGD([param], lr=0.1)
    with pytest.raises(ValueError, match="rounding"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "rounding": "bad"})


def test_sparse_gradients_raise_a_clear_error():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        RLSGD(embedding.parameters(), lr=0.1).step()


def test_adamw_scale_lr_warns():
    param = torch.nn.Parameter(torch.ones(2))
    with pytest.warns(UserWarning, match="AdamW-scale"):
        RLSGD([param], lr=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RLSGD([param], lr=0.1)
        RLSGD([param], lr=0.0)


def test_gate_stats_count_intended_and_swallowed():
    generator = torch.Generator().manual_seed(17)
    data = random_bf16((100, 100), 0.05, generator)
    grad = random_bf16((100, 100), 0.003, generator)
    grad[:10] = 0  # no intended update there
    param = make_param(data, grad)
    optimizer = RLSGD([param], lr=0.1)
    optimizer.gate_stats_enabled = True
    optimizer.step()
    stats = optimizer.gate_stats[param]
    intended = (np.float32(0.1) * grad.float().numpy()).astype(np.float32) != 0
    unchanged = bf16_bits(param.detach()) == bf16_bits(data)
    assert int(stats.intended) == intended.sum() > 0
    assert int(stats.swallowed) == (intended & unchanged).sum() > 0


def test_weight_decay_below_the_gate_warns_and_changes_nothing():
    data = (0.05 * torch.randn(1000, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    param = make_param(data, torch.zeros(1000, dtype=torch.bfloat16))
    with pytest.warns(UserWarning, match="too small to move a bf16 weight"):
        optimizer = RLSGD([param], lr=0.1, weight_decay=0.01)  # lr*wd = 1e-3 < 2**-9
    optimizer.step()
    assert torch.equal(param.detach(), data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RLSGD([param], lr=0.1, weight_decay=0.01, rounding="stochastic")  # applies it in expectation
        RLSGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, weight_decay=0.01)  # fp32 has the precision


def test_intended_counts_the_gradient_term_only():
    data = (0.05 * torch.randn(1000, generator=torch.Generator().manual_seed(1))).to(torch.bfloat16)
    grad = torch.zeros(1000, dtype=torch.bfloat16)
    grad[:100] = 1e-3
    param = make_param(data, grad)
    with pytest.warns(UserWarning):
        optimizer = RLSGD([param], lr=0.1, weight_decay=0.1)
    optimizer.gate_stats_enabled = True
    optimizer.step()
    stats = optimizer.gate_stats[param]
    assert int(stats.intended) == 100  # weight decay moved other weights too; it is not "intent"
    assert int((param.detach() != data).sum()) > 100


def test_duplicate_params_are_rejected():
    param = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="same parameter twice"):
        RLSGD([param, param], lr=0.1)


def test_fp64_params_use_a_double_lr():
    data = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grad = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for foreach in (False, True):
        param = make_param(data, grad)
        RLSGD([param], lr=0.1, foreach=foreach).step()
        np.testing.assert_array_equal(param.detach().numpy(), data.numpy() - 0.1 * grad.numpy())


def test_load_hooks_see_the_whole_dict_and_the_restored_buffers():
    param = make_param(torch.ones(3, dtype=torch.bfloat16), torch.full((3,), 0.001, dtype=torch.bfloat16))
    optimizer = RLSGD([param], lr=0.5, momentum=0.9)
    optimizer.step()
    state = optimizer.state_dict()
    fresh = RLSGD([param], lr=0.5, momentum=0.9)
    seen = {}
    fresh.register_load_state_dict_pre_hook(lambda opt, sd: seen.update(pre=sd["state"][0]["momentum_buffer"].dtype))
    fresh.register_load_state_dict_post_hook(lambda opt: seen.update(post=opt.state[param]["momentum_buffer"].dtype))
    fresh.load_state_dict(state)
    assert seen == {"pre": torch.float32, "post": torch.float32}
    assert torch.equal(fresh.state[param]["momentum_buffer"], optimizer.state[param]["momentum_buffer"])


def test_weight_decay_warnings_name_each_dtype_and_point_at_the_caller():
    mixed = [
        torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16)),
        torch.nn.Parameter(torch.ones(2, dtype=torch.float16)),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RLSGD(mixed, lr=0.1, weight_decay=0.01)  # lr*wd = 1e-3: below bf16's gate, above fp16's
    messages = [str(w.message) for w in caught]
    assert any("too small to move a bf16 weight" in m for m in messages)
    assert any("shrinks every weight" in m for m in messages)
    assert all(w.filename == __file__ for w in caught)
    optimizer = RLSGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.warns(UserWarning, match="AdamW-scale") as caught:
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": 1e-6})
    assert caught[0].filename == __file__


def test_a_rejected_param_group_is_not_kept():
    optimizer = RLSGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    for bad in ({"lr": None}, {"momentum": -1.0}, {"lr": 1e39}):
        with pytest.raises((TypeError, ValueError)):
            optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], **bad})
    assert len(optimizer.param_groups) == 1
