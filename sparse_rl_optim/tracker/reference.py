"""Exact "differs from a reference" bookkeeping that stores the reference sparsely.

A full copy of the reference weights costs 2 bytes per parameter. RL changes few weights, so
instead each :class:`SparseReference` keeps a bit-set of elements touched since the reference
(1 bit per element) and, for touched elements only, their index and reference bits (10 bytes
each). "Differs from the reference" is then exact, also for a weight that moved and moved back.
When the sparse part would outgrow a dense copy it switches to one (2 bytes per element).
Each step costs work in proportion to the elements it changed, not to the tensor's size (except
the count over a dense copy).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SparseReference"]

_SPARSE_ENTRY_BYTES = 8 + 2  # int64 index + int16 reference bits


class SparseReference:
    """Tracks, exactly, which elements of one flat bit tensor differ from their reference bits."""

    def __init__(self, reference_bits: Tensor) -> None:
        self.reset(reference_bits)

    def reset(self, reference_bits: Tensor) -> None:
        """Make the current values (``reference_bits``, flat int16) the new reference."""
        self.numel = reference_bits.numel()
        self.device = reference_bits.device
        self.dtype = reference_bits.dtype
        self._touched = torch.zeros(-(-self.numel // 8), dtype=torch.uint8, device=self.device)
        self._indices = torch.empty(0, dtype=torch.int64, device=self.device)
        self._reference_values = torch.empty(0, dtype=self.dtype, device=self.device)
        self._dense: Tensor | None = None

    @property
    def is_dense(self) -> bool:
        return self._dense is not None

    def is_touched(self, indices: Tensor) -> Tensor:
        """Whether each element of ``indices`` changed since the reference (sparse mode)."""
        bit = (indices & 7).to(torch.uint8)
        return ((self._touched[indices >> 3] >> bit) & 1).bool()

    def record(self, changed_indices: Tensor, values_before: Tensor, after_bits: Tensor) -> None:
        """Record one step: the flat indices of the elements it changed, their bits before the step,
        and the whole tensor's bits after it."""
        if self._dense is not None or changed_indices.numel() == 0:
            return
        first_change = ~self.is_touched(changed_indices)
        new_indices = changed_indices[first_change]
        if new_indices.numel() == 0:
            return
        self._indices = torch.cat([self._indices, new_indices])
        self._reference_values = torch.cat([self._reference_values, values_before[first_change]])
        # Distinct new elements set distinct bits, so adding the bits is OR-ing them.
        bits = torch.ones_like(new_indices, dtype=torch.uint8) << (new_indices & 7).to(torch.uint8)
        self._touched.index_put_((new_indices >> 3,), bits, accumulate=True)
        if self._indices.numel() * _SPARSE_ENTRY_BYTES > self.numel * after_bits.element_size():
            dense = after_bits.clone()
            dense[self._indices] = self._reference_values
            self._dense = dense
            # Fresh empty tensors, not [:0] views, so the sparse storage is really freed.
            self._touched = torch.empty(0, dtype=torch.uint8, device=self.device)
            self._indices = torch.empty(0, dtype=torch.int64, device=self.device)
            self._reference_values = torch.empty(0, dtype=self.dtype, device=self.device)

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
