"""Tile geometry: the one home for how a tensor is cut into dense tiles, and the tile operations.

A tensor's tiles are contiguous runs of ``tile_size`` elements of its flattened, row-major storage:
tile ``t`` holds elements ``[t * tile_size, min((t + 1) * tile_size, numel))``; the last tile of a
tensor may be partial, and tiles never cross from one tensor into the next. The step kernel, the
compaction and apply kernels, the tracker, the dense-block optimizers and the deltas all use this
module, so a tile id means the same elements everywhere.

Why contiguous 1-D runs of 64 (measured by ``bench/bench_tile_geometry.py`` on the demo's GRPO run
with RLSGD, ``bench/results/tile_geometry.json``): the changes cluster along rows, so at equal size
1-D runs leave fewer tiles active than 2-D blocks (30% vs 34% active per step at 64 elements, 59% vs
66% at 256; random placement: 37% and 71%), and smaller tiles ship fewer bytes (active tiles cover
21% of the weights at 32 elements, 31% at 64, 59% at 256, 86% at 1024). 64 bf16 elements are 128
bytes, one cache line read by 8 threads with 16-byte loads, and the 4-byte tile id adds 3%. On a GPU
a 1-D tile is one coalesced memory range whatever the tensor's shape (biases, fused QKV, flat
shards), its index math is one multiply, and a packed tile is a plain slice. At ~1% changed elements
even 64-element tiles carry ~25x the changed bytes: tiles are the unit of dense GPU work, while the
wire format of deltas should send the changed elements themselves.

The tile operations (``count_changed_tiles``, ``pack_tiles``, ``apply_tiles``) run Triton kernels on
CUDA tensors (and on CPU tensors under ``TRITON_INTERPRET=1`` with ``backend="triton"``), and the
torch reference otherwise; both give identical results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_rl_optim._backend import check_triton_available, resolve_backend
from sparse_rl_optim.bf16 import gate_view_bits

__all__ = [
    "DEFAULT_TILE_SIZE",
    "MAX_TILE_SIZE",
    "MIN_TILE_SIZE",
    "PackedTiles",
    "active_tile_ids",
    "apply_tiles",
    "check_tile_size",
    "count_changed_tiles",
    "num_tiles",
    "pack_tiles",
    "tile_bounds",
    "tile_of_elements",
]

#: Default elements per tile. See the module docstring and bench/bench_tile_geometry.py.
DEFAULT_TILE_SIZE = 64
#: A tile is a power of two between these (a kernel block then holds whole tiles, a bit-set word
#: of 32 elements never straddles two tiles, and a tile's sum of 16-bit patterns fits an int32).
MIN_TILE_SIZE = 32
MAX_TILE_SIZE = 16384


def check_tile_size(tile_size: int) -> int:
    """``tile_size`` if it is a power of two in ``[MIN_TILE_SIZE, MAX_TILE_SIZE]``; else ``ValueError``."""
    if (
        not isinstance(tile_size, int)
        or isinstance(tile_size, bool)
        or not MIN_TILE_SIZE <= tile_size <= MAX_TILE_SIZE
        or tile_size & (tile_size - 1)
    ):
        raise ValueError(f"tile_size must be a power of two in [{MIN_TILE_SIZE}, {MAX_TILE_SIZE}], got {tile_size!r}")
    return tile_size


def num_tiles(numel: int, tile_size: int = DEFAULT_TILE_SIZE) -> int:
    """Tiles of a tensor with ``numel`` elements: ``ceil(numel / tile_size)`` (0 for an empty tensor)."""
    return -(-numel // check_tile_size(tile_size))


def tile_bounds(tile_id: int, numel: int, tile_size: int = DEFAULT_TILE_SIZE) -> tuple[int, int]:
    """Element range ``[start, stop)`` of tile ``tile_id``: ``start = tile_id * tile_size``,
    ``stop = min(start + tile_size, numel)`` (the last tile may be partial)."""
    if not 0 <= tile_id < num_tiles(numel, tile_size):
        raise IndexError(f"tile {tile_id} out of range for {numel} elements in tiles of {tile_size}")
    start = tile_id * tile_size
    return start, min(start + tile_size, numel)


def tile_of_elements(element_indices: Tensor, tile_size: int = DEFAULT_TILE_SIZE) -> Tensor:
    """Tile id of each flat element index: ``index // tile_size`` (int64, safe beyond 2**31)."""
    return torch.div(element_indices.to(torch.int64), check_tile_size(tile_size), rounding_mode="floor")


def active_tile_ids(tile_counts: Tensor) -> Tensor:
    """Sorted ids (int64) of the tiles with a non-zero count."""
    return tile_counts.nonzero().reshape(-1)


@dataclass
class PackedTiles:
    """The active tiles of one tensor, packed densely.

    ``tile_ids``: sorted int64 ids of the packed tiles; ``values``: ``[len(tile_ids), tile_size]``
    in the tensor's dtype (elements past the end of a partial last tile are zero);
    ``numel``/``shape``: of the source tensor; ``xor``: when packed with ``xor_with``, the values are
    the XOR of the two tensors' bit patterns instead (what changed, bit by bit).
    """

    tile_ids: Tensor
    values: Tensor
    numel: int
    shape: tuple[int, ...]
    tile_size: int
    xor: bool = False

    def nbytes(self) -> int:
        """Bytes of the packed ids and values."""
        return self.tile_ids.numel() * self.tile_ids.element_size() + self.values.numel() * self.values.element_size()


# -- dispatch ----------------------------------------------------------------------------------


def _use_triton(backend: str, *tensors: Tensor) -> bool:
    if resolve_backend(backend, list(tensors)) == "torch":
        return False
    for device in {t.device for t in tensors}:
        check_triton_available(device, "backend='triton'")
    return True


def _flat_bits(tensor: Tensor) -> Tensor:
    """Flat 16-bit gate view (int16) of any floating tensor; the raw 32-bit pattern is not used."""
    return gate_view_bits(tensor.detach()).reshape(-1)


def _check_same_layout(old: Tensor, new: Tensor) -> None:
    if old.shape != new.shape:
        raise ValueError(f"tensors differ in shape: {tuple(old.shape)} vs {tuple(new.shape)}")
    if old.dtype != new.dtype:
        raise ValueError(f"tensors differ in dtype: {old.dtype} vs {new.dtype}")
    if old.device != new.device:
        raise ValueError(f"tensors are on different devices: {old.device} vs {new.device}")


def count_changed_tiles(
    old: Tensor, new: Tensor, tile_size: int = DEFAULT_TILE_SIZE, *, backend: str = "auto"
) -> Tensor:
    """Per tile, the number of elements whose gate view changed: ``sum(bits(old) != bits(new))``
    over each tile (int32, ``num_tiles(numel)`` entries). The gate view is the stored 16 bits of
    bf16/fp16 tensors and the bf16 rounding of fp32 ones (see :mod:`sparse_rl_optim.bf16`)."""
    _check_same_layout(old, new)
    check_tile_size(tile_size)
    if _use_triton(backend, old, new):
        from sparse_rl_optim.kernels.launch import count_changed_tiles_triton

        return count_changed_tiles_triton(_flat_bits(old), _flat_bits(new), tile_size)
    changed = (_flat_bits(old) != _flat_bits(new)).to(torch.int32)
    return _sum_per_tile(changed, tile_size)


def _sum_per_tile(values: Tensor, tile_size: int) -> Tensor:
    """Per-tile sums of a flat int32 tensor (the last tile padded with zeros)."""
    numel = values.numel()
    padded = torch.zeros(num_tiles(numel, tile_size) * tile_size, dtype=torch.int32, device=values.device)
    padded[:numel] = values
    return padded.view(-1, tile_size).sum(dim=1, dtype=torch.int32)


def pack_tiles(
    tensor: Tensor,
    tile_counts: Tensor | None = None,
    *,
    tile_ids: Tensor | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    xor_with: Tensor | None = None,
    backend: str = "auto",
) -> PackedTiles:
    """Gather the active tiles of ``tensor`` into a dense ``[n_active, tile_size]`` buffer.

    Active tiles are those with a non-zero ``tile_counts`` entry (from :func:`count_changed_tiles`
    or the step kernel), in increasing order, or the given sorted ``tile_ids``. With ``xor_with``
    (a tensor of the same shape and dtype, e.g. the old weights) the packed values are the XOR of the
    two bit patterns. On the Triton path the slots come from a prefix sum over the counts, so the
    output is deterministic.
    """
    if (tile_counts is None) == (tile_ids is None):
        raise ValueError("pass exactly one of tile_counts and tile_ids")
    check_tile_size(tile_size)
    n_tiles = num_tiles(tensor.numel(), tile_size)
    if xor_with is not None:
        _check_same_layout(tensor, xor_with)
    if tile_counts is not None and (tile_counts.dim() != 1 or tile_counts.numel() != n_tiles):
        raise ValueError(
            f"tile_counts has {tile_counts.numel()} entries (shape {tuple(tile_counts.shape)}), "
            f"the tensor has {n_tiles} tiles: pass a 1-D tensor with one entry per tile"
        )
    if tile_ids is not None:
        tile_ids = _check_tile_ids(tile_ids.to(tensor.device), n_tiles)
    source = tensor.detach().contiguous().reshape(-1)
    other = xor_with.detach().contiguous().reshape(-1) if xor_with is not None else None
    if _use_triton(backend, tensor):
        from sparse_rl_optim.kernels.launch import pack_tiles_triton

        ids, values = pack_tiles_triton(source, other, tile_counts, tile_ids, tile_size)
    else:
        ids = active_tile_ids(tile_counts) if tile_ids is None else tile_ids
        values = _pack_reference(source, other, ids, tile_size)
    return PackedTiles(ids, values, tensor.numel(), tuple(tensor.shape), tile_size, xor=other is not None)


def _pack_reference(source: Tensor, other: Tensor | None, tile_ids: Tensor, tile_size: int) -> Tensor:
    numel = source.numel()
    element, inside = _tile_elements(tile_ids, tile_size, numel)
    values = torch.zeros(tile_ids.numel(), tile_size, dtype=source.dtype, device=source.device)
    values[inside] = source[element[inside]]
    if other is not None:
        integer = _bits_dtype(source.dtype)
        xored = values.view(integer).clone()
        xored[inside] ^= other[element[inside]].view(integer)
        values = xored.view(source.dtype)
    return values


_BITS_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _tile_elements(tile_ids: Tensor, tile_size: int, numel: int) -> tuple[Tensor, Tensor]:
    """Flat element indices ``[len(tile_ids), tile_size]`` of the given tiles, and which of them lie
    inside the tensor (a partial last tile)."""
    element = tile_ids.unsqueeze(1) * tile_size + torch.arange(tile_size, device=tile_ids.device)
    return element, element < numel


def _bits_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype of the same width, to move raw bit patterns."""
    size = torch.empty(0, dtype=dtype).element_size()
    if size not in _BITS_DTYPES or dtype.is_complex:
        raise TypeError(f"tile operations move 1-, 2-, 4- or 8-byte real elements, not {dtype}")
    return _BITS_DTYPES[size]


def _check_tile_ids(tile_ids: Tensor, n_tiles: int) -> Tensor:
    """``tile_ids`` as int64 after checking they are 1-D, sorted, distinct and in ``[0, n_tiles)``."""
    if tile_ids.dim() != 1:
        raise ValueError(f"tile_ids must be a 1-D tensor, got shape {tuple(tile_ids.shape)}")
    if tile_ids.is_floating_point() or tile_ids.is_complex() or tile_ids.dtype == torch.bool:
        raise TypeError(f"tile_ids must be integers, got {tile_ids.dtype}")
    tile_ids = tile_ids.to(torch.int64)
    if tile_ids.numel() and (
        int(tile_ids.min()) < 0 or int(tile_ids.max()) >= n_tiles or bool((tile_ids.diff() <= 0).any())
    ):
        raise ValueError(f"tile_ids must be sorted, distinct and in [0, {n_tiles})")
    return tile_ids


def apply_tiles(replica: Tensor, packed: PackedTiles, *, backend: str = "auto") -> Tensor:
    """Write packed tiles into ``replica`` (same shape and dtype as the packed tensor) in place and
    return it: bit-exact. A packed XOR is XOR-ed into the replica's bits (old -> new)."""
    if tuple(replica.shape) != packed.shape or replica.dtype != packed.values.dtype:
        raise ValueError(
            f"replica {tuple(replica.shape)} {replica.dtype} does not match the packed tensor "
            f"{packed.shape} {packed.values.dtype}"
        )
    if not replica.is_contiguous():
        raise ValueError("apply_tiles needs a contiguous replica (tiles are runs of its flat storage)")
    check_tile_size(packed.tile_size)
    if packed.numel != replica.numel():
        raise ValueError(f"packed.numel is {packed.numel}, the replica has {replica.numel()} elements")
    tile_ids = _check_tile_ids(packed.tile_ids.to(replica.device), num_tiles(replica.numel(), packed.tile_size))
    if tuple(packed.values.shape) != (tile_ids.numel(), packed.tile_size):
        raise ValueError(
            f"packed.values has shape {tuple(packed.values.shape)}, expected "
            f"({tile_ids.numel()}, {packed.tile_size}): one row of tile_size values per tile id"
        )
    target = replica.detach().view(-1)
    values = packed.values.to(replica.device)
    if _use_triton(backend, replica):
        from sparse_rl_optim.kernels.launch import apply_tiles_triton

        apply_tiles_triton(target, values, tile_ids, packed.tile_size, packed.xor)
        return replica
    element, inside = _tile_elements(tile_ids, packed.tile_size, packed.numel)
    if packed.xor:
        integer = _bits_dtype(target.dtype)
        bits = target.view(integer)
        bits[element[inside]] ^= values.view(integer)[inside]
    else:
        target[element[inside]] = values[inside]
    return replica
