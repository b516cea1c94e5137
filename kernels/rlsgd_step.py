"""The fused RLSGD step kernel: one pass over weight, gradient (and momentum buffer) that writes
the new weight and, in the same pass, counts per tile the elements whose stored bits changed.

Many tensors share one launch, as ``torch._foreach`` / multi-tensor-apply do: the launcher passes
per-tensor tables (storage addresses, sizes, seeds) and a per-block table (which tensor, which
element range), so a model with hundreds of small tensors pays a few launches, not one per tensor.
Each program handles ``BLOCK`` elements of one tensor; blocks start at multiples of ``BLOCK``
within their tensor and ``BLOCK`` is a multiple of ``TILE``, so a block holds whole tiles.

Outputs are indexed by block: block ``b`` owns ``BLOCK // TILE`` tile-count slots (tiles past a
tensor's end count 0), one slot of each per-block sum (intended, swallowed, old-bits checksum),
``BLOCK // 32`` change bit-set words and ``BLOCK`` old-bits slots.

Full blocks take a path without masks (so loads and stores vectorise); only a tensor's last block
is masked.

The formula is :func:`sparse_rl_optim.optim.sgd._single_tensor_rlsgd`, op by op in fp32. Launch
with ``enable_fp_fusion=False``: a GPU would otherwise fuse ``p - lr * d`` into one FMA and round
once where the reference rounds twice.
"""

import triton
import triton.language as tl

from sparse_rl_optim.kernels.bits import (
    BF16,
    FP32,
    element_pointers,
    fp32_to_bf16_bits_rtne,
    fp32_to_bf16_bits_stochastic,
    fp32_to_fp16_bits_rtne,
    fp32_to_fp16_bits_stochastic,
    load_as_fp32,
    masked_load,
    masked_store,
    negate32,
    random_bits16,
)


@triton.jit
def _and(mask, condition):
    """``mask & condition`` where ``mask`` may be None (a full block)."""
    if mask is None:
        return condition
    else:
        return mask & condition


@triton.jit
def _step_block(
    block,
    local,
    offsets,
    inside,
    param_address,
    grad_address,
    buffer_address,
    is_first,
    seed_mix,
    stream_offset,
    tile_changed,
    block_intended,
    block_swallowed,
    block_old_checksum,
    changed_words,
    old_gate_bits,
    lr,
    decay,
    momentum,
    dampening_keep,
    PARAM_KIND: tl.constexpr,
    GRAD_KIND: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    COUNT_TILES: tl.constexpr,
    GATE_STATS: tl.constexpr,
    RECORD: tl.constexpr,
    SKIP_UNCHANGED_WRITES: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
):
    """One block of the step; ``inside`` is the in-bounds mask, or None for a full block."""
    old32, old_stored = load_as_fp32(param_address, offsets, inside, PARAM_KIND, ALIGNED)
    direction, _ = load_as_fp32(grad_address, offsets, inside, GRAD_KIND, ALIGNED)
    if MAXIMIZE:
        direction = negate32(direction)

    if HAS_MOMENTUM:
        buffer_pointers = element_pointers(buffer_address, offsets, tl.float32, ALIGNED)
        # A fresh buffer holds garbage (perhaps NaN); tl.where below discards it on the first step.
        old_buffer = masked_load(buffer_pointers, inside, 0.0)
        running = old_buffer * momentum + direction * dampening_keep
        buffer = tl.where(is_first, direction, running)
        masked_store(buffer_pointers, buffer, inside)
        if NESTEROV:
            direction = direction + buffer * momentum
        else:
            direction = buffer

    param32 = old32
    if HAS_DECAY:
        param32 = param32 * decay
    scaled_update = direction * lr
    new32 = param32 - scaled_update

    if STOCHASTIC:
        random16 = random_bits16(stream_offset + offsets, seed_mix)
    if PARAM_KIND == FP32:
        new_stored = new32.to(tl.uint32, bitcast=True)
        # The gate view of an fp32 weight: the bf16 value an inference engine would load.
        old_gate = fp32_to_bf16_bits_rtne(old32)
        new_gate = fp32_to_bf16_bits_rtne(new32)
        store_values = new32
        store_pointers = element_pointers(param_address, offsets, tl.float32, ALIGNED)
    else:
        if PARAM_KIND == BF16:
            if STOCHASTIC:
                new_stored = fp32_to_bf16_bits_stochastic(new32, random16)
            else:
                new_stored = fp32_to_bf16_bits_rtne(new32)
        else:
            if STOCHASTIC:
                new_stored = fp32_to_fp16_bits_stochastic(new32, random16)
            else:
                new_stored = fp32_to_fp16_bits_rtne(new32)
        old_gate = old_stored
        new_gate = new_stored
        store_values = new_stored.to(tl.uint16)
        store_pointers = element_pointers(param_address, offsets, tl.uint16, ALIGNED)
    if SKIP_UNCHANGED_WRITES:
        # RL leaves ~99% of bf16 weights bit-identical: predicated stores write only the rest.
        tl.store(store_pointers, store_values, mask=_and(inside, new_stored != old_stored))
    else:
        masked_store(store_pointers, store_values, inside)

    changed = _and(inside, new_gate != old_gate)
    TILES: tl.constexpr = BLOCK // TILE
    if COUNT_TILES:
        tile_slots = block * TILES + tl.arange(0, TILES)
        tl.store(tile_changed + tile_slots, tl.sum(tl.reshape(changed.to(tl.int32), (TILES, TILE)), axis=1))
    if GATE_STATS:
        intended = _and(inside, scaled_update != 0.0)
        swallowed = intended & (new_gate == old_gate)
        tl.store(block_intended + block, tl.sum(intended.to(tl.int32), axis=0))
        tl.store(block_swallowed + block, tl.sum(swallowed.to(tl.int32), axis=0))
    if RECORD:
        # What the tracker needs instead of a snapshot: the old 16-bit patterns, a checksum of them
        # (sum as int16, to catch edits made between steps) and a change bit-set.
        old_signed = old_gate.to(tl.uint16).to(tl.int16, bitcast=True)
        if inside is None:
            checksum_terms = old_signed.to(tl.int32)
        else:
            checksum_terms = tl.where(inside, old_signed.to(tl.int32), 0)
        tl.store(block_old_checksum + block, tl.sum(checksum_terms, axis=0))
        tl.store(old_gate_bits + block * BLOCK + local, old_signed)
        WORDS: tl.constexpr = BLOCK // 32
        bit_values = changed.to(tl.uint32) << (local % 32).to(tl.uint32)
        words = tl.sum(tl.reshape(bit_values, (WORDS, 32)), axis=1)
        tl.store(changed_words + block * WORDS + tl.arange(0, WORDS), words.to(tl.int32, bitcast=True))


@triton.jit
def rlsgd_step_kernel(
    # per tensor
    param_addresses,
    grad_addresses,
    buffer_addresses,
    numels,
    seed_mixes,
    stream_offsets,
    first_step,
    # per block
    block_tensor,
    block_start,
    # outputs, indexed by block
    tile_changed,
    block_intended,
    block_swallowed,
    block_old_checksum,
    changed_words,
    old_gate_bits,
    # runtime scalars (never constexpr: a new lr must not compile a new kernel)
    lr,
    decay,
    momentum,
    dampening_keep,
    PARAM_KIND: tl.constexpr,
    GRAD_KIND: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    COUNT_TILES: tl.constexpr,
    GATE_STATS: tl.constexpr,
    RECORD: tl.constexpr,
    SKIP_UNCHANGED_WRITES: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_tensor + block)
    # int64, so element offsets are safe beyond 2**31; a multiple of BLOCK by construction.
    start = tl.multiple_of(tl.load(block_start + block), BLOCK)
    numel = tl.load(numels + tensor)
    local = tl.arange(0, BLOCK)
    offsets = start + local
    param_address = tl.load(param_addresses + tensor)
    grad_address = tl.load(grad_addresses + tensor)
    buffer_address = tl.load(buffer_addresses + tensor)
    is_first = tl.load(first_step + tensor) != 0
    seed_mix = tl.load(seed_mixes + tensor)
    stream_offset = tl.load(stream_offsets + tensor)
    if start + BLOCK <= numel:
        _step_block(
            block, local, offsets, None, param_address, grad_address, buffer_address, is_first, seed_mix,
            stream_offset, tile_changed, block_intended, block_swallowed, block_old_checksum, changed_words,
            old_gate_bits, lr, decay, momentum, dampening_keep, PARAM_KIND, GRAD_KIND, HAS_MOMENTUM, NESTEROV,
            MAXIMIZE, STOCHASTIC, HAS_DECAY, COUNT_TILES, GATE_STATS, RECORD, SKIP_UNCHANGED_WRITES, ALIGNED,
            BLOCK, TILE,
        )  # fmt: skip
    else:
        # The tail's mask in int32 (0 < numel - start < BLOCK): int64 compares of 16 offsets per thread
        # raised the register count of the whole kernel from 64 to 162 (sm_90, triton 3.6, momentum).
        _step_block(
            block, local, offsets, local < (numel - start).to(tl.int32), param_address, grad_address,
            buffer_address, is_first, seed_mix, stream_offset, tile_changed, block_intended, block_swallowed, block_old_checksum,
            changed_words, old_gate_bits, lr, decay, momentum, dampening_keep, PARAM_KIND, GRAD_KIND,
            HAS_MOMENTUM, NESTEROV, MAXIMIZE, STOCHASTIC, HAS_DECAY, COUNT_TILES, GATE_STATS, RECORD,
            SKIP_UNCHANGED_WRITES, ALIGNED, BLOCK, TILE,
        )  # fmt: skip
