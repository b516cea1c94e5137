"""The compiled RLSGD step (``_compiled_rlsgd``) against the single-tensor reference, bit for bit.

Each new layout (dtypes, flags, shapes) costs a compile of a few seconds, so the examples are few.
Throughout, dynamo may compile each code object once only and fails loudly past that (see
``strict_dynamo``): a kernel that recompiled, or ran uncompiled past the recompile limit, fails the
test instead of passing through the foreach fallback."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from sparse_rl_optim.optim import _compiled
from sparse_rl_optim.optim._compiled import _compiled_rlsgd
from sparse_rl_optim.optim.sgd import _single_tensor_rlsgd

# Importing inductor trips torch's own deprecation notice.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True, scope="module")
def strict_dynamo():
    """One graph per code object, and an error instead of a silent eager fallback past it; every
    test must end with the compiled path still in use (a compile error falls back to foreach)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch._dynamo.config, "recompile_limit", 1)
        patch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
        yield


@pytest.fixture(autouse=True)
def compiled_path_stays():
    yield
    assert not _compiled._compile_failed, "torch.compile failed or recompiled: the step fell back to foreach"


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_same(actual: torch.Tensor | None, expected: torch.Tensor | None) -> None:
    """Bitwise equal, except that any NaN equals any NaN (payloads are unspecified)."""
    if expected is None:
        assert actual is None
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    int_dtype = _INT_OF_SIZE[expected.element_size()]
    a, b = actual.detach().contiguous(), expected.detach().contiguous()
    same = (a.view(int_dtype) == b.view(int_dtype)) | (a.isnan() & b.isnan())
    assert same.all(), f"{int((~same).sum())} of {same.numel()} elements differ"


def run_both(initial, grads_per_step, lrs, step_seeds, initial_buffers=None, **options):
    """Run the reference and the compiled path on copies of ``initial`` (and of ``initial_buffers``,
    default none); compare after every step."""
    results = {}
    for name, fn in (("reference", _single_tensor_rlsgd), ("compiled", _compiled_rlsgd)):
        params = [copy.deepcopy(p) for p in initial]  # keeps strides and type: a Parameter stays one
        buffers = [None if b is None else b.clone() for b in initial_buffers or [None] * len(params)]
        history = []
        for grads, lr, step_seed in zip(grads_per_step, lrs, step_seeds, strict=True):
            stats = fn(params, grads, buffers, lr=lr, step_seed=step_seed, **options)
            counts = None if stats is None else [(int(s.intended), int(s.swallowed)) for s in stats]
            history.append(([p.clone() for p in params], [None if b is None else b.clone() for b in buffers], counts))
        results[name] = history
    for step, (ref, got) in enumerate(zip(results["reference"], results["compiled"], strict=True)):
        for expected, actual in zip(ref[0], got[0], strict=True):
            assert_same(actual, expected)
        for expected, actual in zip(ref[1], got[1], strict=True):
            assert_same(actual, expected)
        assert got[2] == ref[2], f"gate stats differ at step {step}"
    return results["compiled"]


def random_inputs(dtype, shape, seed, grad_scale, specials):
    """Params of a few shapes (one non-contiguous, one empty, one of one element) and a few steps of
    gradients, random (never all zero); ``specials`` puts NaN, +-inf and +-0 into the gradients."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [shape, (shape[0] * shape[1] + 2,), (shape[1], shape[0]), (0,), (3, 0), (1,)]
    params = [(0.05 * torch.randn(s, generator=generator)).to(dtype) for s in shapes]
    params[2] = params[2].t()  # non-contiguous
    steps = []
    for _ in range(3):
        grads = [(grad_scale * torch.randn(p.shape, generator=generator)).to(dtype) for p in params]
        if specials:
            grads[0].view(-1)[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
        steps.append([g if i != 2 else g.t().contiguous().t() for i, g in enumerate(grads)])
    return params, steps


@settings(max_examples=4)
@given(
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float64]),
    shape=st.tuples(st.integers(2, 45), st.integers(2, 45)),
    lr=st.floats(1e-3, 4.0, allow_nan=False),
    momentum=st.sampled_from([0.0, 0.9]),
    nesterov=st.booleans(),
    dampening=st.sampled_from([0.0, 0.25]),
    weight_decay=st.sampled_from([0.0, 0.01, 0.1]),
    maximize=st.booleans(),
    rounding=st.sampled_from(["nearest", "stochastic"]),
    collect_gate_stats=st.booleans(),
    grad_scale=st.sampled_from([1e-4, 1e-2, 1.0]),
    specials=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
# The fp16 stochastic rounding (a workaround for inductor's fp16 nextafter) and bf16 stochastic
# rounding, with every momentum option, decay, maximize, stats and NaN/inf gradients.
@example(
    dtype=torch.float16,
    shape=(33, 7),
    lr=0.37,
    momentum=0.9,
    nesterov=True,
    dampening=0.0,
    weight_decay=0.1,
    maximize=False,
    rounding="stochastic",
    collect_gate_stats=True,
    grad_scale=1e-2,
    specials=True,
    seed=1,
)
@example(
    dtype=torch.bfloat16,
    shape=(17, 31),
    lr=0.1,
    momentum=0.9,
    nesterov=False,
    dampening=0.25,
    weight_decay=0.01,
    maximize=True,
    rounding="stochastic",
    collect_gate_stats=True,
    grad_scale=1e-2,
    specials=True,
    seed=2,
)
def test_compiled_bit_equal_to_reference(
    dtype,
    shape,
    lr,
    momentum,
    nesterov,
    dampening,
    weight_decay,
    maximize,
    rounding,
    collect_gate_stats,
    grad_scale,
    specials,
    seed,
):
    nesterov = nesterov and momentum != 0
    dampening = 0.0 if nesterov else dampening
    params, steps = random_inputs(dtype, shape, seed, grad_scale, specials)
    run_both(
        params,
        steps,
        lrs=[lr, lr, lr * 0.5],
        step_seeds=[seed % 1000, 7, 2**31 - 1],
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        maximize=maximize,
        rounding=rounding,
        collect_gate_stats=collect_gate_stats,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_bit_pattern(dtype):
    """Every non-NaN param value (subnormals, +-0, the largest finite values, +-inf) with NaN, inf,
    +-0, subnormal and ordinary gradients; stochastic rounding and gate stats."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    param = patterns[~patterns.isnan()]
    generator = torch.Generator().manual_seed(3)
    magnitude = torch.exp2(torch.randint(-30, 3, param.shape, generator=generator).float())
    grad = (magnitude * torch.randn(param.shape, generator=generator)).to(dtype)
    grad[:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-40, 1e-30])
    grad = grad[torch.randperm(grad.numel(), generator=generator)]
    run_both(
        [param],
        [[grad]],
        lrs=[0.3],
        step_seeds=[12345],
        momentum=0.0,
        dampening=0.0,
        nesterov=False,
        weight_decay=0.0,
        maximize=False,
        rounding="stochastic",
        collect_gate_stats=True,
    )


def test_one_compiled_call_per_group(monkeypatch):
    """Tensors grouped by param dtype, grad dtype and momentum mode (first step or running buffer),
    in any order, odd ones to the reference: one kernel call per group, and each tensor keeps its
    own random stream (its index in the step)."""
    calls = []
    kernel = _compiled._kernel
    monkeypatch.setattr(_compiled, "_kernel", lambda key: calls.append(key) or kernel(key))
    generator = torch.Generator().manual_seed(6)

    def randn(shape, scale, dtype):
        return (scale * torch.randn(shape, generator=generator)).to(dtype)

    bf16, fp32 = torch.bfloat16, torch.float32
    # (shape, param dtype, grad dtype, has a buffer); the fourth is made non-contiguous below.
    layout = [((8, 16), bf16, bf16, False), ((5, 7), bf16, bf16, True), ((33,), bf16, fp32, False)]
    layout += [((4, 9), bf16, bf16, False), ((6, 6), fp32, fp32, True), ((1,), bf16, bf16, False)]
    layout += [((3, 3), bf16, bf16, False)]
    params = [randn(shape, 0.05, dtype) for shape, dtype, _, _ in layout]
    params[3] = params[3].t().contiguous().t()
    grads = [randn(shape, 0.03, grad_dtype) for shape, _, grad_dtype, _ in layout]
    buffers = [randn(shape, 0.01, fp32) if has_buffer else None for shape, _, _, has_buffer in layout]
    run_both(
        params,
        [grads],
        lrs=[0.3],
        step_seeds=[99],
        initial_buffers=buffers,
        momentum=0.9,
        dampening=0.0,
        nesterov=True,
        weight_decay=0.01,
        maximize=False,
        rounding="stochastic",
        collect_gate_stats=True,
    )
    # (bf16, bf16, first): tensors 0 and 6; (bf16, bf16, running): 1; (bf16, fp32, first): 2;
    # (fp32, fp32, running): 4. Tensors 3 (non-contiguous) and 5 (one element) took the reference.
    assert sorted(len(key[-1]) for key in calls) == [1, 1, 1, 2]


def test_same_layout_steps_without_compiling():
    """A new lr, weight decay, seed or grad mode reuses the layout's kernel; a new layout (shapes, list
    length, Parameter instead of Tensor) compiles one kernel of its own, and the first layout's still
    serves it."""
    options = dict(
        momentum=0.0,
        dampening=0.0,
        nesterov=False,
        maximize=False,
        rounding="stochastic",
        collect_gate_stats=False,
    )
    generator = torch.Generator().manual_seed(4)

    def inputs(shapes, kind=torch.Tensor):
        params = [kind((0.05 * torch.randn(s, generator=generator)).to(torch.bfloat16)) for s in shapes]
        return params, [[(0.03 * torch.randn(s, generator=generator)).to(torch.bfloat16) for s in shapes]]

    def compiles(shapes, lr, weight_decay, seed, kind=torch.Tensor):
        """(graphs, kernels) compiled by one step of a fresh model of ``shapes``."""
        graphs, kernels = counters["stats"]["unique_graphs"], len(_compiled._KERNELS)
        params, grads = inputs(shapes, kind)
        run_both(params, grads, lrs=[lr], step_seeds=[seed], weight_decay=weight_decay, **options)
        return counters["stats"]["unique_graphs"] - graphs, len(_compiled._KERNELS) - kernels

    first = [(40, 33), (7,)]
    compiles(first, 0.1, 0.1, 0)  # compiles unless an earlier test did
    assert compiles(first, 0.2, 0.1, 1) == (0, 0)
    assert compiles(first, 1.5, 0.5, 2**31 - 1) == (0, 0)
    with torch.no_grad():  # as in an optimizer's step
        assert compiles(first, 0.37, 0.01, 5) == (0, 0)
        assert compiles(first, 0.3, 0.1, 3, torch.nn.Parameter) == (1, 1)
    assert compiles([(7, 9), (40,)], 0.3, 0.1, 3) == (1, 1)
    assert compiles([(7, 9), (40,), (3, 5)], 0.3, 0.1, 3) == (1, 1)
    assert compiles(first, 0.25, 0.2, 4) == (0, 0)


def test_compile_failure_warns_once_and_falls_back_to_foreach(monkeypatch):
    def broken_compile(fn, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("no working C++ compiler")

        return fail

    foreach_calls = []
    multi_tensor = _compiled._multi_tensor_rlsgd

    def counting_multi_tensor(*args, **kwargs):
        foreach_calls.append(1)
        return multi_tensor(*args, **kwargs)

    monkeypatch.setattr(_compiled, "_KERNELS", {})
    monkeypatch.setattr(_compiled, "_compile_failed", False)
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(_compiled, "_multi_tensor_rlsgd", counting_multi_tensor)

    generator = torch.Generator().manual_seed(5)
    initial = [(0.05 * torch.randn(s, generator=generator)).to(torch.bfloat16) for s in [(1,), (9, 4), (6,)]]
    steps = [[(0.05 * torch.randn(p.shape, generator=generator)).to(p.dtype) for p in initial] for _ in range(2)]
    options = dict(
        momentum=0.9,
        dampening=0.0,
        nesterov=False,
        weight_decay=0.0,
        maximize=False,
        rounding="stochastic",
        collect_gate_stats=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_both(initial, steps, lrs=[0.3, 0.2], step_seeds=[1, 2], **options)
    assert [str(w.message) for w in caught if "torch.compile failed" in str(w.message)] == [
        "RLSGD: torch.compile failed (RuntimeError: no working C++ compiler); using the foreach path instead."
    ]
    assert _compiled._compile_failed
    assert len(foreach_calls) == 1  # the second step


def test_size_one_dimensions_with_other_strides_share_a_kernel():
    """``is_contiguous()`` ignores the strides of size-1 dimensions, dynamo's guards do not: such
    tensors get their own kernel instead of recompiling one (which strict_dynamo would turn into an
    error), and every variant stays bit-equal."""
    base = torch.randn(7, 5).to(torch.bfloat16)
    variants = [base[:1].clone(), base[:1], torch.randn(5, 1).to(torch.bfloat16).t()]
    assert all(v.is_contiguous() and v.shape == (1, 5) for v in variants)
    assert len({v.stride() for v in variants}) > 1
    for variant in variants:
        param = variant.clone() if variant.stride() == (5, 1) else variant
        expected = param.clone()
        grad = torch.randn(1, 5).to(torch.bfloat16)
        _single_tensor_rlsgd([expected], [grad], [None], **_NEAREST)
        _compiled_rlsgd([param], [grad], [None], **_NEAREST)
        assert_same(param, expected)


_NEAREST = dict(
    lr=0.5,
    momentum=0.0,
    dampening=0.0,
    nesterov=False,
    weight_decay=0.0,
    maximize=False,
    rounding="nearest",
    step_seed=0,
    collect_gate_stats=False,
)


def test_fused_and_foreach_together_rejected_in_any_group():
    from sparse_rl_optim import RLSGD

    first, second = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    optimizer = RLSGD([first], lr=0.1)
    with pytest.raises(ValueError, match="fused"):
        optimizer.add_param_group({"params": [second], "fused": True, "foreach": True})
    assert len(optimizer.param_groups) == 1


def test_stochastic_seed_is_drawn_eagerly_under_torch_compile():
    """``torch.compile(optimizer.step)`` draws the step's stochastic-rounding seed from torch's
    default generator, as eager code does (inductor would otherwise draw it from its own)."""
    from sparse_rl_optim.optim.sgd import _draw_step_seed

    torch.manual_seed(5)
    eager = [_draw_step_seed(), _draw_step_seed()]
    torch.manual_seed(5)
    compiled = torch.compile(lambda: [_draw_step_seed(), _draw_step_seed()], backend="inductor")()
    assert compiled == eager
