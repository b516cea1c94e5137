"""Which tiles of a weight matrix the dense-block optimizers train: the selection strategies.

Each strategy returns the sorted ids (int64) of ``n_active`` tiles of one tensor, tiles as in
:mod:`sparse_rl_optim.tiles` (contiguous runs of ``tile_size`` elements of the flat tensor).

* ``"grad"``: the tiles with the largest gradient energy ``sum(g**2)`` accumulated over the window
  since the previous selection. Gradient-magnitude selection is how sparse fine-tuning picks its
  parameters (SIFT, Song et al. 2023, arXiv 2312.11875; SpIEL's regrowth, Ansell et al. 2024,
  arXiv 2401.16405); here it picks dense tiles instead of single weights.
* ``"random"``: uniformly random tiles from a seeded generator (reproducible, independent of the
  global RNG): the control that the RL-subnetwork paper (arXiv 2505.11711, updates nearly full rank
  and spread over all layers) suggests may already work.
* ``"off_principal"``: "The Path Not Taken" (arXiv 2511.08567) finds RLVR updates avoid the
  principal directions of W: training only the non-principal, low-magnitude weights tracks full
  training. GeoRA (arXiv 2601.09361) adapts inside the same masks (r = 16, rho = 0.2). An element
  is *principal* if it is in the top ``principal_fraction`` of ``|W_k|`` (``W_k`` the rank-k SVD
  reconstruction of W) or of ``|W|``; a tile whose share of principal elements is at least
  ``max_principal_share`` is excluded, and the rest are ranked by gradient energy as in ``"grad"``
  (if fewer tiles remain than needed, the least-dominated excluded tiles fill up).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sparse_rl_optim._warnings import warn
from sparse_rl_optim.tiles import _sum_per_tile, num_tiles

__all__ = [
    "SELECTION_STRATEGIES",
    "n_active_tiles",
    "principal_share",
    "select_tiles",
    "tile_grad_energy",
]

SELECTION_STRATEGIES = ("grad", "random", "off_principal")
#: Strategies that rank tiles by accumulated gradient energy.
USES_GRAD_ENERGY = ("grad", "off_principal")
#: Above this many elements in the smaller dimension the rank-k SVD is randomized (seeded, with its
#: own generator: selection stays reproducible and the global RNG untouched).
_EXACT_SVD_MAX_DIM = 1024


def n_active_tiles(numel: int, tile_size: int, density: float) -> int:
    """Active tiles of a tensor at ``density``: ``max(1, floor(density * num_tiles))`` (all tiles at
    density 1), so the active tiles hold at most ``density * numel + tile_size`` elements."""
    total = num_tiles(numel, tile_size)
    if density >= 1.0:
        return total
    # Rounded first: 0.29 * 100 is 28.999999999999996 in binary floating point.
    return min(total, max(1, math.floor(round(density * total, 9))))


def tile_grad_energy(grad: Tensor, tile_size: int) -> Tensor:
    """Per-tile gradient energy ``sum(g**2)`` over each tile of the flat gradient (fp32)."""
    flat = grad.detach().reshape(-1)
    whole = flat.numel() - flat.numel() % tile_size
    # vector_norm accumulates in fp32 without an fp32 copy of the gradient.
    parts = [torch.linalg.vector_norm(flat[:whole].view(-1, tile_size), dim=1, dtype=torch.float32).square()]
    if whole < flat.numel():
        parts.append(torch.linalg.vector_norm(flat[whole:], dtype=torch.float32).square().reshape(1))
    return torch.cat(parts)


def _top_ids(scores: Tensor, count: int) -> Tensor:
    """Sorted ids of the ``count`` largest scores (ties to the lower id, so the result is deterministic)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:count].sort().values


def _seeded_generator(seed: int, *keys: int) -> torch.Generator:
    mixed = seed
    for key in keys:
        mixed = (mixed * 0x9E3779B1 + key + 1) % (1 << 63)
    return torch.Generator(device="cpu").manual_seed(mixed)


def _low_rank_reconstruction(matrix: Tensor, rank: int, seed: int) -> Tensor:
    """The rank-``rank`` SVD reconstruction of ``matrix``: exact up to ``_EXACT_SVD_MAX_DIM``, else a
    randomized range finder (Halko et al. 2011: 8 extra probe columns, 2 power iterations) drawing
    from its own seeded generator, so the global RNG is untouched and selection is reproducible."""
    if min(matrix.shape) <= _EXACT_SVD_MAX_DIM:
        left, values, right_t = torch.linalg.svd(matrix, full_matrices=False)
        return (left[:, :rank] * values[:rank]) @ right_t[:rank]
    generator = torch.Generator(device=matrix.device).manual_seed(seed % (1 << 63))
    probes = min(rank + 8, *matrix.shape)
    sketch = torch.randn(matrix.shape[1], probes, generator=generator, device=matrix.device)
    basis = torch.linalg.qr(matrix @ sketch).Q
    for _ in range(2):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    left_small, values, right_t = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return ((basis @ left_small[:, :rank]) * values[:rank]) @ right_t[:rank]


def principal_share(weight: Tensor, tile_size: int, *, rank: int, fraction: float, seed: int = 0) -> Tensor:
    """Per tile, the share of its elements that are principal: in the top ``fraction`` of
    ``|W_rank|`` (the rank-``rank`` SVD reconstruction of W, the tensor as a ``[shape[0], -1]``
    matrix) or in the top ``fraction`` of ``|W|`` (fp32 ``[num_tiles]``, in [0, 1]). Training the
    rest is "non-principal and low-magnitude", the set "The Path Not Taken" trains. Non-finite
    entries count as principal (and are read as 0 by the SVD)."""
    if weight.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=weight.device)
    matrix = weight.detach().to(torch.float32).reshape(weight.shape[0], -1)
    finite = torch.isfinite(matrix)
    if not bool(finite.all()):
        matrix = torch.where(finite, matrix, torch.zeros_like(matrix))
    rank = max(1, min(rank, *matrix.shape))
    reconstruction = _low_rank_reconstruction(matrix, rank, seed)
    count = max(1, math.ceil(fraction * matrix.numel()))
    principal = ~finite.reshape(-1)
    for magnitude in (reconstruction.abs().reshape(-1), matrix.abs().reshape(-1)):
        principal[torch.topk(magnitude, count, sorted=False).indices] = True
    counts = _sum_per_tile(principal.to(torch.int32), tile_size).to(torch.float32)
    sizes = torch.full_like(counts, float(tile_size))
    if matrix.numel() % tile_size:
        sizes[-1] = matrix.numel() % tile_size
    return counts / sizes


def select_tiles(
    strategy: str,
    *,
    weight: Tensor,
    n_active: int,
    tile_size: int,
    grad_energy: Tensor | None = None,
    seed: int = 0,
    tensor_index: int = 0,
    selection_round: int = 0,
    principal_rank: int = 16,
    principal_fraction: float = 0.2,
    max_principal_share: float = 0.5,
    name: str = "",
) -> Tensor:
    """Sorted ids (int64, on ``weight``'s device) of ``n_active`` tiles of ``weight`` chosen by
    ``strategy`` (see the module docstring). ``grad_energy`` (from :func:`tile_grad_energy`, summed
    over the window) is needed by ``"grad"`` and ``"off_principal"``; ``"random"`` draws from a
    generator seeded by ``(seed, tensor_index, selection_round)``. Non-finite gradient energy ranks
    as 0, with a warning."""
    total = num_tiles(weight.numel(), tile_size)
    n_active = min(n_active, total)
    if strategy not in SELECTION_STRATEGIES:
        raise ValueError(f"Unknown tile selection {strategy!r}; expected one of {SELECTION_STRATEGIES}")
    if strategy == "random" or total == 0:
        generator = _seeded_generator(seed, tensor_index, selection_round)
        return torch.randperm(total, generator=generator)[:n_active].sort().values.to(weight.device)
    if grad_energy is None or grad_energy.numel() != total:
        raise ValueError(f"select={strategy!r} needs the gradient energy of all {total} tiles")
    finite = torch.isfinite(grad_energy)
    if not bool(finite.all()):
        warn(
            f"dense-block tile selection: {int((~finite).sum())} tiles of {name or 'a parameter'} had a "
            "non-finite gradient (NaN/inf) in the selection window; they rank as zero energy"
        )
        grad_energy = torch.where(finite, grad_energy, torch.zeros_like(grad_energy))
    if not bool((grad_energy > 0).any()):
        # E.g. GRPO with equal rewards in every group: no gradient to rank by; ties would pick the first tiles.
        warn(
            f"dense-block tile selection: {name or 'a parameter'} had an all-zero gradient over the selection "
            "window; its tiles are chosen at random (seeded) instead"
        )
        return select_tiles(
            "random", weight=weight, n_active=n_active, tile_size=tile_size, seed=seed,
            tensor_index=tensor_index, selection_round=selection_round,
        )  # fmt: skip
    if strategy == "grad":
        return _top_ids(grad_energy, n_active)
    if not bool(torch.isfinite(weight).all()):
        warn(f"dense-block tile selection: {name or 'a parameter'} has non-finite weights; they count as principal")
    share = principal_share(
        weight, tile_size, rank=principal_rank, fraction=principal_fraction, seed=seed + tensor_index
    )
    eligible = (share < max_principal_share).nonzero().reshape(-1)
    excluded = (share >= max_principal_share).nonzero().reshape(-1)
    # Eligible tiles by energy first; then the excluded ones, least dominated first.
    ranked = torch.cat(
        [
            eligible[torch.argsort(grad_energy[eligible], descending=True, stable=True)],
            excluded[torch.argsort(share[excluded], stable=True)],
        ]
    )
    return ranked[:n_active].sort().values
