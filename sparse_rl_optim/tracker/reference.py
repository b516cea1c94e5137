"""Exact "differs from a reference" bookkeeping that stores the reference sparsely.

A full copy of the reference weights costs 2 bytes per parameter. RL changes few weights, so
instead each :class:`SparseReference` keeps a bit-set of elements touched since the reference
(1 bit per element) and, for touched elements only, their index and reference bits (10 bytes
each). "Differs from the reference" is then exact, also for a weight that moved and moved back.
When the sparse part would outgrow a dense copy it switches to one (2 bytes per element).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SparseReference", "pack_bits", "unpack_bits"]

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_SPARSE_ENTRY_BYTES = 8 + 2  # int64 index + int16 reference bits


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a flat bool tensor into uint8, little bit order (as ``numpy.packbits(bitorder="little")``)."""
    padded_length = -(-mask.numel() // 8) * 8
    padded = torch.zeros(padded_length, dtype=torch.uint8, device=mask.device)
    padded[: mask.numel()] = mask.reshape(-1)
    weights = _BIT_WEIGHTS.to(mask.device)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits as a flat bool tensor."""
    weights = _BIT_WEIGHTS.to(packed.device)
    return ((packed.unsqueeze(1) & weights) != 0).reshape(-1)[:numel]


class SparseReference:
    """Tracks, exactly, which elements of one flat bit tensor differ from their reference bits."""

    def __init__(self, reference_bits: Tensor) -> None:
        self.reset(reference_bits)

    def reset(self, reference_bits: Tensor) -> None:
        """Make the current values (``reference_bits``, flat int16) the new reference."""
        self.numel = reference_bits.numel()
        self.device = reference_bits.device
        self._touched = torch.zeros(-(-self.numel // 8), dtype=torch.uint8, device=self.device)
        self._indices = torch.empty(0, dtype=torch.int64, device=self.device)
        self._reference_values = torch.empty(0, dtype=reference_bits.dtype, device=self.device)
        self._dense: Tensor | None = None

    @property
    def is_dense(self) -> bool:
        return self._dense is not None

    def record(self, changed: Tensor, before_bits: Tensor, after_bits: Tensor) -> None:
        """Record one step: ``changed`` is ``before_bits != after_bits`` (all flat)."""
        if self._dense is not None:
            return
        newly_touched = changed & ~unpack_bits(self._touched, self.numel)
        new_indices = newly_touched.nonzero().squeeze(1)
        if new_indices.numel() == 0:
            return
        self._indices = torch.cat([self._indices, new_indices])
        self._reference_values = torch.cat([self._reference_values, before_bits[new_indices]])
        self._touched |= pack_bits(newly_touched)
        if self._indices.numel() * _SPARSE_ENTRY_BYTES > self.numel * after_bits.element_size():
            dense = after_bits.clone()
            dense[self._indices] = self._reference_values
            self._dense = dense
            # Fresh empty tensors, not [:0] views, so the sparse storage is really freed.
            self._touched = torch.empty(0, dtype=torch.uint8, device=self.device)
            self._indices = torch.empty(0, dtype=torch.int64, device=self.device)
            self._reference_values = torch.empty(0, dtype=after_bits.dtype, device=self.device)

    def count_differing(self, current_bits: Tensor) -> Tensor:
        """Number of elements whose current bits differ from the reference (0-dim int64 tensor)."""
        if self._dense is not None:
            return (current_bits != self._dense).sum()
        return (current_bits[self._indices] != self._reference_values).sum()

    def differing_mask(self, current_bits: Tensor) -> Tensor:
        """Flat bool mask of elements that differ from the reference."""
        if self._dense is not None:
            return current_bits != self._dense
        mask = torch.zeros(self.numel, dtype=torch.bool, device=self.device)
        mask[self._indices] = current_bits[self._indices] != self._reference_values
        return mask

    def nbytes(self) -> int:
        """Bytes of storage held now."""
        tensors = (self._touched, self._indices, self._reference_values, self._dense)
        return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)
