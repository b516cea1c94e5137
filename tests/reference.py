"""Independent references, written out in numpy: fp32 arithmetic op by op, then rounding to
nearest even to bf16 by integer ops on the bit pattern. Nothing here calls the package."""

from __future__ import annotations

import numpy as np
import torch


def bf16_bits(tensor: torch.Tensor) -> np.ndarray:
    """The bf16 bit patterns of a bf16 tensor as uint16 numpy."""
    assert tensor.dtype == torch.bfloat16
    return tensor.detach().contiguous().view(torch.int16).numpy().view(np.uint16).copy()


def fp32_of_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def rtne_fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 -> bf16, on the bits: u + 0x7FFF + ((u >> 16) & 1), keep the top
    half; NaN becomes a quiet NaN (payload unspecified: compare with :func:`bits_equal`)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    u = values.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    rounded[np.isnan(values)] = 0x7FC0
    return rounded


def is_nan_bits(bits: np.ndarray) -> np.ndarray:
    return ((bits & 0x7F80) == 0x7F80) & ((bits & 0x007F) != 0)


def bits_equal(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Elementwise bit equality of bf16 patterns, where any NaN equals any NaN."""
    return (actual == expected) | (is_nan_bits(actual) & is_nan_bits(expected))


def decay_factor_fp32(lr: float, weight_decay: float) -> np.float32:
    """fp32(1 - fp32(fp32(lr) * fp32(wd))), each operation in fp32."""
    return np.float32(1.0) - np.float32(lr) * np.float32(weight_decay)


def sgd_step_bf16_bits(
    param_bits: np.ndarray,
    grad: np.ndarray,
    lr: float,
    *,
    weight_decay: float = 0.0,
    maximize: bool = False,
    direction: np.ndarray | None = None,
) -> np.ndarray:
    """p_new = bf16_rtne( fp32(p) [* fp32(1 - lr*wd)] - fp32( fp32(lr) * d ) ), d = +-g or ``direction``."""
    p32 = fp32_of_bf16_bits(param_bits)
    d = np.asarray(grad, dtype=np.float32) if direction is None else np.asarray(direction, dtype=np.float32)
    if maximize and direction is None:
        d = -d
    if weight_decay:
        p32 = (p32 * decay_factor_fp32(lr, weight_decay)).astype(np.float32)
    update = (np.float32(lr) * d).astype(np.float32)
    return rtne_fp32_to_bf16_bits((p32 - update).astype(np.float32))


def adamw_tiles_bf16_bits(
    param_bits: np.ndarray,
    grad: np.ndarray,
    tile_ids: list[int],
    tile_size: int,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    tile_steps: np.ndarray,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> np.ndarray:
    """One dense-block AdamW step on the listed tiles of a flat bf16 param, element by element in
    numpy fp32 (the root in float64, rounded once); updates ``exp_avg``/``exp_avg_sq`` rows and
    ``tile_steps`` in place and returns the new bit patterns (untouched outside the tiles)::

        m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*(g*g); s = steps + 1
        p = rtne( p*fp32(1 - lr*wd) - fp32(lr / fp32(1 - b1**s)) * (m / (sqrt(v) / fp32(sqrt(1 - b2**s)) + eps)) )
    """
    f32 = np.float32
    b1, b2 = betas
    new_bits = param_bits.copy()
    grad = np.asarray(grad, dtype=np.float32)
    for row, tile in enumerate(tile_ids):
        tile_steps[row] += 1
        step = int(tile_steps[row])
        bias1 = f32(1.0 - b1**step)
        bias2_sqrt = f32(np.sqrt(1.0 - b2**step))
        step_size = f32(lr) / bias1
        for column in range(tile_size):
            index = tile * tile_size + column
            g = grad[index] if index < grad.size else f32(0.0)
            m = exp_avg[row, column] * f32(b1) + g * f32(1.0 - b1)
            v = exp_avg_sq[row, column] * f32(b2) + (g * g) * f32(1.0 - b2)
            exp_avg[row, column], exp_avg_sq[row, column] = m, v
            if index >= grad.size:
                continue
            denom = f32(np.sqrt(np.float64(v))) / bias2_sqrt + f32(eps)
            p32 = fp32_of_bf16_bits(param_bits[index : index + 1])[0]
            if weight_decay:
                p32 = p32 * decay_factor_fp32(lr, weight_decay)
            new_value = np.array([p32 - step_size * (m / denom)], dtype=np.float32)
            new_bits[index] = rtne_fp32_to_bf16_bits(new_value)[0]
    return new_bits
