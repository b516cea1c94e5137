"""The fused Triton RLSGD step (``backend="triton"``) against the torch reference, bit for bit.

Without a GPU these run in Triton's interpreter on CPU tensors (tests/conftest.py sets
``TRITON_INTERPRET=1``); with one (``make gpu-check``) on CUDA tensors. The interpreter is slow, so
tensors stay small, but sizes cross tile and block boundaries (``block_size`` is 16384 there).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from reference import bf16_bits, sgd_step_bf16_bits

from sparse_rl_optim import RLSGD, PrecisionGateTracker, rlsgd
from sparse_rl_optim.bf16 import random_bits16, stochastic_round, stochastic_seed
from sparse_rl_optim.kernels.launch import _plan_blocks, block_size, pack_changed_tiles, rlsgd_step_triton
from sparse_rl_optim.optim.sgd import _step_scalars
from sparse_rl_optim.tiles import DEFAULT_TILE_SIZE, PackedTiles, apply_tiles, num_tiles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}
BLOCK = block_size(DEFAULT_TILE_SIZE)


def _bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().view(BITS[tensor.dtype]).numpy().reshape(-1)


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-identical, except that any NaN equals any NaN (the payload of a computed NaN is not
    specified by either path)."""
    assert actual.dtype == expected.dtype
    both_nan = (torch.isnan(actual.detach().cpu()) & torch.isnan(expected.detach().cpu())).numpy().reshape(-1)
    mismatch = (_bits(actual) != _bits(expected)) & ~both_nan
    assert not mismatch.any(), f"{int(mismatch.sum())} of {mismatch.size} elements differ"


def _gate_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The 16 bits an inference engine sees: stored bf16/fp16 bits, bf16 rounding of fp32."""
    if tensor.dtype == torch.float32:
        tensor = tensor.to(torch.bfloat16)
    return tensor.contiguous().view(torch.int16)


def _random(numel: int, dtype: torch.dtype, scale: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(numel, generator=generator) * scale).to(dtype).to(DEVICE)


def _run_both(params, grads, steps: int = 1, **options):
    """Step copies through the reference and through the kernel; return both sets of params,
    buffers and stats."""
    reference_params = [p.clone() for p in params]
    kernel_params = [p.clone() for p in params]
    reference_buffers: list = [None] * len(params)
    kernel_buffers: list = [None] * len(params)
    for _ in range(steps):
        seed_state = torch.get_rng_state()
        reference_stats = rlsgd(
            reference_params,
            grads,
            reference_buffers,
            foreach=False,
            backend="torch",
            collect_gate_stats=True,
            **options,
        )
        torch.set_rng_state(seed_state)  # the same stochastic-rounding seed for both paths
        kernel_stats = rlsgd(kernel_params, grads, kernel_buffers, backend="triton", collect_gate_stats=True, **options)
    return reference_params, kernel_params, reference_buffers, kernel_buffers, reference_stats, kernel_stats


def _step_report(params, grads, *, lr=0.5, tile_size=64, seeds=None, **flags):
    """The step kernel called directly (no momentum, no weight decay, nearest rounding unless
    ``stochastic=True``), on the fp32 step scalars of ``lr``."""
    step_lr, decay = _step_scalars(torch.float32, lr, 0.0)
    return rlsgd_step_triton(
        params,
        grads,
        None,
        [False] * len(params),
        lr=step_lr,
        decay=decay,
        momentum=0.0,
        dampening=0.0,
        nesterov=False,
        maximize=False,
        stochastic=flags.pop("stochastic", False),
        seeds=[0] * len(params) if seeds is None else seeds,
        tile_size=tile_size,
        **flags,
    )


SIZES = st.sampled_from([1, 7, 63, 64, 65, 1000, BLOCK - 1, BLOCK + 5])


@settings(max_examples=20)
@given(
    dtype=st.sampled_from(DTYPES),
    grad_dtype=st.sampled_from(["same", torch.float32]),
    sizes=st.lists(SIZES, min_size=1, max_size=3),
    lr=st.floats(1e-3, 1.0),
    weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
    maximize=st.booleans(),
    rounding=st.sampled_from(["nearest", "stochastic"]),
    momentum=st.sampled_from([0.0, 0.9]),
    dampening=st.sampled_from([0.0, 0.25]),
    nesterov=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(torch.bfloat16, "same", [BLOCK + 5, 7], 0.1, 0.0, False, "nearest", 0.0, 0.0, False, 0)
def test_step_kernel_bit_exact_against_reference(
    dtype, grad_dtype, sizes, lr, weight_decay, maximize, rounding, momentum, dampening, nesterov, seed
):
    """Every option of the formula, two steps (momentum's first and a later step), several tensors
    per launch: weights, fp32 momentum buffers and gate stats equal the reference bit for bit."""
    nesterov = nesterov and momentum > 0 and dampening == 0
    grad_dtype = dtype if grad_dtype == "same" else grad_dtype
    params = [_random(n, dtype, 0.05, seed + i) for i, n in enumerate(sizes)]
    grads = [_random(n, grad_dtype, 0.02, seed + 100 + i) for i, n in enumerate(sizes)]
    torch.manual_seed(seed)
    ref, ker, ref_buf, ker_buf, ref_stats, ker_stats = _run_both(
        params,
        grads,
        steps=2,
        lr=lr,
        weight_decay=weight_decay,
        maximize=maximize,
        rounding=rounding,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
    )
    for r, k in zip(ref, ker, strict=True):
        _assert_same_bits(k, r)
    for r, k in zip(ref_buf, ker_buf, strict=True):
        if momentum:
            assert k.dtype == torch.float32
            _assert_same_bits(k, r)
    for r, k in zip(ref_stats, ker_stats, strict=True):
        assert int(k.intended) == int(r.intended)
        assert int(k.swallowed) == int(r.swallowed)


@pytest.mark.parametrize("lr", [0.1, 0.0123, 0.5])
def test_bf16_step_equals_numpy_formula(lr):
    """An independent reference: the formula written out in numpy (tests/reference.py)."""
    param = _random(BLOCK + 333, torch.bfloat16, 0.05, 1)
    grad = _random(BLOCK + 333, torch.bfloat16, 0.03, 2)
    expected = sgd_step_bf16_bits(bf16_bits(param.cpu()), grad.float().cpu().numpy(), lr, weight_decay=0.01)
    stepped = param.clone()
    rlsgd([stepped], [grad], [None], lr=lr, weight_decay=0.01, backend="triton")
    assert (bf16_bits(stepped.cpu()) == expected).all()
    assert (bf16_bits(stepped.cpu()) != bf16_bits(param.cpu())).any()  # the step did something


def test_tile_counts_equal_naive_diff():
    """The kernel's per-tile counts of changed elements equal a naive per-tile diff of the gate
    view, for bf16 (stored bits) and fp32 (bits of the bf16 rounding) params."""
    for dtype in (torch.bfloat16, torch.float32):
        param = _random(BLOCK + 70, dtype, 0.05, 3)
        grad = _random(BLOCK + 70, torch.float32, 1e-3, 4)
        before = param.clone()
        report = _step_report([param], [grad], lr=0.3, count_tiles=True, record=True)
        (result,) = report.tensors
        old_view = before.to(torch.bfloat16).view(torch.int16).cpu().numpy()
        new_view = param.to(torch.bfloat16).view(torch.int16).cpu().numpy()
        changed = old_view != new_view
        padded = np.zeros(num_tiles(param.numel(), 64) * 64, dtype=bool)
        padded[: changed.size] = changed
        assert 0 < changed.sum() < changed.size
        np.testing.assert_array_equal(result.tile_changed.cpu().numpy(), padded.reshape(-1, 64).sum(axis=1))
        np.testing.assert_array_equal(result.changed_indices.cpu().numpy(), np.nonzero(changed)[0])
        np.testing.assert_array_equal(result.old_bits.cpu().numpy(), old_view[changed])
        assert int(result.old_checksum) == int(old_view.astype(np.int64).sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile_size", [32, 64, 1024])
def test_step_then_pack_then_apply_rebuilds_the_new_weights(dtype, tile_size):
    """The step's per-tile counts, compacted for all tensors in one launch (prefix-sum slots), then
    applied to replicas holding the old weights, reproduce the new weights bit for bit; the packed
    tiles are exactly the tiles with a changed (gate-view) element, sorted."""
    sizes = [BLOCK + 77, 5, 1000, 64]
    params = [_random(n, dtype, 0.05, 20 + i) for i, n in enumerate(sizes)]
    grads = [_random(n, torch.float32, 2e-4, 30 + i) for i, n in enumerate(sizes)]
    replicas = [p.clone() for p in params]
    report = _step_report(params, grads, tile_size=tile_size, count_tiles=True)
    packed = pack_changed_tiles(params, report)
    for param, replica, result, (tile_ids, values) in zip(params, replicas, report.tensors, packed, strict=True):
        changed = (_gate_bits(replica) != _gate_bits(param)).cpu()
        padded = torch.zeros(num_tiles(param.numel(), tile_size) * tile_size, dtype=torch.bool)
        padded[: param.numel()] = changed
        expected_ids = padded.view(-1, tile_size).any(dim=1).nonzero().reshape(-1)
        assert torch.equal(tile_ids.cpu(), expected_ids)
        assert torch.equal(result.tile_changed.cpu(), padded.view(-1, tile_size).sum(dim=1, dtype=torch.int32))
        stale = replica.clone()
        packed_tiles = PackedTiles(tile_ids, values, param.numel(), tuple(param.shape), tile_size)
        apply_tiles(replica, packed_tiles, backend="triton")
        if dtype != torch.float32:  # fp32 weights can change below the bf16 gate view: not packed
            _assert_same_bits(replica, param)
        outside = torch.ones(num_tiles(param.numel(), tile_size), dtype=torch.bool)
        outside[expected_ids] = False
        untouched = outside.repeat_interleave(tile_size)[: param.numel()].to(DEVICE)
        _assert_same_bits(replica[untouched], stale[untouched])
    assert sum(ids.numel() for ids, _ in packed) > 0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy inside the interpreter
def test_nonfinite_gradients_behave_as_the_reference():
    """NaN and inf gradients: the kernel writes what the reference writes (NaN weights where the
    update is NaN or inf - inf, inf where it overflows); the tracker counts and warns about them."""
    grad = _random(300, torch.float32, 0.01, 5)
    grad[::7] = float("nan")
    grad[1::11] = float("inf")
    grad[2::13] = float("-inf")
    param = _random(300, torch.bfloat16, 0.05, 6)
    param[3::17] = float("inf")
    ref, ker, *_ = _run_both([param], [grad], lr=0.1)
    _assert_same_bits(ker[0], ref[0])
    assert torch.isnan(ker[0].float()).any() and torch.isinf(ker[0].float()).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_maximize_with_zero_gradients_keeps_torchs_signed_zeros(dtype):
    """-(+0) is -0 in torch; Triton 3.6 compiles unary minus as 0 - x (+0), so the kernel flips the
    sign bit instead. -0 and +0 weights with +-0 gradients, with momentum (a fresh fp32 buffer)."""
    param = torch.tensor([-0.0, 0.0, 0.5, -0.25] * 16).to(dtype).to(DEVICE)
    grad = torch.tensor([0.0, -0.0, 0.0, 0.125] * 16).to(dtype).to(DEVICE)
    for momentum in (0.0, 0.9):
        ref, ker, ref_buffers, ker_buffers, *_ = _run_both([param], [grad], lr=0.5, momentum=momentum, maximize=True)
        _assert_same_bits(ker[0], ref[0])
        if momentum:
            assert torch.equal(ker_buffers[0].view(torch.int32), ref_buffers[0].view(torch.int32))
            assert torch.signbit(ker_buffers[0][0::4]).all()  # -(+0) = -0


def test_non_contiguous_and_empty_and_fp64_params_take_the_reference():
    base = _random(64 * 33, torch.bfloat16, 0.05, 7).view(64, 33)
    params = [
        base.t(),
        _random(0, torch.bfloat16, 1.0, 8),
        _random(100, torch.float64, 0.05, 9),
        _random(65, torch.bfloat16, 0.05, 10).view(5, 13),
    ]
    grads = [
        _random(64 * 33, torch.bfloat16, 0.02, 11).view(33, 64),
        _random(0, torch.bfloat16, 1.0, 12),
        _random(100, torch.float64, 0.02, 13),
        _random(65, torch.bfloat16, 0.02, 14).view(13, 5).t(),
    ]
    assert not params[0].is_contiguous() and not grads[3].is_contiguous()
    ref, ker, *_ = _run_both(params, grads, lr=0.2, momentum=0.5, rounding="stochastic")
    for r, k in zip(ref, ker, strict=True):
        assert k.shape == r.shape
        _assert_same_bits(k, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_reproducible_and_unbiased(dtype):
    """Same torch seed, same bits; and E[new] = old - lr*g: updates far below half an ulp survive in
    expectation (here 1/8 ulp), where nearest rounding would swallow all of them."""
    numel = 40_000
    param = torch.full((numel,), 1.0, dtype=dtype, device=DEVICE)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    grad = torch.full((numel,), ulp / 8 / 0.5, device=DEVICE)  # lr 0.5 -> update ulp/8 downwards
    first, second, nearest = param.clone(), param.clone(), param.clone()
    torch.manual_seed(123)
    rlsgd([first], [grad], [None], lr=0.5, rounding="stochastic", backend="triton")
    torch.manual_seed(123)
    rlsgd([second], [grad], [None], lr=0.5, rounding="stochastic", backend="triton")
    rlsgd([nearest], [grad], [None], lr=0.5, backend="triton")
    assert torch.equal(first.view(torch.int16), second.view(torch.int16))
    assert torch.equal(nearest, param)
    # Below 1.0 the grid is ulp/2 apart: each element rounds down one step with probability 1/4.
    moved = (first != param).double().mean().item()
    expected, sigma = 0.25, (0.25 * 0.75 / numel) ** 0.5
    assert abs(moved - expected) < 5 * sigma
    mean_change = (first.double() - 1.0).mean().item()
    assert abs(mean_change + ulp / 8) < 5 * (ulp / 2) * sigma


@pytest.mark.parametrize("offset", [2**31 - 3, 2**31 + 3, 2**32 + 5, 2**40 + 1])
def test_random_stream_index_safe_beyond_2_31(offset):
    """The kernel's element indices are int64: a tensor whose elements sit at flat index ``offset``
    of a larger random stream (a shard) draws exactly the reference's bits there, without allocating
    2**31 elements."""
    numel = 1000
    param = _random(numel, torch.bfloat16, 0.05, 15)
    grad = _random(numel, torch.float32, 1e-3, 16)
    seed = stochastic_seed(987654, 3)
    lr, _ = _step_scalars(torch.float32, 0.1, 0.0)  # the fp32 lr the kernel uses
    expected32 = param.float() - grad * lr
    expected = stochastic_round(expected32.cpu(), torch.bfloat16, random_bits16(seed, offset, numel))
    stepped = param.clone()
    _step_report([stepped], [grad], lr=0.1, stochastic=True, seeds=[seed], stream_offsets=[offset])
    assert torch.equal(stepped.cpu().view(torch.int16), expected.view(torch.int16))
    other = random_bits16(seed, 0, numel)
    assert not torch.equal(random_bits16(seed, offset, numel), other)  # the offset matters


def test_block_plan_int64_beyond_2_31():
    """The launch tables hold int64 element offsets: a 2**33-element tensor's last block starts past
    2**32 (planned without allocating the tensor)."""
    numel = 2**33 + 5
    plan = _plan_blocks((7, numel), BLOCK, torch.device("cpu"))
    assert plan.block_start.dtype == torch.int64
    assert int(plan.block_start[-1]) == ((numel - 1) // BLOCK) * BLOCK
    assert int(plan.block_tensor[-1]) == 1 and plan.first_block == [0, 1]


def test_per_step_values_are_runtime_arguments():
    """A new lr (or decay, momentum, dampening) must not compile a new kernel: none of them is a
    tl.constexpr parameter of the step kernel, while the flags that shape the code are."""
    import inspect

    from sparse_rl_optim.kernels.rlsgd_step import rlsgd_step_kernel

    # The Python function under the JIT (or interpreter) wrapper declares which parameters are constexpr.
    parameters = inspect.signature(rlsgd_step_kernel.fn).parameters.values()
    constexpr = {param.name: "constexpr" in str(param.annotation) for param in parameters}
    for name in ("lr", "decay", "momentum", "dampening_keep"):
        assert constexpr[name] is False
    for name in ("PARAM_KIND", "STOCHASTIC", "BLOCK", "TILE"):
        assert constexpr[name] is True


# -- the optimizer and the tracker on the Triton path ------------------------------------------


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.ReLU(), torch.nn.Linear(96, 10))
    return model.to(dtype=dtype, device=DEVICE)


def _train(model, optimizer, steps: int, edit_at: int | None = None) -> None:
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        inputs = torch.randn(32, 48, generator=generator).to(dtype=next(model.parameters()).dtype, device=DEVICE)
        loss = model(inputs).float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == edit_at:
            with torch.no_grad():
                model[0].weight[0, 0] += 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_optimizer_triton_backend_equals_torch_backend(dtype, momentum):
    torch_model, triton_model = _model(dtype), _model(dtype)
    options = {"lr": 0.5, "momentum": momentum, "weight_decay": 0.01, "rounding": "stochastic"}
    torch.manual_seed(5)
    _train(torch_model, RLSGD(torch_model.parameters(), backend="torch", **options), 3)
    torch.manual_seed(5)
    _train(triton_model, RLSGD(triton_model.parameters(), backend="triton", **options), 3)
    for a, b in zip(torch_model.parameters(), triton_model.parameters(), strict=True):
        _assert_same_bits(b, a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tracker_fed_by_kernel_equals_naive_diff_and_snapshot(dtype):
    """The tracker on the Triton path (no snapshot) records what a naive bitwise diff and the
    snapshot-based tracker on the torch path record, step by step."""
    records = {}
    for backend in ("torch", "triton"):
        model = _model(dtype)
        optimizer = RLSGD(model.parameters(), lr=0.5, backend=backend)
        tracker = PrecisionGateTracker(model).attach(optimizer)
        naive: list[dict[str, int]] = []
        reference = {n: p.detach().to(torch.bfloat16).view(torch.int16).clone() for n, p in model.named_parameters()}

        def diff_before(opt, args, kwargs, model=model):
            opt._naive_before = {
                n: p.detach().to(torch.bfloat16).view(torch.int16).clone() for n, p in model.named_parameters()
            }

        def diff_after(opt, args, kwargs, model=model, naive=naive, reference=reference):
            now = {n: p.detach().to(torch.bfloat16).view(torch.int16) for n, p in model.named_parameters()}
            naive.append(
                {
                    "per_param": {n: int((opt._naive_before[n] != now[n]).sum()) for n in now},
                    "cumulative": sum(int((reference[n] != now[n]).sum()) for n in now),
                }
            )

        optimizer.register_step_pre_hook(diff_before)
        optimizer.register_step_post_hook(diff_after)
        _train(model, optimizer, 4)
        for record, expected in zip(tracker.history, naive, strict=True):
            assert record["per_param"] == expected["per_param"]
            assert record["changed"] == sum(expected["per_param"].values())
            assert record["cumulative_changed"] == expected["cumulative"]
            assert record["intended"] > 0 and 0 < record["changed"] < record["total"]
        if backend == "triton":
            assert tracker.memory_bytes()["step_snapshot_bytes"] == 0  # fed by the kernel
        else:
            assert tracker.memory_bytes()["step_snapshot_bytes"] > 0
        records[backend] = [{k: v for k, v in r.items()} for r in tracker.history]
    assert records["torch"] == records["triton"]


def test_tracker_on_kernel_path_catches_edits_outside_the_step():
    model = _model(torch.bfloat16)
    optimizer = RLSGD(model.parameters(), lr=0.5, backend="triton")
    tracker = PrecisionGateTracker(model).attach(optimizer)
    with pytest.warns(RuntimeWarning, match="outside optimizer.step"):
        _train(model, optimizer, 3, edit_at=0)
    assert tracker.history[1]["changed_outside_step"] == ["0.weight"]
    assert tracker.history[0]["changed_outside_step"] == tracker.history[2]["changed_outside_step"] == []


def test_backend_errors(monkeypatch):
    param = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="backend"):
        RLSGD([param], lr=0.1, backend="cuda")
    if DEVICE == "cpu":
        import sparse_rl_optim.kernels.launch as launch

        # As if the kernels had been imported without TRITON_INTERPRET=1 (Triton reads it then).
        monkeypatch.setattr(launch, "_INTERPRETING", False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            RLSGD([param], lr=0.1, backend="triton")
        param.grad = torch.ones_like(param)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            rlsgd([param], [param.grad], [None], lr=0.1, backend="triton")
        # auto stays on torch for CPU tensors, whatever the interpreter setting
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            RLSGD([param], lr=0.1, backend="auto").step()


def test_interpreter_is_what_runs_here():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"


def test_pack_changed_tiles_with_empty_tensors_anywhere():
    """Empty tensors (first, middle, last) own no tiles; every other tensor gets its own tiles."""
    sizes = [0, 1000, 0, 300, 0]
    params = [_random(n, torch.bfloat16, 0.05, 40 + i) for i, n in enumerate(sizes)]
    grads = [_random(n, torch.float32, 2e-4, 50 + i) for i, n in enumerate(sizes)]
    replicas = [p.clone() for p in params]
    report = _step_report(params, grads, count_tiles=True)
    packed = pack_changed_tiles(params, report)
    for param, replica, (tile_ids, values) in zip(params, replicas, packed, strict=True):
        assert tile_ids.numel() == values.shape[0] <= num_tiles(param.numel(), 64)
        apply_tiles(replica, PackedTiles(tile_ids, values, param.numel(), tuple(param.shape), 64), backend="triton")
        _assert_same_bits(replica, param)
    assert packed[1][0].numel() > 0 and packed[3][0].numel() > 0
    with pytest.raises(ValueError, match="count_tiles"):
        pack_changed_tiles(params, _step_report(params, grads))
    with pytest.raises(ValueError, match="in its order"):
        pack_changed_tiles(params[::-1], report)


def test_record_over_several_launches_equals_one(monkeypatch):
    """The tracker's record mode splits a step into launches of bounded size; the recorded changes
    are the same as in one launch."""
    import sparse_rl_optim.kernels.launch as launch

    params = [_random(n, torch.bfloat16, 0.05, 60 + i) for i, n in enumerate([3 * BLOCK + 9, 17, BLOCK])]
    grads = [_random(p.numel(), torch.float32, 2e-4, 70 + i) for i, p in enumerate(params)]
    copies = [p.clone() for p in params]
    whole = _step_report(params, grads, record=True, gate_stats=True)
    monkeypatch.setattr(launch, "_RECORD_ELEMENTS", BLOCK)
    split = _step_report(copies, grads, record=True, gate_stats=True)
    for a, b in zip(whole.tensors, split.tensors, strict=True):
        for field in ("tile_changed", "changed_indices", "old_bits", "old_checksum", "intended", "swallowed"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert sum(r.changed_indices.numel() for r in whole.tensors) > 0


def test_skipping_unchanged_writes_changes_nothing_but_traffic():
    params = [_random(BLOCK + 3, torch.bfloat16, 0.05, 80)]
    grads = [_random(BLOCK + 3, torch.float32, 2e-4, 81)]
    copy = [params[0].clone()]
    _step_report(params, grads, skip_unchanged_writes=True)
    _step_report(copy, grads, skip_unchanged_writes=False)
    _assert_same_bits(params[0], copy[0])


def test_mismatched_grad_size_is_torch_s_error():
    param = _random(100, torch.bfloat16, 0.05, 90)
    with pytest.raises(RuntimeError):
        rlsgd([param], [_random(10, torch.bfloat16, 0.02, 91)], [None], lr=0.1, backend="triton")


def test_tracker_kernel_fed_with_params_without_grads_and_edits():
    """A param without a gradient is snapshotted (the kernel does not see it): edits to it between
    steps are reported at the next step, as on the torch backend."""
    histories = {}
    for backend in ("torch", "triton"):
        model = _model(torch.bfloat16)
        optimizer = RLSGD(model.parameters(), lr=0.5, backend=backend)
        tracker = PrecisionGateTracker(model).attach(optimizer)
        generator = torch.Generator().manual_seed(2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for step in range(4):
                inputs = torch.randn(8, 48, generator=generator).to(torch.bfloat16).to(DEVICE)
                model(inputs).float().pow(2).mean().backward()
                if step in (1, 2):
                    model[2].weight.grad = None  # no gradient this step
                optimizer.step()
                optimizer.zero_grad()
                if step in (0, 1):
                    with torch.no_grad():
                        model[2].weight[0, 0] += 1.0
        histories[backend] = tracker.history
    assert histories["torch"] == histories["triton"]
    assert [r["changed_outside_step"] for r in histories["triton"]] == [[], ["2.weight"], ["2.weight"], []]
