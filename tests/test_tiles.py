"""Tile geometry and the tile operations (count, pack, apply) against references written out here.

The references are numpy and plain Python loops over tiles, working on raw bit patterns; nothing
here calls the package's torch path to produce an expected value. Every tile operation is checked on
``backend="torch"`` and ``backend="triton"`` (the kernels; in Triton's CPU interpreter when there is
no GPU, see conftest.py), on CPU and, when one is present, on CUDA.

Convention checked for ``count_changed_tiles``: an element counts as changed when its 16-bit gate
view's **bit pattern** differs (the stored bits for bf16/fp16, the bits of the round-to-nearest-even
bf16 of an fp32 value). So +0 and -0 differ, inf and -inf differ, two NaNs with different bf16/fp16
payloads differ, and two identical NaNs are equal. For fp32 all NaNs have the same gate view here
(torch's fp32 -> bf16 cast canonicalizes NaN, so the inputs only ever carry one NaN pattern, and
fp32 subnormals are flushed in the generated data since some CPU conversion paths flush them).
"""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import rtne_fp32_to_bf16_bits

from sparse_rl_optim.kernels.launch import block_size
from sparse_rl_optim.tiles import (
    DEFAULT_TILE_SIZE,
    MAX_TILE_SIZE,
    MIN_TILE_SIZE,
    PackedTiles,
    active_tile_ids,
    apply_tiles,
    check_tile_size,
    count_changed_tiles,
    num_tiles,
    pack_tiles,
    tile_bounds,
    tile_of_elements,
)

HAS_CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

#: (device, backend) pairs: triton on CPU tensors needs the interpreter (set by conftest.py when
#: there is no GPU); the CUDA pairs exist only on a machine with one.
TARGETS = [
    pytest.param("cpu", "torch", id="cpu-torch"),
    pytest.param(
        "cpu",
        "triton",
        id="cpu-triton",
        marks=pytest.mark.skipif(not INTERPRETING, reason="triton on CPU tensors needs TRITON_INTERPRET=1"),
    ),
]
if HAS_CUDA:
    TARGETS += [pytest.param("cuda", "torch", id="cuda-torch"), pytest.param("cuda", "triton", id="cuda-triton")]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TILE_SIZES = [32, 64, 256, 1024]
DENSITIES = [0.0, 0.01, 0.1, 0.5, 1.0]

_UNSIGNED = {2: np.uint16, 4: np.uint32}
_SIGNED_TORCH = {2: torch.int16, 4: torch.int32}
_SIGNED_NP = {2: np.int16, 4: np.int32}
# Special 16-bit patterns: +0, -0, +inf, -inf, a NaN.
_SPECIAL16 = {
    torch.bfloat16: np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0], dtype=np.uint16),
    torch.float16: np.array([0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00], dtype=np.uint16),
}
_NAN16 = {torch.bfloat16: (0x7FC0, 0x7FA1), torch.float16: (0x7E00, 0x7C01)}
# fp32: +0, -0, +inf, -inf, NaN, the largest finite (rounds to inf in bf16), 1.0, a bf16 tie.
_SPECIAL32 = np.array(
    [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F7FFFFF, 0x3F800000, 0x3F808000],
    dtype=np.uint32,
)
_NAN32 = 0x7FC00000


def element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


# --- independent references ------------------------------------------------------------------


def raw_bits(tensor: torch.Tensor) -> np.ndarray:
    """Flat row-major raw bit patterns (uint16 / uint32) of a tensor, via numpy."""
    size = tensor.element_size()
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(_SIGNED_TORCH[size]).numpy().view(_UNSIGNED[size]).copy()


def gate_bits(tensor: torch.Tensor) -> np.ndarray:
    """Flat 16-bit gate view: stored bits of bf16/fp16, numpy round-to-nearest-even bf16 of fp32."""
    if tensor.dtype == torch.float32:
        return rtne_fp32_to_bf16_bits(raw_bits(tensor).view(np.float32))
    return raw_bits(tensor)


def naive_tile_counts(old_bits: np.ndarray, new_bits: np.ndarray, tile_size: int) -> np.ndarray:
    """Per tile, how many bit patterns differ: a loop over the tiles."""
    numel = old_bits.size
    counts = []
    start = 0
    while start < numel:
        stop = min(start + tile_size, numel)
        counts.append(int(np.count_nonzero(old_bits[start:stop] != new_bits[start:stop])))
        start += tile_size
    return np.array(counts, dtype=np.int32)


def naive_gather(bits: np.ndarray, tile_ids, tile_size: int, xor_bits: np.ndarray | None = None) -> np.ndarray:
    """``[len(tile_ids), tile_size]`` rows of the tiles' bits (XOR-ed with ``xor_bits``), zero past the end."""
    out = np.zeros((len(tile_ids), tile_size), dtype=bits.dtype)
    for row, tile in enumerate(tile_ids):
        start = int(tile) * tile_size
        stop = min(start + tile_size, bits.size)
        out[row, : stop - start] = bits[start:stop]
        if xor_bits is not None:
            out[row, : stop - start] ^= xor_bits[start:stop]
    return out


def naive_apply(replica_bits: np.ndarray, rows: np.ndarray, tile_ids, tile_size: int, xor: bool) -> np.ndarray:
    out = replica_bits.copy()
    for row, tile in enumerate(tile_ids):
        start = int(tile) * tile_size
        stop = min(start + tile_size, out.size)
        if xor:
            out[start:stop] ^= rows[row, : stop - start]
        else:
            out[start:stop] = rows[row, : stop - start]
    return out


# --- random inputs ---------------------------------------------------------------------------


def to_tensor(bits: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...], device: str) -> torch.Tensor:
    size = element_size(dtype)
    signed = np.ascontiguousarray(bits).view(_SIGNED_NP[size]).copy()
    return torch.from_numpy(signed).view(dtype).reshape(shape).to(device)


def _canonical_fp32(bits: np.ndarray) -> np.ndarray:
    """One NaN pattern, and subnormals flushed to signed zero (see the module docstring)."""
    bits = bits.copy()
    exponent = bits & np.uint32(0x7F800000)
    bits[(exponent == 0x7F800000) & ((bits & np.uint32(0x007FFFFF)) != 0)] = _NAN32
    subnormal = exponent == 0
    bits[subnormal] &= np.uint32(0x80000000)
    return bits


def random_pair(seed: int, numel: int, dtype: torch.dtype, density: float) -> tuple[np.ndarray, np.ndarray]:
    """Raw bits of an "old" tensor and a "new" one that differs from it at about ``density`` of the
    elements, with specials sprinkled in: +-0, +-inf, NaN, +0 -> -0 and identical-NaN pairs."""
    rng = np.random.default_rng(seed)
    if dtype == torch.float32:
        magnitude = 10.0 ** rng.uniform(-6, 6, numel)
        old = (rng.standard_normal(numel) * magnitude).astype(np.float32).view(np.uint32)
        special = rng.random(numel) < 0.05
        old[special] = rng.choice(_SPECIAL32, int(special.sum()))
        old = _canonical_fp32(old)
        new = old.copy()
        changed = np.flatnonzero(rng.random(numel) < density)
        kind = rng.integers(0, 3, changed.size)
        fresh = (rng.standard_normal(changed.size) * 10.0 ** rng.uniform(-6, 6, changed.size)).astype(np.float32)
        low_bit = np.uint32(1) << rng.integers(0, 16, changed.size).astype(np.uint32)
        high_bit = np.uint32(1) << rng.integers(16, 32, changed.size).astype(np.uint32)
        new[changed] = np.where(
            kind == 0, fresh.view(np.uint32), np.where(kind == 1, old[changed] ^ low_bit, old[changed] ^ high_bit)
        )
        new = _canonical_fp32(new)
        nan_pair, nan = np.uint32(_NAN32), np.uint32(_NAN32)
        zero, negative_zero = np.uint32(0), np.uint32(0x80000000)
    else:
        old = rng.integers(0, 2**16, numel, dtype=np.uint16)
        special = rng.random(numel) < 0.05
        old[special] = rng.choice(_SPECIAL16[dtype], int(special.sum()))
        new = old.copy()
        changed = np.flatnonzero(rng.random(numel) < density)
        new[changed] ^= rng.integers(1, 2**16, changed.size, dtype=np.uint16)
        nan_pair, nan = (np.uint16(v) for v in _NAN16[dtype])
        zero, negative_zero = np.uint16(0), np.uint16(0x8000)
    # A few +0 -> -0 changes, identical NaNs, and (16-bit) NaN -> NaN with another payload.
    extras = rng.random(numel)
    signed_zero = extras < 0.005
    old[signed_zero], new[signed_zero] = zero, negative_zero
    same_nan = (extras >= 0.005) & (extras < 0.01)
    old[same_nan], new[same_nan] = nan, nan
    other_nan = (extras >= 0.01) & (extras < 0.012)
    old[other_nan], new[other_nan] = nan, nan_pair
    return old, new


@st.composite
def layouts(draw, max_numel: int) -> tuple[int, ...]:
    """A 1-D shape, or a 2-D one whose rows do not line up with the tiles."""
    numel = draw(
        st.one_of(st.integers(0, 300), st.integers(300, max_numel // 4), st.integers(max_numel // 2, max_numel))
    )
    if draw(st.booleans()):
        cols = draw(st.integers(1, 300))
        return (numel // cols, cols)
    return (numel,)


# --- geometry --------------------------------------------------------------------------------


def test_check_tile_size_accepts_the_powers_of_two():
    assert MIN_TILE_SIZE == 32 and MAX_TILE_SIZE == 16384 and DEFAULT_TILE_SIZE == 64
    for exponent in range(5, 15):
        assert check_tile_size(2**exponent) == 2**exponent


@pytest.mark.parametrize("bad", [0, 1, 2, 16, 31, 33, 48, 96, 1000, 2**15, 2**20, -64, 64.0, True, False, "64", None])
def test_check_tile_size_rejects(bad):
    with pytest.raises(ValueError, match="power of two"):
        check_tile_size(bad)
    with pytest.raises(ValueError, match="power of two"):
        num_tiles(100, bad)


@given(numel=st.one_of(st.integers(0, 5000), st.integers(0, 2**45)), tile_size=st.sampled_from([*TILE_SIZES, 16384]))
@settings(max_examples=60)
def test_num_tiles_and_tile_bounds(numel, tile_size):
    n_tiles = num_tiles(numel, tile_size)
    assert n_tiles == (numel + tile_size - 1) // tile_size
    assert n_tiles * tile_size >= numel > (n_tiles - 1) * tile_size or numel == n_tiles == 0
    with pytest.raises(IndexError):
        tile_bounds(-1, numel, tile_size)
    with pytest.raises(IndexError):
        tile_bounds(n_tiles, numel, tile_size)
    if numel == 0:
        assert n_tiles == 0
        with pytest.raises(IndexError):
            tile_bounds(0, 0, tile_size)
        return
    # The tiles cover [0, numel) without gaps or overlap; only the last may be partial.
    probe = range(n_tiles) if n_tiles <= 200 else [0, 1, n_tiles // 2, n_tiles - 2, n_tiles - 1]
    for tile in probe:
        start, stop = tile_bounds(tile, numel, tile_size)
        assert start == tile * tile_size
        assert stop == (tile + 1) * tile_size if tile < n_tiles - 1 else stop == numel
        assert 0 < stop - start <= tile_size
    last_start, last_stop = tile_bounds(n_tiles - 1, numel, tile_size)
    assert last_stop - last_start == numel - (n_tiles - 1) * tile_size
    if n_tiles <= 200:
        covered = [i for t in range(n_tiles) for i in range(*tile_bounds(t, numel, tile_size))]
        assert covered == list(range(numel))


def test_tile_bounds_of_a_partial_last_tile_and_defaults():
    assert num_tiles(130) == 3
    assert tile_bounds(2, 130) == (128, 130)
    assert tile_bounds(0, 130) == (0, 64)
    assert tile_bounds(0, 1, 32) == (0, 1)
    with pytest.raises(IndexError, match="out of range"):
        tile_bounds(3, 130)


@given(
    indices=st.lists(st.integers(0, 2**62), min_size=1, max_size=50),
    tile_size=st.sampled_from([*TILE_SIZES, 16384]),
)
@settings(max_examples=40)
def test_tile_of_elements_is_exact_in_int64(indices, tile_size):
    boundary = [2**31 - 1, 2**31, 2**31 + 1, 2**32 + 63, 2**40 - 1, 2**40, 2**40 + 12345, 2**62 + 5]
    values = indices + boundary
    tiles = tile_of_elements(torch.tensor(values, dtype=torch.int64), tile_size)
    assert tiles.dtype == torch.int64
    assert tiles.tolist() == [v // tile_size for v in values]


def test_tile_of_elements_widens_int32_and_defaults():
    small = torch.tensor([0, 63, 64, 2**31 - 1], dtype=torch.int32)
    tiles = tile_of_elements(small)
    assert tiles.dtype == torch.int64
    assert tiles.tolist() == [0, 0, 1, (2**31 - 1) // 64]
    assert tile_of_elements(torch.tensor([2**40 + 100]), 32).item() == (2**40 + 100) // 32
    with pytest.raises(ValueError, match="power of two"):
        tile_of_elements(small, 48)


@given(seed=st.integers(0, 2**32 - 1), size=st.integers(0, 500), zero_fraction=st.floats(0, 1))
@settings(max_examples=30)
def test_active_tile_ids_are_the_sorted_nonzero_tiles(seed, size, zero_fraction):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 64, size, dtype=np.int32)
    counts[rng.random(size) < zero_fraction] = 0
    ids = active_tile_ids(torch.from_numpy(counts))
    assert ids.dtype == torch.int64
    assert ids.tolist() == [t for t in range(size) if counts[t] != 0]


# --- count_changed_tiles ---------------------------------------------------------------------


def check_counts(old: torch.Tensor, new: torch.Tensor, tile_size: int, backend: str) -> torch.Tensor:
    counts = count_changed_tiles(old, new, tile_size, backend=backend)
    expected = naive_tile_counts(gate_bits(old), gate_bits(new), tile_size)
    assert counts.dtype == torch.int32
    assert counts.device == old.device
    assert counts.shape == (num_tiles(old.numel(), tile_size),)
    np.testing.assert_array_equal(counts.cpu().numpy(), expected)
    return counts


@pytest.mark.parametrize(("device", "backend"), TARGETS)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=layouts(40_000),
    dtype=st.sampled_from(DTYPES),
    tile_size=st.sampled_from(TILE_SIZES),
    density=st.sampled_from(DENSITIES),
)
@settings(max_examples=30)
def test_count_changed_tiles_matches_the_naive_count(device, backend, seed, shape, dtype, tile_size, density):
    numel = math.prod(shape)
    old_bits, new_bits = random_pair(seed, numel, dtype, density)
    old = to_tensor(old_bits, dtype, shape, device)
    new = to_tensor(new_bits, dtype, shape, device)
    check_counts(old, new, tile_size, backend)
    # Swapping the arguments counts the same elements; a tensor against itself counts none.
    check_counts(new, old, tile_size, backend)
    assert not count_changed_tiles(new, new.clone(), tile_size, backend=backend).any()


@pytest.mark.parametrize(("device", "backend"), TARGETS)
@pytest.mark.parametrize("tile_size", TILE_SIZES)
def test_count_changed_tiles_around_the_kernel_block(device, backend, tile_size):
    block = block_size(tile_size)
    for index, numel in enumerate([block - 1, block, block + 1, 2 * block + tile_size + 5, tile_size * 3 - 1]):
        dtype = DTYPES[index % len(DTYPES)]
        density = 0.01 if index % 2 else 0.5
        old_bits, new_bits = random_pair(1000 * tile_size + index, numel, dtype, density)
        # A change in the very first and the very last element (edge tiles of each block).
        if dtype == torch.float32:
            new_bits[[0, numel - 1]] = old_bits[[0, numel - 1]] ^ np.uint32(0x80000000)
        else:
            new_bits[[0, numel - 1]] = old_bits[[0, numel - 1]] ^ np.uint16(0x8000)
        old = to_tensor(old_bits, dtype, (numel,), device)
        new = to_tensor(new_bits, dtype, (numel,), device)
        counts = check_counts(old, new, tile_size, backend)
        assert counts[0] > 0 and counts[-1] > 0


@pytest.mark.parametrize(("device", "backend"), TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_count_changed_tiles_conventions(device, backend, dtype):
    """The bit-pattern convention, element by element, one element per 32-element tile."""
    inf, nan = float("inf"), float("nan")
    pairs = [
        (1.0, 1.0, 0),
        (0.0, -0.0, 1),  # +0 and -0 are different patterns
        (-0.0, -0.0, 0),
        (inf, -inf, 1),
        (inf, inf, 0),
        (nan, nan, 0),  # identical NaNs are equal
        (nan, 1.0, 1),
        (nan, inf, 1),
        (2.0, 3.0, 1),
    ]
    if dtype == torch.float32:
        # Gate view of fp32 is its bf16 rounding: a change below half a bf16 ulp is invisible,
        # one that moves the rounding is seen, and a tie goes to even.
        pairs += [
            (1.0, 1.0 + 2.0**-20, 0),
            (1.0, 1.0 + 2.0**-8 + 2.0**-20, 1),
            (1.0, 1.0 + 2.0**-8, 0),  # a tie: rounds to even (1.0)
            (1.0 + 2.0**-7, 1.0 + 2.0**-7 + 2.0**-8, 1),  # a tie: rounds to even (1 + 2**-6)
            (3.0e38, 3.4e38, 1),  # 3.4e38 rounds to inf in bf16
            (3.4e38, float("inf"), 0),  # ... so it has the gate view of inf
        ]
    else:
        # bf16/fp16 see every stored bit: the smallest step counts, two NaN payloads differ.
        one_bits = 0x3F80 if dtype == torch.bfloat16 else 0x3C00
        quiet, other = _NAN16[dtype]
        pairs += [("bits", one_bits, one_bits + 1, 1), ("bits", quiet, other, 1), ("bits", other, other, 0)]
    tile = 32
    old = torch.zeros(len(pairs) * tile, dtype=dtype)
    new = torch.zeros(len(pairs) * tile, dtype=dtype)
    expected = []
    for index, pair in enumerate(pairs):
        if pair[0] == "bits":
            _, a, b, want = pair
            old.view(torch.int16)[index * tile] = np.int16(np.uint16(a))
            new.view(torch.int16)[index * tile] = np.int16(np.uint16(b))
        else:
            a, b, want = pair
            old[index * tile], new[index * tile] = a, b
        # Background of the tile: same random values on both sides.
        background = torch.randn(tile - 1, generator=torch.Generator().manual_seed(index)).to(dtype)
        old[index * tile + 1 : (index + 1) * tile] = background
        new[index * tile + 1 : (index + 1) * tile] = background
        expected.append(want)
    old, new = old.to(device), new.to(device)
    counts = count_changed_tiles(old, new, tile, backend=backend)
    assert counts.cpu().tolist() == expected
    # And the reference agrees with itself on these (catches a wrong expectation in the list).
    assert naive_tile_counts(gate_bits(old), gate_bits(new), tile).tolist() == expected


@pytest.mark.parametrize(("device", "backend"), TARGETS)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0)])
def test_count_changed_tiles_of_an_empty_tensor(device, backend, shape):
    for dtype in DTYPES:
        empty = torch.empty(shape, dtype=dtype, device=device)
        counts = count_changed_tiles(empty, empty.clone(), 64, backend=backend)
        assert counts.shape == (0,) and counts.dtype == torch.int32


@pytest.mark.parametrize(("device", "backend"), TARGETS)
def test_count_changed_tiles_of_non_contiguous_views(device, backend):
    for dtype in DTYPES:
        old_bits, new_bits = random_pair(7, 90 * 70, dtype, 0.1)
        old = to_tensor(old_bits, dtype, (90, 70), device).t()
        new = to_tensor(new_bits, dtype, (90, 70), device).t()
        assert not old.is_contiguous()
        check_counts(old, new, 64, backend)


# --- pack_tiles / apply_tiles ----------------------------------------------------------------


def check_packed(packed: PackedTiles, tensor: torch.Tensor, ids, tile_size: int, xor_with: torch.Tensor | None):
    """Ids, values (naive gather, zero padding), metadata and nbytes of one pack."""
    ids = [int(t) for t in ids]
    assert isinstance(packed, PackedTiles)
    assert packed.tile_ids.dtype == torch.int64
    assert packed.tile_ids.cpu().tolist() == ids
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert packed.values.dtype == tensor.dtype
    assert packed.values.shape == (len(ids), tile_size)
    assert packed.values.device == tensor.device
    assert packed.numel == tensor.numel() and packed.shape == tuple(tensor.shape)
    assert packed.tile_size == tile_size and packed.xor == (xor_with is not None)
    other = raw_bits(xor_with) if xor_with is not None else None
    expected = naive_gather(raw_bits(tensor), ids, tile_size, other)
    np.testing.assert_array_equal(raw_bits(packed.values).reshape(len(ids), tile_size), expected)
    assert packed.nbytes() == len(ids) * 8 + len(ids) * tile_size * tensor.element_size()


def in_buffer(values: torch.Tensor, sentinel_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous copy of ``values`` that is the head of a longer buffer with random bits after it
    (so a write past the end of a partial last tile would show)."""
    size = values.element_size()
    tail = np.random.default_rng(sentinel_seed).integers(0, 2 ** (8 * size), 97, dtype=np.uint64)
    tail = to_tensor(tail.astype(_UNSIGNED[size]), values.dtype, (97,), str(values.device))
    buffer = torch.cat([values.detach().reshape(-1), tail])
    return buffer[: values.numel()].view(values.shape), buffer


@pytest.mark.parametrize(("device", "backend"), TARGETS)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=layouts(9_000),
    dtype=st.sampled_from(DTYPES),
    tile_size=st.sampled_from(TILE_SIZES),
    density=st.sampled_from(DENSITIES),
    xor=st.booleans(),
    transpose=st.booleans(),
)
@settings(max_examples=20)
def test_pack_then_apply_reproduces_the_new_tensor(
    device, backend, seed, shape, dtype, tile_size, density, xor, transpose
):
    numel = math.prod(shape)
    old_bits, new_bits = random_pair(seed, numel, dtype, density)
    old = to_tensor(old_bits, dtype, shape, device)
    new = to_tensor(new_bits, dtype, shape, device)
    if transpose and len(shape) == 2:  # non-contiguous sources: tiles follow the logical row-major order
        old, new = old.t(), new.t()
    # Active tiles: those where any raw bit changed (for fp32 that is more than the gate view sees).
    counts = naive_tile_counts(raw_bits(old), raw_bits(new), tile_size)
    active = np.flatnonzero(counts)
    xor_with = old if xor else None
    packed = pack_tiles(
        new, torch.from_numpy(counts).to(device), tile_size=tile_size, xor_with=xor_with, backend=backend
    )
    check_packed(packed, new, active, tile_size, xor_with)
    # Deterministic: a second pack gives the same bytes.
    again = pack_tiles(
        new, torch.from_numpy(counts).to(device), tile_size=tile_size, xor_with=xor_with, backend=backend
    )
    assert torch.equal(again.tile_ids, packed.tile_ids)
    np.testing.assert_array_equal(raw_bits(again.values), raw_bits(packed.values))
    # Apply onto a replica holding the old values: bit-exact new values, nothing past the end touched.
    replica, buffer = in_buffer(old.contiguous(), seed)
    tail_before = raw_bits(buffer)[numel:]
    assert apply_tiles(replica, packed, backend=backend) is replica
    np.testing.assert_array_equal(raw_bits(replica), raw_bits(new))
    np.testing.assert_array_equal(raw_bits(buffer)[numel:], tail_before)


@pytest.mark.parametrize(("device", "backend"), TARGETS)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=layouts(9_000),
    dtype=st.sampled_from(DTYPES),
    tile_size=st.sampled_from(TILE_SIZES),
    fraction=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    xor=st.booleans(),
    ids_dtype=st.sampled_from([torch.int64, torch.int32]),
)
@settings(max_examples=20)
def test_pack_and_apply_with_explicit_tile_ids(
    device, backend, seed, shape, dtype, tile_size, fraction, xor, ids_dtype
):
    """Explicit ids onto a replica of unrelated random bits: the chosen tiles get the packed rows
    (or are XOR-ed with them), every other element keeps its bits."""
    numel = math.prod(shape)
    rng = np.random.default_rng(seed)
    source_bits, other_bits = random_pair(seed, numel, dtype, 0.5)
    replica_bits, _ = random_pair(seed + 1, numel, dtype, 0.0)
    n_tiles = num_tiles(numel, tile_size)
    ids = np.flatnonzero(rng.random(n_tiles) < fraction)
    if n_tiles and rng.random() < 0.5:  # always include the (possibly partial) last tile
        ids = np.union1d(ids, [n_tiles - 1])
    source = to_tensor(source_bits, dtype, shape, device)
    other = to_tensor(other_bits, dtype, shape, device) if xor else None
    packed = pack_tiles(
        source,
        tile_ids=torch.tensor(ids, dtype=ids_dtype),
        tile_size=tile_size,
        xor_with=other,
        backend=backend,
    )
    check_packed(packed, source, ids, tile_size, other)
    replica, buffer = in_buffer(to_tensor(replica_bits, dtype, shape, device), seed)
    tail_before = raw_bits(buffer)[numel:]
    apply_tiles(replica, packed, backend=backend)
    rows = naive_gather(source_bits, ids, tile_size, other_bits if xor else None)
    expected = naive_apply(replica_bits, rows, ids, tile_size, xor)
    np.testing.assert_array_equal(raw_bits(replica), expected)
    outside = np.ones(numel, dtype=bool)
    for tile in ids:
        outside[tile * tile_size : (tile + 1) * tile_size] = False
    np.testing.assert_array_equal(raw_bits(replica)[outside], replica_bits[outside])
    np.testing.assert_array_equal(raw_bits(buffer)[numel:], tail_before)


@pytest.mark.parametrize(("device", "backend"), TARGETS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_count_pack_apply_pipeline(device, backend, dtype):
    """For 16-bit tensors the gate view is the stored bits, so the package's own counts select
    exactly the tiles needed to rebuild the new tensor (1 % sparse and dense changes)."""
    for index, (shape, density, tile_size) in enumerate(
        [((3000,), 0.01, 64), ((37, 129), 0.01, 32), ((5001,), 0.5, 256), ((17, 300), 0.01, 1024)]
    ):
        old_bits, new_bits = random_pair(index + 50, math.prod(shape), dtype, density)
        old = to_tensor(old_bits, dtype, shape, device)
        new = to_tensor(new_bits, dtype, shape, device)
        counts = count_changed_tiles(old, new, tile_size, backend=backend)
        for xor_with in (None, old):
            packed = pack_tiles(new, counts, tile_size=tile_size, xor_with=xor_with, backend=backend)
            active = np.flatnonzero(naive_tile_counts(old_bits, new_bits, tile_size))
            check_packed(packed, new, active, tile_size, xor_with)
            replica = old.clone()
            apply_tiles(replica, packed, backend=backend)
            np.testing.assert_array_equal(raw_bits(replica), new_bits)


@pytest.mark.parametrize(("device", "backend"), TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_with_nothing_active(device, backend, dtype):
    for shape in [(0,), (0, 3), (100,), (7, 9)]:
        numel = math.prod(shape)
        old_bits, _ = random_pair(3, numel, dtype, 0.0)
        tensor = to_tensor(old_bits, dtype, shape, device)
        n_tiles = num_tiles(numel, 32)
        for kwargs in (
            {"tile_counts": torch.zeros(n_tiles, dtype=torch.int32, device=device)},
            {"tile_ids": torch.empty(0, dtype=torch.int64)},
        ):
            packed = pack_tiles(tensor, tile_size=32, backend=backend, **kwargs)
            check_packed(packed, tensor, [], 32, None)
            assert packed.nbytes() == 0
            replica = tensor.clone()
            apply_tiles(replica, packed, backend=backend)
            np.testing.assert_array_equal(raw_bits(replica), old_bits)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "backend"), TARGETS)
def test_layout_mismatches_are_rejected(device, backend):
    a = torch.randn(100, device=device).to(torch.bfloat16)
    meta = torch.empty(100, dtype=torch.bfloat16, device="meta")
    for fn in (
        lambda x, y: count_changed_tiles(x, y, 32, backend=backend),
        lambda x, y: pack_tiles(x, tile_ids=torch.tensor([0]), tile_size=32, xor_with=y, backend=backend),
    ):
        with pytest.raises(ValueError, match="shape"):
            fn(a, a[:99])
        with pytest.raises(ValueError, match="shape"):
            fn(a, a.view(10, 10))
        with pytest.raises(ValueError, match="dtype"):
            fn(a, a.to(torch.float16))
        with pytest.raises(ValueError, match="device"):
            fn(a, meta)
    with pytest.raises(ValueError, match="power of two"):
        count_changed_tiles(a, a, 48, backend=backend)

    packed = pack_tiles(a, tile_ids=torch.tensor([0, 3]), tile_size=32, backend=backend)
    with pytest.raises(ValueError, match="does not match"):
        apply_tiles(a[:99].clone(), packed, backend=backend)
    with pytest.raises(ValueError, match="does not match"):
        apply_tiles(a.view(10, 10).clone(), packed, backend=backend)
    with pytest.raises(ValueError, match="does not match"):
        apply_tiles(a.to(torch.float16), packed, backend=backend)
    square = pack_tiles(a.view(10, 10), tile_ids=torch.tensor([1]), tile_size=32, backend=backend)
    strided = a.view(10, 10).clone().t()
    with pytest.raises(ValueError, match="contiguous"):
        apply_tiles(strided, square, backend=backend)


@pytest.mark.parametrize(("device", "backend"), TARGETS)
def test_pack_argument_errors(device, backend):
    tensor = torch.randn(200, device=device).to(torch.bfloat16)  # 7 tiles of 32, the last partial
    counts = torch.ones(7, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="exactly one"):
        pack_tiles(tensor, tile_size=32, backend=backend)
    with pytest.raises(ValueError, match="exactly one"):
        pack_tiles(tensor, counts, tile_ids=torch.tensor([0]), tile_size=32, backend=backend)
    for wrong in (6, 8, 0):
        with pytest.raises(ValueError, match="tile_counts has"):
            pack_tiles(tensor, torch.ones(wrong, dtype=torch.int32, device=device), tile_size=32, backend=backend)
    # Counts must be one 1-D entry per tile: a 2-D or 0-d tensor is refused even when its number
    # of entries fits (nonzero() of it would give coordinates, not tile ids).
    with pytest.raises(ValueError, match="1-D"):
        pack_tiles(tensor, counts.view(1, 7), tile_size=32, backend=backend)
    with pytest.raises(ValueError, match="1-D"):
        pack_tiles(tensor[:20], torch.tensor(3, device=device), tile_size=32, backend=backend)
    with pytest.raises(ValueError, match="1-D"):
        pack_tiles(tensor, tile_ids=torch.tensor([[0, 2]]), tile_size=32, backend=backend)
    for bad_ids in ([1, 0], [2, 2], [0, 3, 3], [-1, 2], [0, 7], [100], [5, 4, 6]):
        with pytest.raises(ValueError, match="sorted, distinct"):
            pack_tiles(tensor, tile_ids=torch.tensor(bad_ids), tile_size=32, backend=backend)
    with pytest.raises(ValueError, match="power of two"):
        pack_tiles(tensor, counts, tile_size=40, backend=backend)


def test_invalid_backend_names_are_rejected():
    tensor = torch.randn(64).to(torch.bfloat16)
    counts = torch.ones(1, dtype=torch.int32)
    packed = pack_tiles(tensor, counts, tile_size=64, backend="torch")
    for name in ("cuda", "Triton", "", "numpy"):
        with pytest.raises(ValueError, match="backend"):
            count_changed_tiles(tensor, tensor, 64, backend=name)
        with pytest.raises(ValueError, match="backend"):
            pack_tiles(tensor, counts, tile_size=64, backend=name)
        with pytest.raises(ValueError, match="backend"):
            apply_tiles(tensor.clone(), packed, backend=name)


@pytest.mark.parametrize("setting", [None, "0", "", "true"])
def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch, setting):
    """Kernels decorated without TRITON_INTERPRET=1 cannot take CPU tensors: a clear error. (Triton
    reads the variable when the kernels are imported; the launch module records it then.)"""
    import sparse_rl_optim.kernels.launch as launch

    monkeypatch.setattr(launch, "_INTERPRETING", setting == "1")
    if setting is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", setting)
    old_bits, new_bits = random_pair(11, 300, torch.bfloat16, 0.1)
    old = to_tensor(old_bits, torch.bfloat16, (300,), "cpu")
    new = to_tensor(new_bits, torch.bfloat16, (300,), "cpu")
    counts = torch.from_numpy(naive_tile_counts(old_bits, new_bits, 32))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        count_changed_tiles(old, new, 32, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        pack_tiles(new, counts, tile_size=32, backend="triton")
    packed = pack_tiles(new, counts, tile_size=32, backend="auto")  # CPU tensors: the torch path
    replica = old.clone()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        apply_tiles(replica, packed, backend="triton")
    np.testing.assert_array_equal(raw_bits(replica), old_bits)  # the failed call wrote nothing
    apply_tiles(replica, packed, backend="auto")
    np.testing.assert_array_equal(raw_bits(replica), new_bits)
