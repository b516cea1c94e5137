"""Tile kernels: count changed elements per tile, pack active tiles densely, apply packed tiles.

Tile geometry is :mod:`sparse_rl_optim.tiles` (tiles are contiguous runs of ``TILE`` elements of a
flat tensor). The kernels move raw bit patterns (tensors viewed as int16/int32/int64), so one
kernel serves every dtype and the results are bit-exact by construction.
"""

import triton
import triton.language as tl


@triton.jit
def count_changed_tiles_kernel(old_bits, new_bits, tile_counts, numel, BLOCK: tl.constexpr, TILE: tl.constexpr):
    """``tile_counts[t] = sum(old_bits[i] != new_bits[i] for i in tile t)``; a program owns
    ``BLOCK // TILE`` whole tiles."""
    block = tl.program_id(0).to(tl.int64)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    old = tl.load(old_bits + offsets, mask=inside, other=0)
    new = tl.load(new_bits + offsets, mask=inside, other=0)
    changed = (inside & (old != new)).to(tl.int32)
    TILES: tl.constexpr = BLOCK // TILE
    tiles = block * TILES + tl.arange(0, TILES)  # int64: no overflow near 2**31 elements
    tl.store(tile_counts + tiles, tl.sum(tl.reshape(changed, (TILES, TILE)), axis=1), mask=tiles * TILE < numel)


@triton.jit
def pack_tiles_kernel(source, other, tile_slots, packed_ids, packed, numel, XOR: tl.constexpr, TILE: tl.constexpr):
    """Program ``t`` copies tile ``t`` into row ``tile_slots[t]`` of ``packed`` (and ``t`` into
    ``packed_ids``) when the slot is not -1. The slots are a prefix sum over the active tiles, so the
    rows come out sorted by tile id whatever order the programs run in."""
    tile = tl.program_id(0).to(tl.int64)
    slot = tl.load(tile_slots + tile)
    if slot >= 0:
        offsets = tile * TILE + tl.arange(0, TILE)
        inside = offsets < numel
        values = tl.load(source + offsets, mask=inside, other=0)
        if XOR:
            values = values ^ tl.load(other + offsets, mask=inside, other=0)
        tl.store(packed + slot * TILE + tl.arange(0, TILE), values)
        tl.store(packed_ids + slot, tile)


@triton.jit
def apply_tiles_kernel(target, packed_ids, packed, numel, XOR: tl.constexpr, TILE: tl.constexpr):
    """Program ``s`` writes row ``s`` of ``packed`` into tile ``packed_ids[s]`` of ``target``
    (XOR-ing it into the bits when ``XOR``); elements past the end of a partial tile are skipped."""
    slot = tl.program_id(0).to(tl.int64)
    tile = tl.load(packed_ids + slot)
    offsets = tile * TILE + tl.arange(0, TILE)
    inside = (offsets >= 0) & (offsets < numel)  # apply_tiles validated the ids; never write outside
    values = tl.load(packed + slot * TILE + tl.arange(0, TILE))
    if XOR:
        values = values ^ tl.load(target + offsets, mask=inside, other=0)
    tl.store(target + offsets, values, mask=inside)


@triton.jit
def pack_block_tiles_kernel(
    addresses,
    numels,
    block_tensor,
    block_start,
    tile_slots,
    packed_ids,
    packed,
    ELEMENT_BYTES: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
):
    """Multi-tensor pack in the step kernel's block layout: program ``b`` owns the ``BLOCK // TILE``
    tiles of block ``b`` (of tensor ``block_tensor[b]``) and copies each active one (slot >= 0) into
    row ``slot`` of ``packed``, its tile id (within its tensor) into ``packed_ids[slot]``. Masked loads
    of inactive tiles move no memory."""
    block = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_tensor + block)
    start = tl.multiple_of(tl.load(block_start + block), BLOCK)
    numel = tl.load(numels + tensor)
    if ELEMENT_BYTES == 2:
        source = tl.load(addresses + tensor).to(tl.pointer_type(tl.int16))
    elif ELEMENT_BYTES == 4:
        source = tl.load(addresses + tensor).to(tl.pointer_type(tl.int32))
    else:
        source = tl.load(addresses + tensor).to(tl.pointer_type(tl.int64))
    TILES: tl.constexpr = BLOCK // TILE
    tile_in_block = tl.arange(0, TILES)
    slots = tl.load(tile_slots + block * TILES + tile_in_block)
    local = tile_in_block[:, None] * TILE + tl.arange(0, TILE)[None, :]
    pointers = source + start + local
    if ALIGNED:
        # 16-byte aligned tensor, blocks at multiples of BLOCK: rows of TILE contiguous elements.
        pointers = tl.max_contiguous(tl.multiple_of(pointers, [1, 16]), [1, 16])
    active = (slots >= 0)[:, None]
    if start + BLOCK <= numel:
        values = tl.load(pointers, mask=active, other=0)  # per-tile mask: vector loads
    else:
        values = tl.load(pointers, mask=active & (local < (numel - start).to(tl.int32)), other=0)
    tl.store(packed + slots[:, None] * TILE + tl.arange(0, TILE)[None, :], values, mask=active)
    tl.store(packed_ids + slots, start // TILE + tile_in_block, mask=slots >= 0)
