"""How one tensor's changes are encoded in a delta packet: the ``tiles`` and ``sparse`` encodings.

* ``tiles``: the ids of the tiles (:mod:`sparse_rl_optim.tiles`) holding a change, and their new
  values, dense ``[n, tile_size]``: what a GPU applies fastest (one kernel writes whole tiles).
* ``sparse``: for the wire and the disk. The changed elements' flat positions, delta-coded (gaps
  between successive positions) as LEB128 varints, and per element the difference of the new and
  old bit patterns (integer, modulo 2**bits), zigzag-coded as varints: a change of one ulp is the
  pattern +-1, one byte. Both streams are deflate-compressed (zlib). Applying needs the old values,
  which the replica holds (its checksum is verified first).

Bit patterns are those of the stored dtype (2 bytes for bf16/fp16, 4 for fp32, 8 for fp64), so
both encodings are bit-exact for every floating dtype.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sparse_rl_optim.tiles import _bits_dtype, _sum_per_tile, num_tiles

__all__ = [
    "ENCODINGS",
    "EncodedTensor",
    "decode_into",
    "decode_sparse",
    "encode_change",
    "encode_sparse",
    "partial_checksum",
    "shape_checksum_term",
    "tensor_checksum",
    "tile_values",
]

ENCODINGS = ("tiles", "sparse")
_UNSIGNED = {2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass
class EncodedTensor:
    """One tensor's change. ``encoding`` ``"tiles"``: ``tile_ids`` (int32) and ``values``
    ``[n, tile_size]`` (the tensor's dtype); ``"sparse"``: ``positions`` and ``differences``
    (compressed varint byte streams, uint8 tensors) and ``count`` changed elements."""

    encoding: str
    count: int
    tile_size: int = 0
    tile_ids: Tensor | None = None
    values: Tensor | None = None
    positions: Tensor | None = None
    differences: Tensor | None = None

    def nbytes(self) -> int:
        """Bytes of the payload tensors."""
        parts = (self.tile_ids, self.values, self.positions, self.differences)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _bits(tensor: Tensor) -> Tensor:
    """The raw bit patterns of a floating tensor, flat, as the signed integer of its width."""
    return tensor.detach().contiguous().view(-1).view(_bits_dtype(tensor.dtype))


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GAMMA = _signed64(0x9E3779B97F4A7C15)  # splitmix64's increment and multipliers, as signed int64
_MUL_1 = _signed64(0xBF58476D1CE4E5B9)
_MUL_2 = _signed64(0x94D049BB133111EB)
#: Elements per chunk of the checksum: its int64 temporaries stay at a few tens of MB.
_CHECKSUM_CHUNK = 1 << 21


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: Tensor) -> Tensor:
    """splitmix64's finalizer on int64 (multiplications wrap modulo 2**64)."""
    x = (x ^ _shift_right(x, 30)) * _MUL_1
    x = (x ^ _shift_right(x, 27)) * _MUL_2
    return x ^ _shift_right(x, 31)


def tensor_checksum(tensor: Tensor) -> int:
    """A 64-bit checksum of a tensor's bit patterns and shape, computed where it lives:
    ``sum_i splitmix64(bits_i + splitmix64((i + 1) * gamma))`` modulo 2**64. Each element's term
    is a non-linear hash of its value and position, so no simple pattern of changes (a swap, +1/-1
    pairs, sign flips) cancels out, as it would in a weighted sum of the bits. In chunks, so the
    temporaries do not grow with the tensor.

    It is :func:`shape_checksum_term` of the shape plus :func:`partial_checksum` of the elements,
    modulo 2**64, so the partial sums of a tensor's shards (each at its flat offset) add up to it."""
    total = (shape_checksum_term(tensor.shape) + partial_checksum(tensor, 0)) % (1 << 64)
    return _signed64(total)


def shape_checksum_term(shape: tuple[int, ...] | torch.Size) -> int:
    """The shape's term of :func:`tensor_checksum` (unsigned, below 2**64)."""
    shape_key = len(shape)
    for size in shape:
        shape_key = (shape_key * 1000003 + size + 1) % (1 << 62)
    return int(_splitmix64(torch.tensor(shape_key, dtype=torch.int64))) % (1 << 64)


def partial_checksum(tensor: Tensor, offset: int) -> int:
    """The elements' terms of :func:`tensor_checksum` (unsigned, below 2**64) for ``tensor`` holding
    the flat elements ``[offset, offset + numel)`` of a larger tensor (row-major): a shard's part."""
    bits = _bits(tensor)
    total = 0
    width = bits.element_size()
    for start in range(0, bits.numel(), _CHECKSUM_CHUNK):
        part = bits[start : start + _CHECKSUM_CHUNK].to(torch.int64)
        if width < 8:
            part = part & ((1 << (8 * width)) - 1)  # the pattern as unsigned
        first = offset + start
        index = torch.arange(first, first + part.numel(), dtype=torch.int64, device=part.device)
        terms = _splitmix64(part + _splitmix64((index + 1) * _GAMMA))
        total = (total + int(terms.sum())) % (1 << 64)
    return total


def _varint_encode(values: np.ndarray) -> bytes:
    """LEB128: 7 bits per byte, the high bit set on every byte but a value's last."""
    values = values.astype(np.uint64)
    lengths = np.ones(len(values), dtype=np.int64)
    rest = values >> np.uint64(7)
    while rest.any():  # integer bytes count (a float log2 misjudges values near 2**63)
        lengths += rest > 0
        rest >>= np.uint64(7)
    ends = np.cumsum(lengths)
    out = np.zeros(int(ends[-1]) if len(ends) else 0, dtype=np.uint8)
    starts = ends - lengths
    for byte in range(int(lengths.max()) if len(lengths) else 0):
        has = lengths > byte
        chunk = (values[has] >> np.uint64(7 * byte)) & np.uint64(0x7F)
        more = (lengths[has] > byte + 1).astype(np.uint64) << np.uint64(7)
        out[starts[has] + byte] = (chunk | more).astype(np.uint8)
    return out.tobytes()


def _varint_decode(data: bytes, count: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    last = (raw & 0x80) == 0
    if int(last.sum()) != count:
        raise ValueError(f"corrupt varint stream: {int(last.sum())} values where {count} were expected")
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    lengths = ends - starts + 1
    values = np.zeros(count, dtype=np.uint64)
    for byte in range(int(lengths.max()) if count else 0):
        has = lengths > byte
        values[has] |= (raw[starts[has] + byte] & 0x7F).astype(np.uint64) << np.uint64(7 * byte)
    return values


def _zigzag(values: np.ndarray) -> np.ndarray:
    signed = values.astype(np.int64)
    return ((signed << 1) ^ (signed >> 63)).astype(np.uint64)


def _unzigzag(values: np.ndarray) -> np.ndarray:
    return ((values >> np.uint64(1)).astype(np.int64) ^ -((values & np.uint64(1)).astype(np.int64))).astype(np.int64)


def _as_uint8(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def encode_change(old: Tensor, new: Tensor, encoding: str, tile_size: int, *, offset: int = 0) -> EncodedTensor:
    """Encode what differs between ``old`` and ``new`` (same shape and dtype; bit patterns compared)
    as ``encoding`` ``"tiles"`` or ``"sparse"``, or ``"auto"``: the smaller of the two.

    ``offset``: where the two tensors' first element sits in the flat elements of a larger tensor
    (a shard's start, :func:`sparse_rl_optim.distributed.shard_span`): positions and tile ids are
    then those of the larger tensor, and a tile's elements outside ``old``/``new`` are zero."""
    if old.shape != new.shape or old.dtype != new.dtype:
        raise ValueError(f"old and new differ: {tuple(old.shape)} {old.dtype} vs {tuple(new.shape)} {new.dtype}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    old_bits, new_bits = _bits(old.to(new.device)), _bits(new)  # (a snapshot may live on the CPU)
    changed = old_bits != new_bits
    if encoding == "auto":
        candidates = [encode_change(old, new, name, tile_size, offset=offset) for name in ENCODINGS]
        return min(candidates, key=EncodedTensor.nbytes)
    if encoding == "tiles":
        lead = offset % tile_size  # elements of the first tile before this tensor's first element
        if lead:
            changed = torch.cat([torch.zeros(lead, dtype=torch.bool, device=changed.device), changed])
        counts = _sum_per_tile(changed.to(torch.int32), tile_size)
        tile_ids = counts.nonzero().reshape(-1) + offset // tile_size
        values = tile_values(new, tile_ids, tile_size, offset=offset)
        return EncodedTensor("tiles", int(counts.sum()), tile_size, tile_ids.to(torch.int32).cpu(), values.cpu())
    if encoding != "sparse":
        raise ValueError(f"Unknown encoding {encoding!r}; expected one of {(*ENCODINGS, 'auto')}")
    changed_at = changed.nonzero().reshape(-1)
    width = old.element_size()
    unsigned = _UNSIGNED[width]
    # Gathered where the tensors live: only the changed elements travel to the host.
    old_u = old_bits[changed_at].cpu().numpy().view(unsigned)
    new_u = new_bits[changed_at].cpu().numpy().view(unsigned)
    # new - old modulo 2**bits, read as signed: +-1 for a one-ulp change.
    signed = (new_u - old_u).view(_signed_np(width))
    return encode_sparse(changed_at.cpu().numpy().astype(np.int64) + offset, signed)


def tile_values(tensor: Tensor, tile_ids: Tensor, tile_size: int, *, offset: int = 0) -> Tensor:
    """``[len(tile_ids), tile_size]`` values of the given tiles (ids of the flat elements of a larger
    tensor in which ``tensor`` starts at ``offset``), zero where a tile reaches outside ``tensor``."""
    # Moved as integer bit patterns: indexing a bf16 tensor on the CPU may canonicalize NaN payloads.
    flat = _bits(tensor)
    tile_ids = tile_ids.to(device=flat.device, dtype=torch.int64)
    element = tile_ids.unsqueeze(1) * tile_size + torch.arange(tile_size, device=flat.device) - offset
    inside = (element >= 0) & (element < flat.numel())
    values = torch.zeros(tile_ids.numel(), tile_size, dtype=flat.dtype, device=flat.device)
    values[inside] = flat[element[inside]]
    return values.view(tensor.dtype)


def encode_sparse(positions: np.ndarray, differences: np.ndarray) -> EncodedTensor:
    """The ``sparse`` encoding of changes at ``positions`` (increasing flat element positions,
    int64) whose bit patterns moved by ``differences`` (new - old modulo 2**bits, as the signed
    integer of the element's width)."""
    gaps = np.diff(positions, prepend=0) if len(positions) else positions
    return EncodedTensor(
        "sparse",
        len(positions),
        positions=_as_uint8(zlib.compress(_varint_encode(gaps.astype(np.uint64)), 6)),
        differences=_as_uint8(zlib.compress(_varint_encode(_zigzag(differences)), 6)),
    )


def decode_sparse(encoded: EncodedTensor, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The positions (int64) and bit-pattern differences (signed, ``width`` bytes) of a ``sparse``
    change: the inverse of :func:`encode_sparse`. Raises ``ValueError`` or ``zlib.error`` for a
    stream that does not hold ``encoded.count`` values."""
    raw_positions = zlib.decompress(encoded.positions.numpy().tobytes())
    raw_differences = zlib.decompress(encoded.differences.numpy().tobytes())
    positions = np.cumsum(_varint_decode(raw_positions, encoded.count).astype(np.int64))
    differences = _unzigzag(_varint_decode(raw_differences, encoded.count)).astype(_signed_np(width))
    return positions, differences


def _signed_np(width: int) -> type:
    return {2: np.int16, 4: np.int32, 8: np.int64}[width]


def decode_into(target: Tensor, encoded: EncodedTensor) -> tuple[Tensor, Tensor]:
    """The flat element positions and new bit patterns (target's integer dtype, on its device) that
    ``encoded`` writes into ``target`` (which holds the old values); nothing is written here."""
    bits = _bits(target)
    numel = bits.numel()
    if encoded.encoding == "tiles":
        tile_ids = encoded.tile_ids.to(torch.int64)
        if tile_ids.numel() and (int(tile_ids.min()) < 0 or int(tile_ids.max()) >= num_tiles(numel, encoded.tile_size)):
            raise ValueError("packet tile ids out of range for the replica's tensor")
        element = tile_ids.unsqueeze(1) * encoded.tile_size + torch.arange(encoded.tile_size)
        inside = element < numel
        values = encoded.values.contiguous().view(_bits_dtype(encoded.values.dtype))
        return element[inside].to(bits.device), values[inside].to(bits.device)
    width = target.element_size()
    positions, differences = decode_sparse(encoded, width)
    if encoded.count and (positions[-1] >= numel or positions.min() < 0):
        raise ValueError("packet positions out of range for the replica's tensor")
    at = torch.from_numpy(positions).to(bits.device)
    old = bits[at].cpu().numpy().view(_UNSIGNED[width])  # only the changed elements travel to the host
    new = (old + differences.view(_UNSIGNED[width])).view(_signed_np(width))
    return at, torch.from_numpy(new.copy()).to(bits.device)
