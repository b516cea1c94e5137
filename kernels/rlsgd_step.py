"""The fused RLSGD step kernel: one pass over weight, gradient (and momentum buffer) that writes
the new weight and, in the same pass, counts per tile the elements whose stored bits changed.

Many tensors share one launch, as ``torch._foreach`` / multi-tensor-apply do: the launcher passes
per-tensor tables (storage addresses, sizes, seeds) and a per-block table (which tensor, which
element range), so a model with hundreds of small tensors pays a few launches, not one per tensor.
Each program handles ``BLOCK`` elements of one tensor; blocks start at multiples of ``BLOCK``
within their tensor and ``BLOCK`` is a multiple of ``TILE``, so a block holds whole tiles.

Per-block outputs (block ``b`` owns ``BLOCK // TILE`` tile slots, ``BLOCK // 32`` bit-set words and
``BLOCK`` old-bits slots): tiles past a tensor's end count 0.

The formula is :func:`sparse_rl_optim.optim.sgd._single_tensor_rlsgd`, op by op in fp32. Launch
with ``enable_fp_fusion=False``: a GPU would otherwise fuse ``p - lr * d`` into one FMA and round
once where the reference rounds twice.
"""

import triton
import triton.language as tl

from sparse_rl_optim.kernels.bits import (
    BF16,
    FP32,
    fp32_to_bf16_bits_rtne,
    fp32_to_bf16_bits_stochastic,
    fp32_to_fp16_bits_rtne,
    fp32_to_fp16_bits_stochastic,
    load_as_fp32,
    random_bits16,
)


@triton.jit
def _tensor_address(table, tensor, ALIGNED: tl.constexpr):
    address = tl.load(table + tensor)
    if ALIGNED:
        # The launcher checked that every address is a multiple of 16 bytes: lets the compiler
        # use vector loads and stores through the integer-to-pointer casts.
        address = tl.multiple_of(address, 16)
    return address


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
    tile_intended,
    tile_swallowed,
    tile_old_checksum,
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
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_tensor + block)
    # int64, so element offsets are safe beyond 2**31; a multiple of BLOCK by construction (the hint
    # lets the compiler vectorise the loads).
    start = tl.multiple_of(tl.load(block_start + block), BLOCK)
    numel = tl.load(numels + tensor)
    local = tl.arange(0, BLOCK)
    offsets = start + local
    inside = offsets < numel

    param_address = _tensor_address(param_addresses, tensor, ALIGNED)
    grad_address = _tensor_address(grad_addresses, tensor, ALIGNED)
    old32, old_stored = load_as_fp32(param_address, offsets, inside, PARAM_KIND)
    direction, _ = load_as_fp32(grad_address, offsets, inside, GRAD_KIND)
    if MAXIMIZE:
        direction = -direction

    if HAS_MOMENTUM:
        buffer_ptr = _tensor_address(buffer_addresses, tensor, ALIGNED).to(tl.pointer_type(tl.float32))
        is_first = tl.load(first_step + tensor) != 0
        # A fresh buffer holds garbage (perhaps NaN); tl.where below discards it on the first step.
        old_buffer = tl.load(buffer_ptr + offsets, mask=inside, other=0.0)
        running = old_buffer * momentum + direction * dampening_keep
        buffer = tl.where(is_first, direction, running)
        tl.store(buffer_ptr + offsets, buffer, mask=inside)
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
        random16 = random_bits16(tl.load(stream_offsets + tensor) + offsets, tl.load(seed_mixes + tensor))
    if PARAM_KIND == FP32:
        new_stored = new32.to(tl.uint32, bitcast=True)
        # The gate view of an fp32 weight: the bf16 value an inference engine would load.
        old_gate = fp32_to_bf16_bits_rtne(old32)
        new_gate = fp32_to_bf16_bits_rtne(new32)
        tl.store(
            param_address.to(tl.pointer_type(tl.float32)) + offsets, new32, mask=inside & (new_stored != old_stored)
        )
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
        # Unchanged elements are not written back: RL leaves ~99% of bf16 weights bit-identical.
        tl.store(
            param_address.to(tl.pointer_type(tl.uint16)) + offsets,
            new_stored.to(tl.uint16),
            mask=inside & (new_stored != old_stored),
        )

    changed = inside & (new_gate != old_gate)
    TILES: tl.constexpr = BLOCK // TILE
    tile_slots = block * TILES + tl.arange(0, TILES)
    if COUNT_TILES:
        tl.store(tile_changed + tile_slots, tl.sum(tl.reshape(changed.to(tl.int32), (TILES, TILE)), axis=1))
    if GATE_STATS:
        intended = inside & (scaled_update != 0.0)
        swallowed = intended & (new_gate == old_gate)
        tl.store(tile_intended + tile_slots, tl.sum(tl.reshape(intended.to(tl.int32), (TILES, TILE)), axis=1))
        tl.store(tile_swallowed + tile_slots, tl.sum(tl.reshape(swallowed.to(tl.int32), (TILES, TILE)), axis=1))
    if RECORD:
        # What the tracker needs instead of a snapshot: the old 16-bit patterns, a per-tile
        # checksum of them (sum as int16, to catch edits made between steps) and a change bit-set.
        old_signed = tl.where(inside, old_gate.to(tl.uint16).to(tl.int16, bitcast=True).to(tl.int32), 0)
        tl.store(tile_old_checksum + tile_slots, tl.sum(tl.reshape(old_signed, (TILES, TILE)), axis=1))
        tl.store(old_gate_bits + block * BLOCK + local, old_gate.to(tl.uint16).to(tl.int16, bitcast=True))
        WORDS: tl.constexpr = BLOCK // 32
        bit_values = changed.to(tl.uint32) << (local % 32).to(tl.uint32)
        words = tl.sum(tl.reshape(bit_values, (WORDS, 32)), axis=1)
        tl.store(changed_words + block * WORDS + tl.arange(0, WORDS), words.to(tl.int32, bitcast=True))
