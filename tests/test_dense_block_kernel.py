"""The fused dense-block kernel (``backend="triton"``) against the torch reference, bit for bit.

``dense_block_adamw`` / ``dense_block_sgd`` are called through the public functional with
``backend="triton"`` and with ``backend="torch"`` (the ``_single_tensor_*`` references) on copies of
the same inputs. Without a GPU the kernel runs in Triton's interpreter on CPU tensors
(tests/conftest.py sets ``TRITON_INTERPRET=1``); with one, on CUDA tensors.

Bit patterns are compared exactly, with one exception: where a value is NaN on both paths its
payload is not compared (same NaN positions are required). The paths cannot agree on NaN payloads:
torch's CPU fp32 -> bf16 conversion writes 0xFFFF for a NaN, the kernel the canonical 0x7FC0 (as
:func:`sparse_rl_optim.bf16.gate_view_bits` does), and a GPU's ``inf - inf`` is 0x7FFFFFFF where an
x86 CPU's is 0xFFC00000.

In the interpreter a program handles ``block_size(tile) // tile`` rows (512 at 32-element tiles),
more than these small tensors have, so the tests also draw a few rows per program (patching
``block_size``): then most programs take the kernel's unmasked path of whole tiles.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_rl_optim.kernels.launch as launch
from sparse_rl_optim.optim.dense_block_functional import dense_block_adamw, dense_block_sgd
from sparse_rl_optim.tiles import num_tiles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
INT_VIEW = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.int32: torch.int32,
    torch.int64: torch.int64,
}
SIZES = [1, 63, 64, 65, 100, 257, 1000, 4100]
STEPS = 3


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same dtype, shape and bit patterns; NaN where the other is NaN (payload not compared)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    actual, expected = actual.detach().cpu().contiguous(), expected.detach().cpu().contiguous()
    nan_actual, nan_expected = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_actual, nan_expected), f"{what}: NaN at different places"
    actual_bits = actual.view(INT_VIEW[actual.dtype])[~nan_actual]
    expected_bits = expected.view(INT_VIEW[expected.dtype])[~nan_expected]
    differ = int((actual_bits != expected_bits).sum())
    assert torch.equal(actual_bits, expected_bits), f"{what}: {differ} of {actual.numel()} elements differ"


def _random(shape, dtype: torch.dtype, scale: float, seed: int) -> torch.Tensor:
    """Normal values, never zero (after rounding to ``dtype``)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    values = torch.where(values.abs() < scale * 1e-3, scale * 1e-3, values)
    return values.to(dtype).to(DEVICE)


@dataclass
class Problem:
    """Per tensor: param, the gradients of each step, tile ids, tile steps, state rows 1 and 2."""

    params: list[torch.Tensor]
    grads: list[list[torch.Tensor]]  # [step][tensor]
    tile_ids: list[torch.Tensor]
    tile_steps: list[torch.Tensor | None]
    state1: list[torch.Tensor | None]
    state2: list[torch.Tensor | None]

    def clone(self) -> Problem:
        def copy(values):
            return [None if v is None else v.clone() for v in values]

        return Problem(
            copy(self.params),
            self.grads,
            copy(self.tile_ids),
            copy(self.tile_steps),
            copy(self.state1),
            copy(self.state2),
        )


def _problem(
    layout: list[tuple[int, list[int], list[int]]],
    dtype: torch.dtype,
    grad_dtype: torch.dtype,
    tile_size: int,
    seed: int,
    *,
    state2: bool = True,
    fresh_garbage: bool = False,
) -> Problem:
    """``layout``: per tensor ``(numel, active tile ids, their step counts)``. State rows hold random
    values; with ``fresh_garbage`` the rows of fresh tiles (step 0) hold NaN (SGD must ignore them)."""
    params, ids, steps, rows1, rows2 = [], [], [], [], []
    for index, (numel, active, counts) in enumerate(layout):
        base = seed + 1000 * index
        params.append(_random(numel, dtype, 0.05, base))
        ids.append(torch.tensor(active, dtype=torch.int64, device=DEVICE))
        steps.append(torch.tensor(counts, dtype=torch.int32, device=DEVICE))
        first = _random((len(active), tile_size), torch.float32, 0.01, base + 1)
        if fresh_garbage:
            first[steps[-1] == 0] = float("nan")
        rows1.append(first)
        rows2.append(_random((len(active), tile_size), torch.float32, 1e-3, base + 2).square() if state2 else None)
    grads = [
        [
            _random(numel, grad_dtype, 0.02, seed + 1000 * index + 10 + step)
            for index, (numel, _, _) in enumerate(layout)
        ]
        for step in range(STEPS)
    ]
    return Problem(params, grads, ids, steps, rows1, rows2)


@contextmanager
def _kernel_spy(rows_per_program: int | None):
    """Count the tensors the kernel launcher gets; optionally ``rows_per_program`` rows per program."""
    seen: list[int] = []
    launcher = launch.dense_block_step_triton

    def spy(params, *args, **kwargs):
        seen.extend(p.data_ptr() for p, ids in zip(params, args[1], strict=True) if ids.numel())
        return launcher(params, *args, **kwargs)

    with mock.patch.object(launch, "dense_block_step_triton", spy):
        if rows_per_program is None:
            yield seen
        else:
            with mock.patch.object(launch, "block_size", lambda tile_size: rows_per_program * tile_size):
                yield seen


def _adamw(problem: Problem, step: int, backend: str, **options) -> None:
    max_step = max((int(s.max()) for s in problem.tile_steps if s.numel()), default=0) + 1
    dense_block_adamw(
        problem.params,
        problem.grads[step],
        problem.tile_ids,
        problem.tile_steps,
        problem.state1,
        problem.state2,
        max_step=max_step,
        backend=backend,
        **options,
    )


def _sgd(problem: Problem, step: int, backend: str, **options) -> None:
    dense_block_sgd(
        problem.params,
        problem.grads[step],
        problem.tile_ids,
        problem.tile_steps,
        problem.state1,
        backend=backend,
        **options,
    )


def _run_both(update, problem: Problem, rows_per_program: int | None = None, **options):
    """``STEPS`` steps through the reference and through the kernel; both problems afterwards, and
    the data pointers of the tensors the kernel launcher was given."""
    reference, kernel = problem.clone(), problem.clone()
    with _kernel_spy(rows_per_program) as launched:
        for step in range(STEPS):
            update(reference, step, "torch", **options)
            update(kernel, step, "triton", **options)
    return reference, kernel, launched


def _assert_same_problem(kernel: Problem, reference: Problem, original: Problem, tile_size: int) -> None:
    for index, (param, expected) in enumerate(zip(kernel.params, reference.params, strict=True)):
        _assert_same_bits(param, expected, f"param {index}")
        # Elements outside the active tiles keep their bits.
        inside = torch.zeros(num_tiles(param.numel(), tile_size) * tile_size, dtype=torch.bool, device=DEVICE)
        for tile in original.tile_ids[index].tolist():
            inside[tile * tile_size : (tile + 1) * tile_size] = True
        outside = ~inside[: param.numel()].view(param.shape)
        _assert_same_bits(param[outside], original.params[index][outside], f"param {index} outside the tiles")
    for name in ("tile_steps", "state1", "state2"):
        for index, (value, expected) in enumerate(zip(getattr(kernel, name), getattr(reference, name), strict=True)):
            if expected is None:
                assert value is None
            else:
                _assert_same_bits(value, expected, f"{name} {index}")


@st.composite
def layouts(draw):
    """``(tile_size, [(numel, sorted active tile ids, their step counts)], rows per program)``: random
    subsets of the tiles (empty sets included, the partial last tile often), fresh tiles (step 0)
    next to old ones."""
    tile_size = draw(st.sampled_from([32, 64, 256]))
    layout = []
    for numel in draw(st.lists(st.sampled_from(SIZES), min_size=1, max_size=3)):
        n_tiles = num_tiles(numel, tile_size)
        active = set(draw(st.lists(st.integers(0, n_tiles - 1), max_size=n_tiles, unique=True)))
        if draw(st.booleans()):
            active.add(n_tiles - 1)
        counts = draw(st.lists(st.integers(0, 4), min_size=len(active), max_size=len(active)))
        layout.append((numel, sorted(active), counts))
    rows_per_program = draw(st.sampled_from([None, 1, 2, 4]))
    return tile_size, layout, rows_per_program


def _kernel_tensors(problem: Problem) -> list[int]:
    return sorted(p.data_ptr() for p, ids in zip(problem.params, problem.tile_ids, strict=True) if ids.numel())


@settings(max_examples=25)
@given(
    shape=layouts(),
    dtype=st.sampled_from(DTYPES),
    grad_same=st.booleans(),
    lr=st.floats(1e-4, 0.3),
    betas=st.sampled_from([(0.9, 0.999), (0.8, 0.95), (0.5, 0.7)]),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
    weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
    maximize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_adamw_kernel_bit_exact_against_reference(
    shape, dtype, grad_same, lr, betas, eps, weight_decay, maximize, seed
):
    """Three AdamW steps, several tensors per launch: weights, both moments and tile steps equal the
    reference bit for bit; each tile gets the bias correction of its own step count; elements
    outside the active tiles keep their bits; every tensor with active tiles went to the kernel."""
    tile_size, layout, rows_per_program = shape
    grad_dtype = dtype if grad_same else torch.float32
    problem = _problem(layout, dtype, grad_dtype, tile_size, seed)
    options = dict(
        lr=lr,
        beta1=betas[0],
        beta2=betas[1],
        eps=eps,
        weight_decay=weight_decay,
        maximize=maximize,
        tile_size=tile_size,
    )
    reference, kernel, launched = _run_both(_adamw, problem, rows_per_program, **options)
    _assert_same_problem(kernel, reference, problem, tile_size)
    assert sorted(launched) == sorted(_kernel_tensors(kernel) * STEPS)


@settings(max_examples=25)
@given(
    shape=layouts(),
    dtype=st.sampled_from(DTYPES),
    grad_same=st.booleans(),
    lr=st.floats(1e-3, 1.0),
    momentum=st.sampled_from([0.0, 0.9]),
    dampening=st.sampled_from([0.0, 0.25]),
    nesterov=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
    maximize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sgd_kernel_bit_exact_against_reference(
    shape, dtype, grad_same, lr, momentum, dampening, nesterov, weight_decay, maximize, seed
):
    """Three SGD steps with and without momentum (nesterov, dampening): weights, momentum rows and
    tile steps equal the reference; a fresh tile's row (NaN garbage here) is replaced by its
    gradient, not mixed in; without momentum no state is touched."""
    tile_size, layout, rows_per_program = shape
    grad_dtype = dtype if grad_same else torch.float32
    problem = _problem(layout, dtype, grad_dtype, tile_size, seed, state2=False, fresh_garbage=True)
    if momentum == 0:
        problem.tile_steps = [None] * len(layout)
        problem.state1 = [None] * len(layout)
    options = dict(
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov and momentum != 0,
        weight_decay=weight_decay,
        maximize=maximize,
        tile_size=tile_size,
    )
    reference, kernel, launched = _run_both(_sgd, problem, rows_per_program, **options)
    _assert_same_problem(kernel, reference, problem, tile_size)
    assert sorted(launched) == sorted(_kernel_tensors(kernel) * STEPS)
    if momentum:
        for rows in kernel.state1:
            assert not torch.isnan(rows).any()  # the fresh rows' garbage is gone


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("algorithm", ["adamw", "sgd"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy inside the interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_nonfinite_gradients_behave_as_the_reference(dtype, algorithm):
    """NaN, +inf and -inf gradients and inf weights: NaN and inf land where the reference puts them,
    in the weights and in the state rows; finite values keep equal bits."""
    tile_size = 64
    layout = [(300, [0, 2, 4], [0, 3, 1]), (65, [0, 1], [2, 0])]
    problem = _problem(layout, dtype, torch.float32, tile_size, 7, state2=algorithm == "adamw")
    for grads in problem.grads:
        grads[0][::7] = float("nan")
        grads[0][1::11] = float("inf")
        grads[0][2::13] = float("-inf")
        grads[1][64] = float("inf")
    problem.params[0][3::17] = float("inf")
    if algorithm == "adamw":
        update, options = _adamw, dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    else:
        update, options = _sgd, dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.1)
    reference, kernel, _ = _run_both(update, problem, maximize=False, tile_size=tile_size, **options)
    _assert_same_problem(kernel, reference, problem, tile_size)
    assert torch.isnan(kernel.params[0].float()).any() and torch.isinf(kernel.params[0].float()).any()
    assert torch.isnan(kernel.state1[0]).any()


def test_tensors_the_kernel_does_not_take_run_the_reference():
    """fp64 params or grads, non-contiguous params or grads, state rows that are not contiguous fp32
    and int64 step counts take the reference (one tensor at a time) in the same call as tensors the
    kernel takes (bf16 weights with fp32 and with fp16 gradients: two launches); everything equals
    the reference."""
    tile_size = 32
    layout = [(2112, [0, 5, 65], [0, 2, 1])] * 9
    problem = _problem(layout, torch.bfloat16, torch.bfloat16, tile_size, 11)
    problem.params[0] = problem.params[0].double()
    problem.grads = [list(grads) for grads in problem.grads]
    for step, grads in enumerate(problem.grads):
        grads[0] = grads[0].double()
        grads[1] = grads[1].double()
        grads[2] = grads[2].view(33, 64)
        grads[3] = _random((33, 64), torch.bfloat16, 0.02, 50 + step).t()
        grads[7] = grads[7].float()
        grads[8] = grads[8].half()
    problem.params[2] = problem.params[2].view(64, 33).t()  # non-contiguous, shape (33, 64)
    problem.params[3] = problem.params[3].view(64, 33)
    problem.state1[4] = _random((tile_size, 3), torch.float32, 0.01, 60).t()  # clones keep the strides
    problem.state2[5] = problem.state2[5].double()
    problem.tile_steps[6] = problem.tile_steps[6].long()
    assert not problem.params[2].is_contiguous() and not problem.grads[0][3].is_contiguous()
    assert not problem.clone().state1[4].is_contiguous()
    options = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=False, tile_size=tile_size)
    reference, kernel, launched = _run_both(_adamw, problem, **options)
    _assert_same_problem(kernel, reference, problem, tile_size)
    assert sorted(launched) == sorted([kernel.params[7].data_ptr(), kernel.params[8].data_ptr()] * STEPS)


def test_no_active_tiles_changes_nothing_and_launches_nothing():
    tile_size = 64
    problem = _problem([(100, [], []), (1, [], [])], torch.bfloat16, torch.float32, tile_size, 3)
    for update, options in (
        (_adamw, dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)),
        (_sgd, dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False)),
    ):
        reference, kernel, launched = _run_both(
            update, problem, weight_decay=0.1, maximize=False, tile_size=tile_size, **options
        )
        _assert_same_problem(kernel, reference, problem, tile_size)
        _assert_same_problem(kernel, problem, problem, tile_size)
        assert launched == []


def test_default_rows_per_program_full_and_masked_programs():
    """With the default rows per program (512 at 32-element tiles in the interpreter), a tensor with
    more active tiles than that (every other tile, so row and tile differ, and the partial last
    tile): its first program takes the unmasked path, its last the masked one."""
    tile_size = 32
    numel = 1401 * tile_size - 5
    active = list(range(0, 1401, 2))
    assert launch.block_size(tile_size) // tile_size < len(active)
    layout = [(numel, active, [i % 3 for i in range(len(active))]), (65, [2], [0])]
    problem = _problem(layout, torch.bfloat16, torch.bfloat16, tile_size, 5)
    options = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, maximize=True, tile_size=tile_size)
    reference, kernel, launched = _run_both(_adamw, problem, **options)
    _assert_same_problem(kernel, reference, problem, tile_size)
    assert len(launched) == 2 * STEPS


def test_per_step_values_are_runtime_arguments():
    """A new lr (or any other hyperparameter) must not compile a new kernel: none of them is a
    tl.constexpr parameter of the kernel, while the flags that shape the code are."""
    from sparse_rl_optim.kernels.dense_block_step import dense_block_step_kernel

    parameters = inspect.signature(dense_block_step_kernel.fn).parameters.values()
    constexpr = {param.name: "constexpr" in str(param.annotation) for param in parameters}
    for name in ("lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "decay", "momentum"):
        assert constexpr[name] is False, name
    assert constexpr["dampening_keep"] is False
    for name in ("ALGORITHM", "PARAM_KIND", "GRAD_KIND", "HAS_DECAY", "MAXIMIZE", "HAS_MOMENTUM", "NESTEROV"):
        assert constexpr[name] is True, name
    assert constexpr["ROWS"] is True and constexpr["TILE"] is True


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_maximize_with_zero_gradients_keeps_torchs_signed_zeros(momentum):
    """-(+0) is -0 in torch; Triton 3.6 compiles unary minus as 0 - x (+0): the kernel flips the sign
    bit instead. A -0 weight with a zero gradient, and a fresh momentum row, on both backends."""
    results = {}
    for backend in ("torch", "triton"):
        param = torch.tensor([-0.0, 0.5, 0.0, -0.25] * 8)
        grad = torch.tensor([0.0, 0.25, -0.0, 0.0] * 8)
        steps = torch.zeros(1, dtype=torch.int32) if momentum else None
        buffer = torch.full((1, 32), 3.0) if momentum else None
        dense_block_sgd(
            [param], [grad], [torch.tensor([0])], [steps], [buffer], lr=0.5, momentum=momentum, dampening=0.0,
            nesterov=False, weight_decay=0.0, maximize=True, tile_size=32, backend=backend,
        )  # fmt: skip
        results[backend] = (param.view(torch.int32), None if buffer is None else buffer.view(torch.int32))
    assert torch.equal(results["torch"][0], results["triton"][0])
    if momentum:
        assert torch.equal(results["torch"][1], results["triton"][1])
        assert (results["triton"][1][0, 0::4] == torch.tensor(-0.0).view(torch.int32)).all()  # -(+0) = -0
