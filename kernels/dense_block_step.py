"""The fused dense-block step: gather the active tiles of each tensor, update them with AdamW or SGD
against dense fp32 state rows, and scatter the new weights back, in one pass.

The formulas are :func:`sparse_rl_optim.optim.dense_block_functional._single_tensor_dense_block_adamw`
and ``_single_tensor_dense_block_sgd`` (the ground truth), op by op in fp32, each operation rounded
separately. AdamW, for a tile whose step count becomes ``s`` (``tile_steps`` incremented here)::

    g     = fp32(grad)                                (-g with MAXIMIZE)
    m     = m * beta1 + g * (1 - beta1)
    v     = v * beta2 + (g * g) * (1 - beta2)
    denom = sqrt_rn(v) / bias_table[s, 1] + eps        (bias_table[s, 1] = fp32(sqrt(1 - beta2**s)))
    p32   = fp32(p) * decay                            (HAS_DECAY; decay = fp32(1 - lr * wd))
    p     = rtne(p32 - (lr / bias_table[s, 0]) * (m / denom))

SGD (RLSGD's formula on the tiles; the buffer exists with HAS_MOMENTUM only)::

    g     = fp32(grad)                                (-g with MAXIMIZE)
    buf   = g if tile_steps == 0 else buf * momentum + g * dampening_keep     (tile_steps += 1)
    d     = g + buf * momentum if NESTEROV else buf   (d = g without momentum)
    p     = rtne(fp32(p) * decay - d * lr)

Bit-exactness with the torch reference, on a GPU and in the interpreter:

* launch with ``enable_fp_fusion=False``: a GPU would otherwise contract ``a * b + c`` into one FMA
  (one rounding where the reference rounds twice);
* divisions and the square root are ``tl.div_rn`` / ``tl.sqrt_rn``: Triton's plain ``/`` and
  ``tl.sqrt`` on fp32 are approximate on NVIDIA GPUs (``div.full``, ``sqrt.approx``); the ``_rn``
  forms are IEEE-correct there and in the interpreter (the reference takes its root in float64 and
  rounds once, which is the correctly rounded fp32 root);
* the fp32 -> bf16 rounding is the integer RTNE of :mod:`.bits` (the interpreter truncates casts).

Layout. A tensor's tile ``t`` is its flat elements ``[t * TILE, min((t + 1) * TILE, numel))``. Its
state rows (``[n_rows, TILE]`` fp32; row ``r`` belongs to tile ``tile_ids[r]``, sorted) are read and
written whole, columns past the end of a partial last tile included (their gradient reads as 0, as
in the reference). Many tensors share one launch: per-tensor tables of storage addresses (params,
grads, state rows 1 and 2, tile ids, tile steps), sizes and row counts, and a per-program table
(tensor, first row); program ``b`` updates rows ``[first, first + ROWS)`` of its tensor. A program
whose rows are all present and whose tiles are all whole takes a path without masks, so its loads
and stores vectorise; only a tensor's last program is masked. Element offsets are int64.
"""

import triton
import triton.language as tl

from sparse_rl_optim.kernels.bits import (
    BF16,
    FP32,
    bf16_bits_to_fp32,
    fp16_bits_to_fp32,
    fp32_to_bf16_bits_rtne,
    fp32_to_fp16_bits_rtne,
    masked_load,
    masked_store,
    negate32,
)

#: The update rule (a constexpr per kernel specialisation).
ADAMW: tl.constexpr = tl.constexpr(0)
SGD: tl.constexpr = tl.constexpr(1)


@triton.jit
def _base(address, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A typed pointer to the tensor at integer ``address``. With ``ALIGNED`` (the launcher checked a
    16-byte aligned address) the hint sits on the scalar base: the offsets added to it are runs of
    ``TILE`` contiguous elements starting at multiples of ``TILE``, so loads and stores vectorise."""
    pointer = address.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _load_fp32(address, offsets, mask, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """Elements of a bf16/fp16/fp32 tensor as exact fp32 (0 where masked off; ``mask`` may be None)."""
    if KIND == FP32:
        return masked_load(_base(address, tl.float32, ALIGNED) + offsets, mask, 0.0)
    else:
        bits = masked_load(_base(address, tl.uint16, ALIGNED) + offsets, mask, 0).to(tl.uint32)
        if KIND == BF16:
            return bf16_bits_to_fp32(bits)
        else:
            return fp16_bits_to_fp32(bits)


@triton.jit
def _update_rows(
    rows,
    elements,
    state_offsets,
    row_mask,
    state_mask,
    element_mask,
    param_address,
    grad_address,
    state1_address,
    state2_address,
    step_address,
    bias_table,
    bias_rows,
    lr,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    decay,
    momentum,
    dampening_keep,
    ALGORITHM: tl.constexpr,
    PARAM_KIND: tl.constexpr,
    GRAD_KIND: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """The update of ``ROWS`` tiles. ``rows``: [ROWS] row indices; ``elements``/``state_offsets``:
    [ROWS, TILE] flat element offsets of the tiles and of their state rows; the masks are None on a
    full program, else ``row_mask`` [ROWS] (row present), ``state_mask`` [ROWS, TILE] (row present)
    and ``element_mask`` [ROWS, TILE] (row present and element inside the tensor)."""
    g = _load_fp32(grad_address, elements, element_mask, GRAD_KIND, ALIGNED)
    if MAXIMIZE:
        g = negate32(g)

    if ALGORITHM == ADAMW:
        step_pointers = _base(step_address, tl.int32, ALIGNED) + rows
        steps = masked_load(step_pointers, row_mask, 0) + 1
        masked_store(step_pointers, steps, row_mask)
        # Row s of the table: (fp32(1 - beta1**s), fp32(sqrt(1 - beta2**s))), looked up per tile.
        # Never past the table's end (the caller sizes it by the optimizer's step count, which bounds
        # the tiles' steps; the reference clamps the same way).
        row = tl.minimum(steps, bias_rows - 1)
        bias1 = masked_load(bias_table + 2 * row, row_mask, 1.0)
        bias2_sqrt = masked_load(bias_table + 2 * row + 1, row_mask, 1.0)
        m_pointers = _base(state1_address, tl.float32, ALIGNED) + state_offsets
        v_pointers = _base(state2_address, tl.float32, ALIGNED) + state_offsets
        m = masked_load(m_pointers, state_mask, 0.0)
        v = masked_load(v_pointers, state_mask, 0.0)
        m = m * beta1 + g * one_minus_beta1
        v = v * beta2 + (g * g) * one_minus_beta2
        masked_store(m_pointers, m, state_mask)
        masked_store(v_pointers, v, state_mask)
        denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt[:, None]) + eps
        step_size = tl.div_rn(lr, bias1)
        update = step_size[:, None] * tl.div_rn(m, denom)
    else:
        direction = g
        if HAS_MOMENTUM:
            step_pointers = _base(step_address, tl.int32, ALIGNED) + rows
            steps = masked_load(step_pointers, row_mask, 0)
            masked_store(step_pointers, steps + 1, row_mask)
            buffer_pointers = _base(state1_address, tl.float32, ALIGNED) + state_offsets
            # A fresh tile's row holds whatever was there (perhaps NaN): tl.where discards it.
            old_buffer = masked_load(buffer_pointers, state_mask, 0.0)
            running = old_buffer * momentum + direction * dampening_keep
            buffer = tl.where((steps == 0)[:, None], direction, running)
            masked_store(buffer_pointers, buffer, state_mask)
            if NESTEROV:
                direction = direction + buffer * momentum
            else:
                direction = buffer
        update = direction * lr

    param32 = _load_fp32(param_address, elements, element_mask, PARAM_KIND, ALIGNED)
    if HAS_DECAY:
        param32 = param32 * decay
    new32 = param32 - update
    if PARAM_KIND == FP32:
        masked_store(_base(param_address, tl.float32, ALIGNED) + elements, new32, element_mask)
    else:
        if PARAM_KIND == BF16:
            new_bits = fp32_to_bf16_bits_rtne(new32)
        else:
            new_bits = fp32_to_fp16_bits_rtne(new32)
        masked_store(_base(param_address, tl.uint16, ALIGNED) + elements, new_bits.to(tl.uint16), element_mask)


@triton.jit
def dense_block_step_kernel(
    # per tensor
    param_addresses,
    grad_addresses,
    state1_addresses,
    state2_addresses,
    tile_id_addresses,
    tile_step_addresses,
    numels,
    row_counts,
    # per program
    block_tensor,
    block_row,
    # fp32 [bias_rows, 2]: (bias1, bias2_sqrt) per step count (AdamW)
    bias_table,
    bias_rows,
    # runtime scalars, fp32 (never constexpr: a new lr must not compile a new kernel)
    lr,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    decay,
    momentum,
    dampening_keep,
    ALGORITHM: tl.constexpr,
    PARAM_KIND: tl.constexpr,
    GRAD_KIND: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    ALIGNED: tl.constexpr,
    ROWS: tl.constexpr,
    TILE: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_tensor + program)
    first_row = tl.multiple_of(tl.load(block_row + program), ROWS)  # int64, a multiple of ROWS
    n_rows = tl.load(row_counts + tensor)
    numel = tl.load(numels + tensor)
    param_address = tl.load(param_addresses + tensor)
    grad_address = tl.load(grad_addresses + tensor)
    state1_address = tl.load(state1_addresses + tensor)
    state2_address = tl.load(state2_addresses + tensor)
    step_address = tl.load(tile_step_addresses + tensor)
    id_pointer = _base(tl.load(tile_id_addresses + tensor), tl.int64, ALIGNED)
    rows = first_row + tl.arange(0, ROWS)
    columns = tl.arange(0, TILE)
    state_offsets = rows[:, None] * TILE + columns[None, :]
    # Tile ids are sorted: the program's tiles are all whole when its last row is present and that
    # row's tile is whole (the id read is of the last present row: the program has at least one).
    last_row = first_row + ROWS - 1
    last_id = tl.load(id_pointer + tl.minimum(last_row, n_rows - 1))
    if (last_row < n_rows) & (last_id * TILE + TILE <= numel):
        tile_ids = tl.load(id_pointer + rows)
        elements = tile_ids[:, None] * TILE + columns[None, :]
        _update_rows(
            rows, elements, state_offsets, None, None, None, param_address, grad_address, state1_address,
            state2_address, step_address, bias_table, bias_rows, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
            decay, momentum, dampening_keep, ALGORITHM, PARAM_KIND, GRAD_KIND, HAS_DECAY, MAXIMIZE, HAS_MOMENTUM,
            NESTEROV, ALIGNED,
        )  # fmt: skip
    else:
        row_mask = rows < n_rows
        tile_ids = tl.load(id_pointer + rows, mask=row_mask, other=0)
        elements = tile_ids[:, None] * TILE + columns[None, :]
        # Elements of each row inside the tensor (0 for absent rows), compared in int32.
        inside = tl.where(row_mask, tl.minimum(numel - tile_ids * TILE, TILE), 0).to(tl.int32)
        state_mask = row_mask[:, None] & (columns < TILE)[None, :]
        element_mask = columns[None, :] < inside[:, None]
        _update_rows(
            rows, elements, state_offsets, row_mask, state_mask, element_mask, param_address, grad_address,
            state1_address, state2_address, step_address, bias_table, bias_rows, lr, beta1, one_minus_beta1, beta2,
            one_minus_beta2, eps, decay, momentum, dampening_keep, ALGORITHM, PARAM_KIND, GRAD_KIND, HAS_DECAY,
            MAXIMIZE, HAS_MOMENTUM, NESTEROV, ALIGNED,
        )  # fmt: skip
