"""DenseBlockAdamW / DenseBlockSGD: against torch.optim.AdamW, against formulas written out in numpy,
RLSGD and naive bitwise diffs; the memory bound; tile selection; state dicts; the tracker.

(The Triton kernel against the torch reference: tests/test_dense_block_kernel.py.)
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import adamw_tiles_bf16_bits, bf16_bits, sgd_step_bf16_bits

from sparse_rl_optim import RLSGD, DenseBlockAdamW, DenseBlockSGD, PrecisionGateTracker, optimizer_state_bytes
from sparse_rl_optim.optim.dense_block_functional import dense_block_adamw
from sparse_rl_optim.optim.tile_selection import n_active_tiles, principal_share, select_tiles, tile_grad_energy
from sparse_rl_optim.tiles import num_tiles


def _params(shapes, dtype=torch.float32, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(shape, generator=generator) * scale).to(dtype)) for shape in shapes]


def _grads(params, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    for param in params:
        param.grad = (torch.randn(param.shape, generator=generator) * scale).to(param.dtype)


def _tile_mask(tile_ids: torch.Tensor, numel: int, tile_size: int) -> torch.Tensor:
    """Naive: a flat boolean mask of the elements inside the given tiles, tile by tile."""
    mask = torch.zeros(numel, dtype=torch.bool)
    for tile in tile_ids.tolist():
        mask[tile * tile_size : (tile + 1) * tile_size] = True
    return mask


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).view(torch.int16 if tensor.element_size() == 2 else torch.int32).clone()


# -- density 1.0 is AdamW ------------------------------------------------------------------------


@settings(max_examples=10)
@given(
    lr=st.sampled_from([1e-4, 1e-3, 3e-3]),
    betas=st.sampled_from([(0.9, 0.999), (0.8, 0.95), (0.0, 0.99)]),
    eps=st.sampled_from([1e-8, 1e-6]),
    weight_decay=st.sampled_from([0.0, 0.01, 0.1]),
    maximize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_density_one_matches_torch_adamw_over_many_steps(lr, betas, eps, weight_decay, maximize, seed):
    """Stated tolerance: fp32 weights within 2e-6 relative (+1e-7 absolute) of torch.optim.AdamW after
    150 steps (the two round differently: torch lerps the first moment and takes an fp32 root)."""
    shapes = [(48, 80), (80,), (7, 9, 5)]
    ours = _params(shapes, seed=seed)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kwargs = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
    dense_block = DenseBlockAdamW(ours, density=1.0, **kwargs)
    adamw = torch.optim.AdamW(theirs, **kwargs)
    for step in range(150):
        _grads(ours, seed + step, scale=0.1)
        for mine, other in zip(ours, theirs, strict=True):
            other.grad = mine.grad.clone()
        dense_block.step()
        adamw.step()
    for mine, other, initial in zip(ours, theirs, _params(shapes, seed=seed), strict=True):
        torch.testing.assert_close(mine.detach(), other.detach(), rtol=2e-6, atol=1e-7)
        assert not torch.equal(mine.detach(), initial.detach())
    # The same moments too (rows of whole tiles, compared on the tensor's elements).
    for mine, other in zip(ours, theirs, strict=True):
        rows = dense_block.state[mine]["exp_avg_sq"].reshape(-1)[: mine.numel()]
        torch.testing.assert_close(rows, adamw.state[other]["exp_avg_sq"].reshape(-1), rtol=1e-5, atol=1e-12)


# -- the reference against the formula written out ----------------------------------------------


@settings(max_examples=8)
@given(
    numel=st.sampled_from([4096, 4100, 5000]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_bf16_active_tiles_bit_exact_against_numpy_formula(numel, weight_decay, seed):
    """Three steps with a reselection in between (tiles entering with step 0 next to old ones), on a
    tensor with a partial last tile: weights, moments and tile steps equal the numpy formula."""
    tile_size = 64
    (param,) = _params([(numel // 4, 4)], dtype=torch.bfloat16, seed=seed, scale=0.05)
    optimizer = DenseBlockAdamW([param], lr=3e-3, weight_decay=weight_decay, density=0.1, reselect_every=2)
    state: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}  # tile -> (m row, v row, step)
    for step in range(3):
        _grads([param], seed + step, scale=1e-3)
        if step == 0:  # the partial last tile (if any) gets the most energy: it is chosen first
            param.grad.view(-1)[-(numel % tile_size or tile_size) :] *= 1000
        before = bf16_bits(param)
        optimizer.step()
        ids = optimizer.state[param]["tile_ids"].tolist()
        rows_m = np.stack([state[t][0] if t in state else np.zeros(tile_size, np.float32) for t in ids])
        rows_v = np.stack([state[t][1] if t in state else np.zeros(tile_size, np.float32) for t in ids])
        steps = np.array([state[t][2] if t in state else 0 for t in ids])
        expected = adamw_tiles_bf16_bits(
            before.reshape(-1),
            param.grad.float().reshape(-1).numpy(),
            ids,
            tile_size,
            rows_m,
            rows_v,
            steps,
            lr=3e-3,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=weight_decay,
        )
        np.testing.assert_array_equal(bf16_bits(param).reshape(-1), expected)
        np.testing.assert_array_equal(optimizer.state[param]["exp_avg"].numpy(), rows_m)
        np.testing.assert_array_equal(optimizer.state[param]["exp_avg_sq"].numpy(), rows_v)
        np.testing.assert_array_equal(optimizer.state[param]["tile_steps"].numpy(), steps)
        state = {t: (rows_m[r], rows_v[r], int(steps[r])) for r, t in enumerate(ids)}
    assert not np.array_equal(bf16_bits(param), before)


# -- density 0.05: the memory bound and frozen elements -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("select", ["grad", "random", "off_principal"])
def test_density_005_state_bound_and_outside_tiles_bit_identical(dtype, select):
    shapes = [(256, 320), (128, 512), (300, 97)]
    params = _params(shapes, dtype=dtype, seed=3)
    tile_size = 64
    optimizer = DenseBlockAdamW(params, lr=1e-2, density=0.05, select=select, reselect_every=2, tile_size=tile_size)
    for step in range(5):
        _grads(params, 10 + step, scale=1e-2)
        before = [_bits(p) for p in params]
        optimizer.step()
        for param, old in zip(params, before, strict=True):
            ids = optimizer.state[param]["tile_ids"]
            inside = _tile_mask(ids, param.numel(), tile_size)
            new = _bits(param)
            assert torch.equal(new[~inside], old[~inside]), "an element outside the active tiles moved"
            assert (new[inside] != old[inside]).any()
            assert ids.numel() == max(1, int(0.05 * num_tiles(param.numel(), tile_size)))
    # The bound, from first principles: 8 B per active element, active elements <= 0.05 * numel plus
    # one tile per tensor; index: 8 B id + 4 B step count per active tile + an 8 B step counter per
    # tensor; selection: 4 B of gradient energy per tile (kept for reselection).
    numel = sum(p.numel() for p in params)
    active_tiles = sum(optimizer.state[p]["tile_ids"].numel() for p in params)
    energy = 4 * sum(num_tiles(p.numel(), tile_size) for p in params) if select != "random" else 0
    overhead = len(params) * 8 * tile_size + 12 * active_tiles + 8 * len(params) + energy
    measured = optimizer_state_bytes(optimizer)
    assert measured <= 0.05 * 8 * numel + overhead
    assert measured > 0.05 * 8 * numel * 0.9  # the moments are really there
    report = optimizer.state_bytes_report()
    assert report["total"] == measured == optimizer.state_bytes()
    assert report["total"] <= report["budget"] + report["overhead"]
    assert report["overhead"] <= overhead and report["dense"] == 0
    assert measured / numel < 0.05 * 8 * 1.25  # ~0.45 B/param, against AdamW's 8


def test_one_dimensional_and_small_tensors_are_dense():
    params = _params([(4096,), (10, 10), (128, 64)], seed=1)
    optimizer = DenseBlockAdamW(params, lr=1e-3, density=0.05, dense_below=1000)
    _grads(params, 0)
    optimizer.step()
    tile_counts = [optimizer.state[p]["tile_ids"].numel() for p in params]
    assert tile_counts == [64, 2, 6]  # all, all, floor(0.05 * 128)
    assert [optimizer.is_dense(p, optimizer.param_groups[0]) for p in params] == [True, True, False]
    report = optimizer.state_bytes_report()
    assert report["dense_numel"] == 4096 + 100 and report["blocked_numel"] == 128 * 64
    # Moments of whole tiles, 12 B of index per tile and a step counter, for each dense tensor.
    assert report["dense"] == 8 * 64 * 64 + 8 * 2 * 64 + (64 + 2) * 12 + 2 * 8


# -- selection and reselection --------------------------------------------------------------------


def test_grad_selection_ranks_energy_accumulated_over_the_window():
    tile_size = 32
    param = torch.nn.Parameter(torch.randn(64, 64) * 0.1)  # 128 tiles; density 1/64 -> 2 tiles
    optimizer = DenseBlockSGD([param], lr=0.1, density=2 / 128, tile_size=tile_size, reselect_every=2)
    flat_grad = torch.full((64 * 64,), 1e-3)

    def grad_with(hot: dict[int, float]) -> torch.Tensor:
        grad = flat_grad.clone()
        for tile, value in hot.items():
            grad[tile * tile_size : (tile + 1) * tile_size] = value
        return grad.view(64, 64)

    param.grad = grad_with({5: 1.0, 77: 0.9})
    optimizer.step()  # first selection: this step's gradient
    assert optimizer.state[param]["tile_ids"].tolist() == [5, 77]
    param.grad = grad_with({9: 0.8, 100: 0.5})
    optimizer.step()
    param.grad = grad_with({3: 0.9})
    optimizer.step()  # step 2 reselects by the energy of steps 1 and 2: tiles 3 (0.81) and 9 (0.64)
    # (without step 2's own gradient it would be [9, 100]; without step 1's, [3, x])
    assert optimizer.state[param]["tile_ids"].tolist() == [3, 9]
    param.grad = grad_with({50: 1.0})
    optimizer.step()  # the window restarted: step 3 accumulates, no reselection
    assert optimizer.state[param]["tile_ids"].tolist() == [3, 9]
    param.grad = grad_with({60: 0.8})
    optimizer.step()  # step 4: steps 3 and 4 only (tile 3 and 9 from the old window are forgotten)
    assert optimizer.state[param]["tile_ids"].tolist() == [50, 60]


def test_reselection_keeps_state_of_staying_tiles_and_zeroes_entering_ones():
    param = torch.nn.Parameter(torch.randn(128, 64) * 0.1)
    optimizer = DenseBlockAdamW([param], lr=1e-3, density=0.25, select="random", reselect_every=3, seed=7)
    snapshots = []
    for step in range(4):
        _grads([param], step)
        optimizer.step()
        state = optimizer.state[param]
        snapshots.append({key: state[key].clone() for key in ("tile_ids", "tile_steps", "exp_avg", "exp_avg_sq")})
    old, new = snapshots[2], snapshots[3]
    one_minus_beta1 = torch.tensor(1 - 0.9, dtype=torch.float32)
    grad_rows = param.grad.reshape(-1, 64)
    assert not torch.equal(old["tile_ids"], new["tile_ids"])
    stayed = entered = 0
    for row, tile in enumerate(new["tile_ids"].tolist()):
        if tile in old["tile_ids"].tolist():
            old_row = old["tile_ids"].tolist().index(tile)
            assert new["tile_steps"][row] == old["tile_steps"][old_row] + 1 == 4
            expected = old["exp_avg"][old_row] * torch.tensor(0.9) + grad_rows[tile] * one_minus_beta1
            assert torch.equal(new["exp_avg"][row], expected)
            stayed += 1
        else:
            assert new["tile_steps"][row] == 1  # starts from zero: this is its first step
            assert torch.equal(new["exp_avg"][row], grad_rows[tile] * one_minus_beta1)
            entered += 1
    assert stayed and entered


def test_random_selection_is_seeded_and_leaves_the_global_rng_alone():
    def chosen(seed: int) -> list[int]:
        params = _params([(64, 64)], seed=0)
        optimizer = DenseBlockSGD(params, lr=0.1, density=0.1, select="random", seed=seed)
        _grads(params, 0)
        optimizer.step()
        return optimizer.state[params[0]]["tile_ids"].tolist()

    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = chosen(0)
    assert torch.equal(torch.rand(3), expected_draw)
    assert chosen(0) == first and chosen(1) != first and len(first) == 6


def test_principal_share_matches_a_naive_numpy_computation():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 48, generator=generator)
    rank, fraction, tile_size = 3, 0.2, 32
    share = principal_share(weight, tile_size, rank=rank, fraction=fraction)
    matrix = weight.double().numpy()
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    reconstruction = (u[:, :rank] * s[:rank]) @ vt[:rank]
    count = int(np.ceil(fraction * matrix.size))
    principal = np.zeros(matrix.size, dtype=bool)
    for magnitude in (np.abs(reconstruction).ravel(), np.abs(matrix).ravel()):
        principal[np.argsort(-magnitude, kind="stable")[:count]] = True
    expected = [principal[t * tile_size : (t + 1) * tile_size].mean() for t in range(num_tiles(matrix.size, tile_size))]
    np.testing.assert_allclose(share.numpy(), expected, rtol=0, atol=1e-6)


def test_off_principal_excludes_tiles_dominated_by_the_principal_directions():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 64, generator=generator) * 0.01
    weight[:16] += 3.0 * torch.outer(torch.ones(16), torch.randn(64, generator=generator))  # rows 0-15: rank-1, large
    energy = torch.rand(64, generator=generator)  # 64 tiles of 64: tile t is row t
    energy[:16] += 10.0  # the principal rows also have the largest gradients
    chosen = select_tiles(
        "off_principal",
        weight=weight,
        n_active=8,
        tile_size=64,
        grad_energy=energy,
        principal_rank=1,
        principal_fraction=0.2,
    )
    assert chosen.min() >= 16, "a principal row was chosen"
    assert chosen.tolist() == sorted((torch.argsort(energy[16:], descending=True)[:8] + 16).tolist())
    by_grad = select_tiles("grad", weight=weight, n_active=8, tile_size=64, grad_energy=energy)
    assert by_grad.max() < 16  # "grad" alone would have picked them


def test_tile_grad_energy_equals_naive_sums():
    grad = torch.randn(3, 50)
    energy = tile_grad_energy(grad, 32)
    flat = grad.reshape(-1)
    expected = torch.stack([flat[t * 32 : (t + 1) * 32].double().square().sum() for t in range(5)]).float()
    torch.testing.assert_close(energy, expected, rtol=1e-6, atol=0)


def test_nonfinite_gradient_energy_warns_at_selection():
    (param,) = _params([(64, 64)])
    optimizer = DenseBlockAdamW([param], lr=1e-3, density=0.1)
    param.grad = torch.randn(64, 64)
    param.grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="non-finite gradient"):
        optimizer.step()
    assert 0 not in optimizer.state[param]["tile_ids"].tolist()


# -- rest="sgd" and DenseBlockSGD against RLSGD ---------------------------------------------------


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), lr=st.sampled_from([0.05, 0.125, 0.5]))
def test_dense_block_sgd_with_rest_sgd_is_rlsgd(seed, lr):
    """Without momentum, SGD on the tiles plus SGD on the rest is RLSGD, bit for bit."""
    ours = _params([(96, 64), (200,), (70, 65)], dtype=torch.bfloat16, seed=seed, scale=0.05)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    dense_block = DenseBlockSGD(ours, lr=lr, density=0.1, rest="sgd", reselect_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rlsgd = RLSGD(theirs, lr=lr)
    for step in range(4):
        _grads(ours, seed + step, scale=0.02)
        for mine, other in zip(ours, theirs, strict=True):
            other.grad = mine.grad.clone()
        dense_block.step()
        rlsgd.step()
        for mine, other in zip(ours, theirs, strict=True):
            assert torch.equal(_bits(mine), _bits(other))


def test_adamw_rest_sgd_updates_outside_tiles_by_the_sgd_formula():
    (param,) = _params([(64, 128)], dtype=torch.bfloat16, seed=5, scale=0.05)
    optimizer = DenseBlockAdamW([param], lr=1e-3, density=0.1, rest="sgd", rest_lr=0.25)
    _grads([param], 1, scale=0.05)
    before = bf16_bits(param).reshape(-1)
    optimizer.step()
    after = bf16_bits(param).reshape(-1)
    inside = _tile_mask(optimizer.state[param]["tile_ids"], param.numel(), 64).numpy()
    expected_sgd = sgd_step_bf16_bits(before, param.grad.float().reshape(-1).numpy(), 0.25)
    np.testing.assert_array_equal(after[~inside], expected_sgd[~inside])
    (twin,) = _params([(64, 128)], dtype=torch.bfloat16, seed=5, scale=0.05)
    twin_optimizer = DenseBlockAdamW([twin], lr=1e-3, density=0.1)
    twin.grad = param.grad.clone()
    twin_optimizer.step()
    np.testing.assert_array_equal(after[inside], bf16_bits(twin).reshape(-1)[inside])
    assert (after[~inside] != before[~inside]).any()


def test_dense_block_sgd_momentum_lives_only_on_active_tiles():
    (param,) = _params([(128, 128)], dtype=torch.bfloat16, seed=2, scale=0.05)
    optimizer = DenseBlockSGD([param], lr=0.5, momentum=0.9, density=0.05, reselect_every=None)
    buffers = {}
    for step in range(3):
        _grads([param], step, scale=0.01)
        before = bf16_bits(param).reshape(-1)
        optimizer.step()
        ids = optimizer.state[param]["tile_ids"].tolist()
        grad = param.grad.float().reshape(-1).numpy()
        expected = before.copy()
        for row, tile in enumerate(ids):
            part = slice(tile * 64, (tile + 1) * 64)
            buffers[tile] = grad[part].copy() if step == 0 else (buffers[tile] * np.float32(0.9) + grad[part])
            expected[part] = sgd_step_bf16_bits(before[part], None, 0.5, direction=buffers[tile])
            assert np.array_equal(optimizer.state[param]["momentum_buffer"][row].numpy(), buffers[tile])
        np.testing.assert_array_equal(bf16_bits(param).reshape(-1), expected)
    assert optimizer.state[param]["momentum_buffer"].shape == (len(ids), 64)
    assert optimizer.state_bytes() < 0.05 * 4 * param.numel() + 64 * 4 + 12 * len(ids) + 8 + 4 * 256


# -- torch optimizer conventions ------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DenseBlockAdamW, DenseBlockSGD])
def test_state_dict_round_trip_weights_only_continues_bit_identically(cls):
    kwargs = dict(lr=1e-3, density=0.1, reselect_every=2) if cls is DenseBlockAdamW else dict(lr=0.1, momentum=0.9)
    shapes = [(64, 128), (128,), (96, 65)]

    def run(steps: int, resume_at: int | None = None, load: bool = True) -> list[torch.Tensor]:
        params = _params(shapes, dtype=torch.bfloat16, seed=4, scale=0.05)
        optimizer = cls([{"params": params[:2]}, {"params": params[2:], "density": 0.2}], **kwargs)
        for step in range(steps):
            if step == resume_at:
                buffer = io.BytesIO()
                torch.save(optimizer.state_dict(), buffer)
                buffer.seek(0)
                optimizer = cls([{"params": params[:2]}, {"params": params[2:], "density": 0.2}], **kwargs)
                if load:
                    optimizer.load_state_dict(torch.load(buffer, weights_only=True))
                assert all(
                    value.dtype == torch.float32
                    for state in optimizer.state.values()
                    for key, value in state.items()
                    if key in ("exp_avg", "exp_avg_sq", "momentum_buffer")
                )
            _grads(params, 100 + step, scale=0.02)
            optimizer.step()
        return [_bits(p) for p in params]

    uninterrupted = run(5)
    resumed = run(5, resume_at=3)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed, strict=True))
    control = run(5, resume_at=3, load=False)  # a fresh optimizer at step 3 diverges
    assert not all(torch.equal(a, b) for a, b in zip(uninterrupted, control, strict=True))


def test_load_state_dict_rejects_state_of_another_shape():
    params = _params([(64, 128)])
    optimizer = DenseBlockAdamW(params, lr=1e-3, density=0.1, select="random")
    _grads(params, 0)
    optimizer.step()
    state_dict = optimizer.state_dict()
    assert state_dict["state"][0]["tile_ids"].max() >= 64  # beyond the 64 tiles of a (32, 128) param
    other = DenseBlockAdamW(_params([(32, 128)]), lr=1e-3, density=0.1, tile_size=128)
    with pytest.raises(ValueError, match="does not fit a parameter of shape"):
        other.load_state_dict(state_dict)
    # Hyperparameters come from the state dict, as in torch.optim: the saved tile_size is restored.
    same_shape = DenseBlockAdamW(_params([(64, 128)]), lr=1e-3, tile_size=128)
    same_shape.load_state_dict(state_dict)
    assert same_shape.param_groups[0]["tile_size"] == 64


def test_param_groups_have_their_own_settings():
    first, second = _params([(128, 128), (128, 128)], seed=9)
    optimizer = DenseBlockAdamW(
        [{"params": [first]}, {"params": [second], "density": 0.25, "weight_decay": 0.0}], lr=1e-3, density=0.05
    )
    _grads([first, second], 0)
    optimizer.step()
    assert optimizer.state[first]["tile_ids"].numel() == 12  # floor(0.05 * 256)
    assert optimizer.state[second]["tile_ids"].numel() == 64
    assert optimizer.param_groups[1]["weight_decay"] == 0.0 and optimizer.param_groups[0]["weight_decay"] == 0.01


def test_setstate_fills_defaults_of_old_pickles():
    params = _params([(64, 64)])
    optimizer = DenseBlockAdamW(params, lr=1e-3)
    for group in optimizer.param_groups:
        del group["rest"], group["select"], group["backend"]
    restored = pickle.loads(pickle.dumps(optimizer))
    assert restored.param_groups[0]["rest"] == "freeze" and restored.param_groups[0]["select"] == "grad"
    assert restored.param_groups[0]["backend"] == "auto"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(density=0.0), "density"),
        (dict(density=1.5), "density"),
        (dict(tile_size=48), "tile_size"),
        (dict(select="magnitude"), "select"),
        (dict(rest="adam"), "rest"),
        (dict(rest="sgd"), "rest_lr"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(eps=0.0), "epsilon"),
        (dict(lr=-1.0), "learning rate"),
        (dict(reselect_every=-1), "reselect_every"),
        (dict(backend="cuda"), "backend"),
        (dict(principal_fraction=1.0), "principal_fraction"),
        (dict(principal_fraction=None), "principal_fraction"),
        (dict(weight_decay=float("nan")), "weight_decay"),
        (dict(eps=float("inf")), "epsilon"),
        (dict(dense_below=True), "dense_below"),
        (dict(density=float("nan")), "density"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DenseBlockAdamW(_params([(8, 8)]), **{"lr": 1e-3, **kwargs})


def test_duplicate_params_and_sparse_grads_are_rejected():
    (param,) = _params([(8, 8)])
    with pytest.raises(ValueError, match="twice"):
        DenseBlockSGD([param, param], lr=0.1)
    optimizer = DenseBlockSGD([param], lr=0.1)
    param.grad = torch.randn(8, 8).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()


def test_fp64_and_non_contiguous_params_step_like_contiguous_ones():
    base = torch.randn(64, 96, dtype=torch.float64)
    contiguous = torch.nn.Parameter(base.clone())
    transposed = torch.nn.Parameter(torch.empty(0, dtype=torch.float64))
    transposed.data = base.t().contiguous().t()  # same values, column-major storage
    assert not transposed.is_contiguous()
    optimizers = [DenseBlockAdamW([p], lr=1e-3, density=0.1, select="random") for p in (contiguous, transposed)]
    for _ in range(2):
        grad = torch.randn(64, 96, dtype=torch.float64)
        contiguous.grad, transposed.grad = grad.clone(), grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    assert torch.equal(contiguous.detach(), transposed.detach())
    assert optimizers[0].state[contiguous]["exp_avg"].dtype == torch.float32


def test_tracker_counts_equal_naive_diff_and_lie_in_active_tiles():
    model = torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.Linear(128, 64)).to(torch.bfloat16)
    optimizer = DenseBlockAdamW(model.parameters(), lr=3e-3, density=0.05, reselect_every=2)
    tracker = PrecisionGateTracker(model).attach(optimizer)
    names = dict(model.named_parameters())
    for _ in range(4):
        before = {name: _bits(p) for name, p in names.items()}
        model.zero_grad()
        model(torch.randn(8, 96, dtype=torch.bfloat16)).square().mean().backward()
        optimizer.step()
        record = tracker.history[-1]
        for name, param in names.items():
            changed = before[name] != _bits(param)
            assert record["per_param"][name] == int(changed.sum())
            inside = _tile_mask(optimizer.state[param]["tile_ids"], param.numel(), 64)
            assert not (changed & ~inside).any()
        assert record["changed"] == sum(record["per_param"].values()) > 0


def test_optimizer_deep_copies_and_steps_without_grads():
    params = _params([(64, 64)])
    optimizer = DenseBlockAdamW(params, lr=1e-3)
    optimizer.step()  # no grads yet: nothing happens, no state
    assert optimizer.state_bytes() == 0
    copy.deepcopy(optimizer)


def test_numpy_numbers_are_accepted_and_sets_rejected():
    (param,) = _params([(64, 64)])
    optimizer = DenseBlockSGD([param], lr=0.1, density=np.float32(0.25), reselect_every=np.int64(10), momentum=0.5)
    _grads([param], 0)
    optimizer.step()
    assert optimizer.state[param]["tile_ids"].numel() == 16
    with pytest.raises(ValueError, match="momentum"):
        DenseBlockSGD([param], lr=0.1, momentum=float("nan"))
    with pytest.raises(TypeError, match="ordered"):
        DenseBlockSGD({param}, lr=0.1)
    with pytest.warns(UserWarning, match="rest_lr=0.1 is unused"):
        DenseBlockSGD([param], lr=0.1, rest_lr=0.1)


def test_density_rounding_is_exact_for_decimal_densities():
    for density, tiles in ((0.29, 29), (0.57, 57), (0.58, 58), (0.05, 5), (0.001, 1)):
        assert n_active_tiles(100 * 64, 64, density) == tiles


def test_changing_density_reselects_on_the_next_step():
    (param,) = _params([(128, 128)])
    optimizer = DenseBlockAdamW([param], lr=1e-3, density=1.0)
    _grads([param], 0)
    optimizer.step()
    assert optimizer.state[param]["tile_ids"].numel() == 256
    optimizer.param_groups[0]["density"] = 0.2
    _grads([param], 1)
    optimizer.step()
    assert optimizer.state[param]["tile_ids"].numel() == 51
    report = optimizer.state_bytes_report()
    assert report["total"] <= report["budget"] + report["overhead"]


def test_rest_lr_follows_the_lr_schedule():
    """A scheduler that sets lr to 0 stops the rest="sgd" updates too (rest_lr * lr / initial_lr)."""
    for cls, kwargs in ((DenseBlockAdamW, dict(lr=1e-3, rest_lr=0.1)), (DenseBlockSGD, dict(lr=0.1))):
        (param,) = _params([(64, 256)], dtype=torch.bfloat16, scale=0.05)
        optimizer = cls([param], density=0.1, rest="sgd", **kwargs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0 if step == 0 else 0.5)
        _grads([param], 0, scale=0.05)
        before = _bits(param)
        optimizer.step()
        assert torch.equal(_bits(param), before), cls.__name__  # lr 0 everywhere
        scheduler.step()
        assert optimizer._rest_lr(optimizer.param_groups[0]) == pytest.approx(0.05)
        optimizer.step()
        assert not torch.equal(_bits(param), before)


def test_loading_a_torch_adamw_state_dict_keeps_settings_and_drops_untiled_state():
    params = _params([(64, 64)])
    adamw = torch.optim.AdamW(params, lr=1e-3)
    _grads(params, 0)
    adamw.step()
    optimizer = DenseBlockAdamW(params, lr=1e-3, density=0.25, select="random", tile_size=128)
    with pytest.warns(UserWarning) as caught:
        optimizer.load_state_dict(adamw.state_dict())
    messages = " ".join(str(w.message) for w in caught)
    assert "lacks" in messages and "dropped the state of 1 params" in messages
    group = optimizer.param_groups[0]
    assert (group["density"], group["select"], group["tile_size"]) == (0.25, "random", 128)
    assert optimizer.state_bytes() == 0
    optimizer.step()
    assert optimizer.state[params[0]]["tile_ids"].numel() == 8  # 0.25 of 32 tiles of 128


def test_off_principal_with_nonfinite_weights_warns_and_keeps_stepping():
    (param,) = _params([(64, 64)])
    optimizer = DenseBlockAdamW([param], lr=1e-3, density=0.1, select="off_principal", reselect_every=1)
    with torch.no_grad():
        param[0, 0] = float("inf")
    for step in range(3):
        _grads([param], step)
        with pytest.warns(UserWarning, match="non-finite weights"):
            optimizer.step()
    assert 0 not in optimizer.state[param]["tile_ids"].tolist()  # the inf counts as principal


def test_all_zero_gradient_falls_back_to_seeded_random_tiles():
    (param,) = _params([(64, 64)])
    optimizer = DenseBlockAdamW([param], lr=1e-3, density=0.1)
    param.grad = torch.zeros(64, 64)
    with pytest.warns(UserWarning, match="all-zero gradient"):
        optimizer.step()
    expected = select_tiles("random", weight=param, n_active=6, tile_size=64)
    assert optimizer.state[param]["tile_ids"].tolist() == expected.tolist() != list(range(6))


def test_randomized_svd_finds_the_same_principal_tiles_on_a_low_rank_matrix(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    left, right = torch.randn(96, 4, generator=generator), torch.randn(4, 80, generator=generator)
    weight = left @ right + 0.01 * torch.randn(96, 80, generator=generator)
    exact = principal_share(weight, 64, rank=4, fraction=0.2)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    monkeypatch.setattr("sparse_rl_optim.optim.tile_selection._EXACT_SVD_MAX_DIM", 8)
    randomized = principal_share(weight, 64, rank=4, fraction=0.2, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not used
    assert torch.equal(randomized, principal_share(weight, 64, rank=4, fraction=0.2, seed=1))
    torch.testing.assert_close(randomized, exact, rtol=0, atol=2 / 64)  # at most 2 elements per tile differ


def test_functional_rejects_tile_ids_the_kernel_could_not_trust():
    param, grad = torch.randn(200), torch.randn(200)
    rows = [torch.zeros(2, 64), torch.zeros(2, 64)]
    for bad in (torch.tensor([2, 0]), torch.tensor([0, 4]), torch.tensor([1, 1]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match="sorted, distinct and in"):
            dense_block_adamw(
                [param], [grad], [bad], [torch.zeros(2, dtype=torch.int32)], [rows[0]], [rows[1]],
                lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, tile_size=64,
                max_step=1,
            )  # fmt: skip


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (DenseBlockAdamW, dict(lr=1e-3, rest="sgd", rest_lr=0.1, weight_decay=0.1)),
        (DenseBlockAdamW, dict(lr=1e-3, select="off_principal", maximize=True)),
        (DenseBlockSGD, dict(lr=0.1, momentum=0.9, nesterov=True, rest="sgd")),
    ],
)
def test_optimizer_on_the_triton_backend_equals_the_torch_backend(cls, kwargs):
    """The whole optimizer (selection, reselection, rest, the fused kernel, in the interpreter here)
    gives the same weights and state on both backends, bf16 and fp32 params in one group."""
    runs = {}
    for backend in ("torch", "triton"):
        params = _params([(64, 96), (96,), (70, 65)], dtype=torch.bfloat16, seed=8, scale=0.05)
        params.append(torch.nn.Parameter(torch.randn(48, 100, generator=torch.Generator().manual_seed(9))))
        optimizer = cls(params, density=0.1, reselect_every=2, dense_below=1000, backend=backend, **kwargs)
        initial = [_bits(p) for p in params]
        for step in range(4):
            _grads(params, 30 + step, scale=0.02)
            optimizer.step()
        runs[backend] = (params, optimizer)
    (torch_params, torch_optimizer), (triton_params, triton_optimizer) = runs["torch"], runs["triton"]
    for mine, other in zip(triton_params, torch_params, strict=True):
        assert torch.equal(_bits(mine), _bits(other))
        for key, value in torch_optimizer.state[other].items():
            mine_value = triton_optimizer.state[mine][key]
            assert torch.equal(mine_value, value) if isinstance(value, torch.Tensor) else mine_value == value, key
    assert all(not torch.equal(_bits(p), old) for p, old in zip(triton_params, initial, strict=True))


def test_loaded_step_counter_is_a_cpu_int64_and_foreign_settings_are_dropped():
    params = _params([(64, 64)])
    adamw = torch.optim.AdamW(params, lr=1e-3, amsgrad=True)
    _grads(params, 0)
    adamw.step()
    optimizer = DenseBlockAdamW(params, lr=1e-3, density=0.25)
    with pytest.warns(UserWarning, match=r"dropped settings .*amsgrad"):
        optimizer.load_state_dict(adamw.state_dict())
    assert "amsgrad" not in optimizer.param_groups[0] and "fused" not in optimizer.param_groups[0]
    optimizer.step()
    saved = optimizer.state_dict()
    saved["state"][0]["step"] = torch.tensor(1.0)  # as torch's own optimizers keep it (fp32), or on a GPU
    optimizer.load_state_dict(saved)
    step = optimizer.state[params[0]]["step"]
    assert step.dtype == torch.int64 and step.device.type == "cpu" and int(step) == 1


def test_numpy_integer_settings_run():
    params = _params([(64, 64)])
    optimizer = DenseBlockAdamW(params, lr=1e-3, select="random", seed=np.int64(3), tile_size=np.int64(64))
    _grads(params, 0)
    optimizer.step()
    assert type(optimizer.param_groups[0]["tile_size"]) is int and optimizer.state[params[0]]["tile_ids"].numel() == 3


@pytest.mark.parametrize("scheduler", ["plateau", "onecycle"])
def test_rest_lr_scales_with_any_scheduler(scheduler):
    (param,) = _params([(64, 64)])
    optimizer = DenseBlockAdamW([param], lr=1e-3, density=0.1, rest="sgd", rest_lr=0.1)
    if scheduler == "plateau":
        schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=0)
        for _ in range(3):
            schedule.step(1.0)  # no improvement: lr drops
    else:
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=10)
    lr = optimizer.param_groups[0]["lr"]
    assert lr < 1e-3
    assert optimizer._rest_lr(optimizer.param_groups[0]) == pytest.approx(0.1 * lr / 1e-3)


def test_state_of_another_setting_is_rebuilt_not_a_key_error():
    (param,) = _params([(64, 64)])
    sgd = DenseBlockSGD([param], lr=0.1, density=0.25)
    _grads([param], 0)
    sgd.step()
    adamw = DenseBlockAdamW([param], lr=1e-3, density=0.25)
    adamw.load_state_dict(sgd.state_dict())  # tiles, no moments
    adamw.step()
    assert adamw.state[param]["exp_avg"].shape == (16, 64) and (adamw.state[param]["tile_steps"] == 1).all()
    sgd.param_groups[0]["momentum"] = 0.9  # momentum switched on mid-run
    sgd.step()
    assert torch.equal(sgd.state[param]["momentum_buffer"], param.grad.reshape(-1, 64)[sgd.state[param]["tile_ids"]])
    sgd.param_groups[0]["momentum"] = 0.0
    sgd.step()
    assert "momentum_buffer" not in sgd.state[param] and "tile_steps" not in sgd.state[param]
    sgd.param_groups[0]["tile_size"] = 128  # the ids are of tiles of 64: refused, not misread
    with pytest.raises(ValueError, match="tile_size changed from 64 to 128"):
        sgd.step()


def test_a_rejected_state_dict_changes_nothing():
    params = _params([(64, 128)])
    optimizer = DenseBlockAdamW(params, lr=1e-3, density=0.1, select="random")
    _grads(params, 0)
    optimizer.step()
    saved = optimizer.state_dict()
    other_params = _params([(32, 128)])
    other = DenseBlockAdamW(other_params, lr=1e-3, density=0.1, select="random", seed=5)
    _grads(other_params, 1)
    other.step()
    before = {key: value.clone() for key, value in other.state[other_params[0]].items() if torch.is_tensor(value)}
    with pytest.raises(ValueError, match="does not fit"):
        other.load_state_dict(saved)
    assert other.param_groups[0]["seed"] == 5
    assert all(torch.equal(other.state[other_params[0]][key], value) for key, value in before.items())
