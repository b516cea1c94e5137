"""Dense-block optimizers: AdamW and SGD whose state and updates live on selected dense tiles.

RL updates of LLMs are sparse and avoid the principal directions of the weights ("The Path Not
Taken", arXiv 2511.08567; GeoRA, arXiv 2601.09361), but unstructured sparse updates run slower than
dense ones on GPUs. :class:`DenseBlockAdamW` and :class:`DenseBlockSGD` keep optimizer state only
for a ``density`` fraction of each weight matrix, chosen as whole tiles of
:mod:`sparse_rl_optim.tiles` (contiguous runs of ``tile_size`` elements), so every step is dense work:
gather the active tiles' gradients into dense rows, update, scatter back
(:mod:`sparse_rl_optim.optim.dense_block_functional`, a fused Triton kernel on CUDA).

Tile selection: :mod:`sparse_rl_optim.optim.tile_selection`.

Many ranks. Under DDP (replicated params, the same averaged gradients everywhere) every rank computes
the same selection and step locally; nothing is communicated. Under FSDP2 (``fully_shard``: params
and grads are ``DTensor`` s sharded on dim 0, each rank holding a contiguous run ``[start, stop)`` of
the flat tensor, :func:`sparse_rl_optim.distributed.shard_span`) each rank steps its local shard and
keeps state only for the tiles in it, and the run equals a single-process one bit for bit:

* Tile ids are global (the tensor's own tiles). A blocked tensor's shards must start on tile
  boundaries (``start % tile_size == 0`` on every rank; LLM weights with ``cols % 64 == 0`` always
  do), else the first step raises a ``ValueError`` naming a tile size that works. A rank owns the
  global tiles ``[start / tile_size, ceil(stop / tile_size))``; in ``optimizer.state`` it keeps the
  active ones among them, by *local* id (global id minus ``start / tile_size``), with their rows;
  :meth:`~_DenseBlockOptimizer.active_tiles` reports global ids. Densely handled tensors (decided,
  like the number of active tiles, from the global shape) step their local shard with every local
  tile active, whatever the shard boundaries (the update is elementwise, so this is exact).
* Selection is global: at a (re)selection the per-tile gradient energy (accumulated per local tile
  between selections) is merged into the tensor's full energy vector, and every rank ranks the
  same vector with the single-process code (stable sort, ties to the lower tile id). ``"random"``
  draws the single-process permutation on every rank; ``"off_principal"`` all-gathers the weight
  for its SVD. Every rank then keeps the chosen tiles it owns.
* Communication, per blocked sharded tensor and reselection only (the step itself has none): one
  all-reduce of ``4 * num_tiles`` bytes (the energy, ``"grad"`` and ``"off_principal"``), plus for
  ``"off_principal"`` an all-gather of the weight (``numel * element_size`` bytes). ``"random"``
  communicates nothing. Per-rank state is the rank's share of the single-process state, but the
  selection decides the share: tiles concentrate on the ranks whose rows have the largest gradients
  (at most all ``n_active`` tiles of a tensor on one rank), so the ``density`` bound of
  ``state_bytes_report`` holds for the sum over ranks, not for each rank.
* ``state_dict()`` and ``load_state_dict()`` are collective (every rank calls them, as
  ``torch.distributed.checkpoint`` does) and show the single-process layout: ``tile_ids``
  ``[n_active]`` (global, sorted), ``tile_steps`` ``[n_active]``, rows ``[n_active, tile_size]``,
  ``grad_energy`` ``[num_tiles]``, each a ``DTensor`` on the param's mesh split on dim 0 (so DCP
  saves every row once, resharding on load, and a full state dict equals the single-process one).
  The rows travel between their owner and the even chunks through one all-reduce per state tensor
  (saving) or an all-gather of it (loading; each param's state gathered and cut to this rank's part
  before the next): transient memory of one tensor's full state.
* Resuming with ``torch.distributed.checkpoint``: ``dcp.load`` fills the state that
  ``get_optimizer_state_dict`` creates in a fresh optimizer (a step at lr 0), and insists on its
  shapes, which follow the settings that decide the number of active tiles: ``density`` and
  ``dense_below`` (and ``tile_size``). If they changed before the save (e.g. a density schedule),
  give each group the saved ones *before* ``get_optimizer_state_dict``, else ``dcp.load`` fails
  with DCP's "Size mismatch between saved torch.Size([16]) and current: torch.Size([8]) for
  optim.state.<param>.tile_ids". They can be read from the checkpoint first::

      saved = {"optim": {"param_groups": [{"density": 0.0, "dense_below": 0} for _ in optimizer.param_groups]}}
      dcp.load(saved, checkpoint_id=path)  # fills in the saved values
      for group, settings in zip(optimizer.param_groups, saved["optim"]["param_groups"]):
          group.update(settings)

  A full state dict (``full_state_dict=True``) and ``load_state_dict`` need none of this: they
  take the state and the groups' settings as saved.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sparse_rl_optim._backend import check_backend, check_triton_available, resolve_backend
from sparse_rl_optim._warnings import warn
from sparse_rl_optim.distributed import (
    is_dtensor,
    is_sharded,
    local_parts,
    local_tensor,
    merge_shards_,
    shard_span,
    shard_spans,
    split_rows_like,
)
from sparse_rl_optim.optim._state_dict import load_state_dict_keeping_dtypes
from sparse_rl_optim.optim.dense_block_functional import _gather_rows, _scatter_rows, dense_block_adamw, dense_block_sgd
from sparse_rl_optim.optim.memory import optimizer_state_bytes
from sparse_rl_optim.optim.sgd import rlsgd
from sparse_rl_optim.optim.tile_selection import (
    SELECTION_STRATEGIES,
    USES_GRAD_ENERGY,
    n_active_tiles,
    select_tiles,
    tile_grad_energy,
)
from sparse_rl_optim.tiles import MAX_TILE_SIZE, MIN_TILE_SIZE, check_tile_size, num_tiles

__all__ = ["DenseBlockAdamW", "DenseBlockSGD"]

REST_MODES = ("freeze", "sgd")
#: Moments and momentum buffers are fp32 whatever the param dtype (so they keep contributions far
#: below a bf16 ulp), which is where AdamW's 8 bytes per element come from.
_ROW_DTYPE = torch.float32
#: State keys holding dense rows ``[n_active, tile_size]`` (one per active tile).
_ROW_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")
#: State keys that are bookkeeping: the index overhead of the memory bound.
_INDEX_KEYS = ("tile_ids", "tile_steps", "step")
#: State keys with one entry (row) per active tile, and the one with an entry per tile of the tensor.
_PER_ACTIVE_TILE = ("tile_ids", "tile_steps", *_ROW_KEYS)
_PER_TILE = ("grad_energy",)

_COMMON_DEFAULTS: dict[str, Any] = {
    "maximize": False,
    "density": 0.05,
    "tile_size": 64,
    "select": "grad",
    "reselect_every": 100,
    "rest": "freeze",
    "rest_lr": None,
    "dense_below": 4096,
    "principal_rank": 16,
    "principal_fraction": 0.2,
    "seed": 0,
    "backend": "auto",
}


@dataclass(frozen=True)
class _Layout:
    """Where this rank's part of a parameter lies in the tensor's tiles (the whole tensor, under one
    process or DDP; the flat elements ``[start, stop)`` of an FSDP2 shard)."""

    sharded: bool  # other ranks hold other parts: selection and state dicts communicate
    start: int
    stop: int
    global_numel: int
    tile_size: int
    aligned: bool  # every rank's part starts on a tile boundary

    @classmethod
    def of(cls, param: Tensor, tile_size: int) -> _Layout:
        if not is_sharded(param):
            return cls(False, 0, param.numel(), param.numel(), tile_size, True)
        span = shard_span(param)
        aligned = all(
            part.start % tile_size == 0 and (part.stop % tile_size == 0 or part.stop == part.global_numel)
            for part in shard_spans(param)
            if part.numel
        )
        return cls(True, span.start, span.stop, span.global_numel, tile_size, aligned)

    @property
    def first_tile(self) -> int:
        """Global id of local tile 0 (aligned layouts)."""
        return self.start // self.tile_size

    @property
    def local_tiles(self) -> int:
        return num_tiles(self.stop - self.start, self.tile_size)

    @property
    def global_tiles(self) -> int:
        return num_tiles(self.global_numel, self.tile_size)

    def merge_per_tile(self, local_values: Tensor, param: Tensor) -> Tensor:
        """Per-tile values of this rank's tiles, merged over the ranks into the tensor's full
        per-tile vector (collective; exact, see :func:`~sparse_rl_optim.distributed.merge_shards_`)."""
        whole = torch.zeros(self.global_tiles, dtype=local_values.dtype, device=local_values.device)
        whole[self.first_tile : self.first_tile + local_values.numel()] = local_values
        return merge_shards_(whole, param)

    def own(self, global_ids: Tensor) -> Tensor:
        """The local ids of the given global tiles that this rank holds (aligned layouts)."""
        if not self.sharded:
            return global_ids
        first = self.first_tile
        return global_ids[(global_ids >= first) & (global_ids < first + self.local_tiles)] - first


class _DenseBlockOptimizer(Optimizer):
    """What the two dense-block optimizers share: argument checks, tile selection and reselection,
    the ``rest`` update, state loading and the memory report. Subclasses define ``_row_keys`` (the
    fp32 row state they keep per active tile), ``_validate_group`` and ``_step_active``."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any]) -> None:
        if isinstance(params, set):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections (a set has no stable order)"
            )
        _validate_common(defaults)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in {**_COMMON_DEFAULTS, **self._extra_defaults()}.items():
                group.setdefault(key, value)
            group.setdefault("rest_lr_base", float(group["lr"]))

    @classmethod
    def _extra_defaults(cls) -> dict[str, Any]:
        return {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``Optimizer.add_param_group``; also validates the group's settings and rejects a
        parameter listed twice."""
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the ordering of "
                "tensors in sets will change between runs. Please use a list instead."
            )
        params = [params] if isinstance(params, Tensor) else list(params)
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{type(self).__name__} got a parameter group that lists the same parameter twice")
        super().add_param_group({**param_group, "params": params})
        group = self.param_groups[-1]
        try:
            _validate_common(group)
            self._validate_group(group)
            if resolve_backend(group["backend"], params) == "triton":
                for device in {p.device for p in params}:
                    check_triton_available(device, f"{type(self).__name__}(backend='triton')")
        except Exception:
            self.param_groups.pop()
            raise
        for key in ("tile_size", "reselect_every", "dense_below", "principal_rank", "seed"):
            if group[key] is not None:
                group[key] = int(group[key])  # numpy integers too: Python ints from here on
        group["density"], group["principal_fraction"] = float(group["density"]), float(group["principal_fraction"])
        # rest_lr is paired with this lr: when a scheduler (or the user) changes lr, rest_lr scales along.
        group.setdefault("rest_lr_base", float(group["lr"]))
        if group["rest"] == "freeze" and group["rest_lr"] is not None:
            warn(f"{type(self).__name__}: rest_lr={group['rest_lr']} is unused with rest='freeze'")

    def _validate_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    # -- layout and selection ------------------------------------------------------------------

    @staticmethod
    def is_dense(param: Tensor, group: dict[str, Any]) -> bool:
        """Whether ``param`` is handled densely (every tile active, never reselected): tensors with
        fewer than 2 dimensions (biases, norms) and tensors with fewer than ``dense_below`` elements."""
        return param.dim() < 2 or param.numel() < group["dense_below"]

    def _param_index(self) -> dict[int, int]:
        """Position of each param in the optimizer (stable across a state_dict round trip)."""
        return {id(p): index for index, p in enumerate(p for group in self.param_groups for p in group["params"])}

    def _layout(self, param: Tensor, tile_size: int) -> _Layout:
        """``param``'s :class:`_Layout` (cached: a param's shape and placements do not change)."""
        cache = self.__dict__.setdefault("_layouts", {})
        hit = cache.get(id(param))
        if hit is None or hit[0] is not param or hit[1].tile_size != tile_size:
            hit = cache[id(param)] = (param, _Layout.of(param, tile_size))
        return hit[1]

    def _selected_count(self, param: Tensor, layout: _Layout) -> int:
        """How many tiles the current selection of ``param`` has over all ranks (a sum over the
        shards, cached from the selection or the load; computed with one all-reduce if unknown)."""
        ids = self.state[param]["tile_ids"]
        if not layout.sharded:
            return ids.numel()
        counts = self.__dict__.setdefault("_selected_counts", {})
        if id(param) not in counts:
            total = merge_shards_(torch.tensor([ids.numel()], dtype=torch.int64, device=ids.device), param)
            counts[id(param)] = int(total.item())
        return counts[id(param)]

    def _prepare_tiles(
        self, group: dict[str, Any], params: list[Tensor], local_params: list[Tensor], grads: list[Tensor]
    ) -> None:
        """Create the state of new params, accumulate gradient energy, and (re)select tiles where due:
        on the first step, every ``reselect_every`` steps, and when the group's ``density`` (or a
        tensor's dense handling) no longer matches the active tiles. ``local_params`` and ``grads``:
        what this rank holds (:func:`~sparse_rl_optim.distributed.local_tensor`)."""
        tile_size = group["tile_size"]
        needs_energy = group["select"] in USES_GRAD_ENERGY
        every = group["reselect_every"]
        positions: dict[int, int] | None = None
        for param, local, grad in zip(params, local_params, grads, strict=True):
            state = self.state[param]
            if "tile_ids" not in state:
                state["step"] = torch.tensor(0, dtype=torch.int64)  # on the CPU: reading it never syncs
            step = int(state["step"].item())  # a CPU tensor: no device sync
            if "tile_ids" in state:
                self._check_rows(param, group)
            if self.is_dense(param, group) or group["density"] >= 1.0:
                # Every tile active, so over the ranks every tile of the tensor (param.numel() is the
                # global numel): a later lower density then finds the count changed and reselects.
                # Set on every rank, whatever this rank's part holds: a rank that kept the old count
                # would skip the reselection (and its all-reduce) that the others run.
                self.__dict__.setdefault("_selected_counts", {})[id(param)] = num_tiles(param.numel(), tile_size)
                total = num_tiles(local.numel(), tile_size)  # every tile of this rank's part
                if "tile_ids" not in state or state["tile_ids"].numel() != total:
                    self._warn_if_flat(param, group)
                    self._set_tiles(param, group, torch.arange(total, device=local.device))
                continue
            layout = self._layout(param, tile_size)
            if not layout.aligned:
                raise self._misaligned(param, group)
            wanted = n_active_tiles(param.numel(), tile_size, group["density"])  # numel of the full tensor
            first = "tile_ids" not in state
            resized = not first and self._selected_count(param, layout) != wanted  # density changed
            reselect = resized or (bool(every) and step > 0 and step % every == 0)
            energy = None
            if needs_energy and (first or reselect or every):
                energy = tile_grad_energy(grad, tile_size)
                if "grad_energy" in state:
                    energy += state["grad_energy"]
                if every:
                    state["grad_energy"] = energy
            if not (first or reselect):
                continue
            if positions is None:
                positions = self._param_index()
            self._set_tiles(param, group, self._select(group, param, local, layout, wanted, energy, positions, step))
            if "grad_energy" in state:
                state["grad_energy"] = torch.zeros_like(state["grad_energy"])  # a new window

    def _select(
        self,
        group: dict[str, Any],
        param: Tensor,
        local: Tensor,
        layout: _Layout,
        wanted: int,
        energy: Tensor | None,
        positions: dict[int, int],
        step: int,
    ) -> Tensor:
        """The single-process selection of ``param``'s tiles, as local ids of the tiles this rank
        holds. A sharded tensor merges its per-tile energy over the ranks first (and all-gathers
        the weight for ``"off_principal"``): every rank then ranks the same global vector."""
        strategy = group["select"]
        every = group["reselect_every"]
        if layout.sharded and energy is not None:
            energy = layout.merge_per_tile(energy, param)
        if energy is not None and float(group["lr"]) == 0.0 and not bool((energy > 0).any()):
            # No gradient at lr 0: the state-creating step of torch.distributed.checkpoint's
            # get/set_optimizer_state_dict (zero grads, lr=0), whose state a load overwrites.
            # select_tiles would pick at random too, with a warning meant for training. Decided
            # on the merged energy (the same on every rank), before the weight is all-gathered.
            strategy = "random"
        weight = local  # the whole tensor unless sharded
        if layout.sharded:
            if strategy == "off_principal":
                weight = param.full_tensor()
            else:  # only the global numel and the device are read
                weight = local.new_zeros(1).expand(param.shape)
        index = positions[id(param)]
        chosen = select_tiles(
            strategy,
            weight=weight,
            n_active=wanted,
            tile_size=group["tile_size"],
            grad_energy=energy,
            seed=group["seed"],
            tensor_index=index,
            selection_round=step // every if every else 0,
            principal_rank=group["principal_rank"],
            principal_fraction=group["principal_fraction"],
            name=f"param {index} {tuple(param.shape)}",
        )
        if layout.sharded:
            self.__dict__.setdefault("_selected_counts", {})[id(param)] = chosen.numel()
        return layout.own(chosen)

    def _misaligned(self, param: Tensor, group: dict[str, Any]) -> ValueError:
        """The error for a blocked tensor whose shards do not start on tile boundaries."""
        tile_size = group["tile_size"]
        numel, shape = param.numel(), tuple(param.shape)
        cuts = sorted(
            {part.start for part in shard_spans(param) if part.numel and part.start}
            | {part.stop for part in shard_spans(param) if part.numel and part.stop < numel}
        )
        bad = next(cut for cut in cuts if cut % tile_size)
        common = math.gcd(*cuts)
        fits = min(common & -common, MAX_TILE_SIZE)  # the largest power of two dividing every boundary
        if fits >= MIN_TILE_SIZE:
            smaller = f" (or a smaller power of two, down to {MIN_TILE_SIZE})" if fits > MIN_TILE_SIZE else ""
            hint = f"tile_size={fits}{smaller} would work"
        else:
            hint = (
                f"no tile size of {MIN_TILE_SIZE} or more divides every boundary: handle it densely "
                f"(dense_below > {numel}) or shard it differently"
            )
        row = numel // shape[0] if shape and shape[0] else 1
        return ValueError(
            f"{type(self).__name__}: a parameter of shape {shape} is sharded at flat element {bad} (row {bad // row}), "
            f"which is not a multiple of tile_size={tile_size}: a tile would span two ranks; {hint}"
        )

    def _check_rows(self, param: Tensor, group: dict[str, Any]) -> None:
        """State rows that fit the group's settings: a changed ``tile_size`` is an error; rows a
        changed setting now needs (``momentum`` set on a running ``DenseBlockSGD``) start from zero,
        rows it no longer needs are freed."""
        state = self.state[param]
        widths = {state[key].shape[-1] for key in _ROW_KEYS if key in state} | {state.get("tile_size")} - {None}
        if widths and widths != {group["tile_size"]}:
            raise ValueError(
                f"{type(self).__name__}: tile_size changed from {widths.pop()} to {group['tile_size']} for a "
                "parameter with state; the tile geometry of a running optimizer cannot change (make a new one)"
            )
        row_keys = self._row_keys(group)
        expected = {*row_keys, "tile_steps"} if row_keys else set()
        present = {key for key in (*_ROW_KEYS, "tile_steps") if key in state}
        if present != expected:
            self._set_tiles(param, group, state["tile_ids"])

    #: A 1-D tensor this large is most likely a flattened parameter (FSDP1 / DeepSpeed flat params).
    _FLAT_WARNING_NUMEL = 1 << 20

    def _warn_if_flat(self, param: Tensor, group: dict[str, Any]) -> None:
        if param.dim() < 2 and param.numel() >= self._FLAT_WARNING_NUMEL and group["density"] < 1.0:
            warn(
                f"{type(self).__name__}: a 1-D parameter of {param.numel():,} elements is handled densely "
                "(full optimizer state, no saving). If it is a flattened parameter (FSDP1 flat params, "
                "DeepSpeed), build the optimizer on the unflattened parameters (FSDP2, use_orig_params=True)."
            )

    def _set_tiles(self, param: Tensor, group: dict[str, Any], tile_ids: Tensor) -> None:
        """Make ``tile_ids`` the active tiles of ``param``: a tile that stays keeps its state rows
        and step count, a tile that leaves drops them, a tile that enters starts from zero."""
        state = self.state[param]
        tile_size = group["tile_size"]
        row_keys = self._row_keys(group)
        old_ids = state.get("tile_ids")
        count = tile_ids.numel()
        device = tile_ids.device  # the param's (its local shard's)
        new_rows = {key: torch.zeros(count, tile_size, dtype=_ROW_DTYPE, device=device) for key in row_keys}
        new_steps = torch.zeros(count, dtype=torch.int32, device=device)
        # Rows carry over only if all of them exist (a group that just got momentum starts fresh).
        complete = all(key in state for key in (*row_keys, "tile_steps"))
        if old_ids is not None and old_ids.numel() and count and row_keys and complete:
            where = torch.searchsorted(old_ids, tile_ids).clamp(max=old_ids.numel() - 1)
            kept = old_ids[where] == tile_ids
            for key in row_keys:
                new_rows[key][kept] = state[key][where[kept]]
            new_steps[kept] = state["tile_steps"][where[kept]]
        for key in (*_ROW_KEYS, "tile_steps"):  # state of another setting (momentum now 0): freed
            state.pop(key, None)
        state["tile_ids"] = tile_ids
        state["tile_size"] = tile_size  # the geometry the ids refer to
        if row_keys:  # the per-tile step counts: bias correction, a momentum buffer's first step
            state["tile_steps"] = new_steps
        state.update(new_rows)

    def _row_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The fp32 state rows ``[n_active, tile_size]`` kept per active tile in this group."""
        raise NotImplementedError

    # -- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, local_params, grads = [], [], []
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if param.grad.shape != param.shape:
                    raise RuntimeError(
                        f"gradient of shape {tuple(param.grad.shape)} for a parameter of shape {tuple(param.shape)}"
                    )
                local_param, local_grad = local_parts(param, type(self).__name__)
                params.append(param)  # the key of its state
                local_params.append(local_param)  # what this rank holds and steps (FSDP2: its shard)
                grads.append(local_grad)
            if not params:
                continue
            self._prepare_tiles(group, params, local_params, grads)
            if group["rest"] == "sgd":
                self._step_rest(group, params, local_params, grads)
            self._step_active(group, params, local_params, grads)
            for param in params:
                self.state[param]["step"] += 1
        return loss

    def _step_rest(
        self, group: dict[str, Any], params: list[Tensor], local_params: list[Tensor], grads: list[Tensor]
    ) -> None:
        """``rest="sgd"``: a stateless RLSGD step (``rest_lr``, nearest rounding, no weight decay) on
        every element outside the active tiles. RLSGD steps whole tensors, so the active tiles'
        values are saved before and put back after (the active step then updates them)."""
        tile_size = group["tile_size"]
        partial = [
            slot
            for slot, (param, local) in enumerate(zip(params, local_params, strict=True))
            if self.state[param]["tile_ids"].numel() < num_tiles(local.numel(), tile_size)
        ]
        if not partial:
            return
        on_kernels = [self._tile_kernels_apply(local_params[i], group) for i in partial]
        saved = []
        for slot, kernels in zip(partial, on_kernels, strict=True):
            param, ids = local_params[slot], self.state[params[slot]]["tile_ids"]
            if kernels:  # the pack kernel: no host sync (the reference's partial-tile check reads the ids)
                from sparse_rl_optim.kernels.launch import pack_tiles_triton

                saved.append(pack_tiles_triton(param.detach().view(-1), None, None, ids, tile_size)[1])
            else:
                saved.append(_gather_rows(param, ids, tile_size, param.dtype))
        rlsgd(
            [local_params[i] for i in partial],
            [grads[i] for i in partial],
            [None] * len(partial),
            lr=self._rest_lr(group),
            maximize=group["maximize"],
            backend=group["backend"],
        )
        for slot, rows, kernels in zip(partial, saved, on_kernels, strict=True):
            param, ids = local_params[slot], self.state[params[slot]]["tile_ids"]
            if kernels:
                from sparse_rl_optim.kernels.launch import apply_tiles_triton

                apply_tiles_triton(param.detach().view(-1), rows, ids, tile_size, False)
            else:
                _scatter_rows(param, rows, ids, tile_size)

    @staticmethod
    def _tile_kernels_apply(param: Tensor, group: dict[str, Any]) -> bool:
        """Whether the Triton tile kernels save and restore ``param``'s active tiles (CUDA, or the
        interpreter with ``backend="triton"``; contiguous params)."""
        return param.is_contiguous() and resolve_backend(group["backend"], [param]) == "triton"

    def _rest_lr(self, group: dict[str, Any]) -> float:
        """``rest_lr`` following the group's lr: ``rest_lr * lr / rest_lr_base``, ``rest_lr_base`` the
        group's lr when it was added (so any LR scheduler, or a manual change of lr, scales both);
        ``lr`` itself when ``rest_lr`` is None (DenseBlockSGD)."""
        if group["rest_lr"] is None:
            return float(group["lr"])
        base = group.get("rest_lr_base") or 0.0
        return float(group["rest_lr"]) * float(group["lr"]) / base if base else float(group["rest_lr"])

    def _step_active(
        self, group: dict[str, Any], params: list[Tensor], local_params: list[Tensor], grads: list[Tensor]
    ) -> None:
        """The update of the active tiles: ``params`` key the state, ``local_params`` are stepped."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """As ``Optimizer.state_dict``. For params sharded by FSDP2 it is collective (every rank
        calls it, in the same order as the other ranks, as ``torch.distributed.checkpoint`` does)
        and shows the single-process layout (global, sorted ``tile_ids``; rows in their order),
        each per-tile tensor a ``DTensor`` split on dim 0 over the param's mesh (see the module
        docstring). Costs, per sharded tensor with state: an all-reduce of 4 bytes per tile (which
        tiles are active) and one of each per-active-tile state tensor (``tile_steps``, the rows:
        ``4 * n_active * tile_size`` bytes per row key), and ``grad_energy`` (4 bytes per tile);
        every rank holds one tensor's full state while it is split."""
        state_dict = super().state_dict()
        entries = self._entries_by_index(state_dict)
        if not entries:
            return state_dict
        state = dict(state_dict["state"])
        for index, param, group in entries:
            entry = state.get(index)
            if isinstance(entry, dict) and "tile_ids" in entry:
                state[index] = self._global_entry(param, group, entry)
        return {**state_dict, "state": state}

    def _entries_by_index(self, state_dict: dict[str, Any]) -> list[tuple[Any, Tensor, dict[str, Any]]]:
        """``(key in state_dict["state"], param, group)`` for each sharded param (none: []), keys as
        ``Optimizer.load_state_dict`` pairs them (the saved groups' ``params``, in order)."""
        params = [param for group in self.param_groups for param in group["params"]]
        if not any(is_sharded(param) for param in params):
            return []
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            return []  # torch raises its own error
        return [
            (key, param, group)
            for saved, group in zip(saved_groups, self.param_groups, strict=True)
            for key, param in zip(saved["params"], group["params"], strict=False)
            if is_sharded(param)
        ]

    def _global_entry(self, param: Tensor, group: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
        """This rank's state of a sharded ``param`` in the single-process layout (collective)."""
        tile_size = group["tile_size"]
        layout = self._layout(param, tile_size)
        ids = entry["tile_ids"]
        out = dict(entry)
        if layout.aligned:
            owned = ids + layout.first_tile
            active = torch.zeros(layout.global_tiles, dtype=torch.int32, device=ids.device)
            active[owned] = 1
            chosen = merge_shards_(active, param).nonzero().reshape(-1)
            slots = torch.searchsorted(chosen, owned)
            out["tile_ids"] = chosen
            for key in _PER_ACTIVE_TILE[1:]:
                if key in entry:
                    value = entry[key]
                    whole = torch.zeros((chosen.numel(), *value.shape[1:]), dtype=value.dtype, device=value.device)
                    whole[slots] = value
                    out[key] = merge_shards_(whole, param)
            if "grad_energy" in entry:
                out["grad_energy"] = layout.merge_per_tile(entry["grad_energy"], param)
        else:
            # A densely handled tensor (every tile of this rank's part active) cut between tiles:
            # its state moves element by element.
            size = layout.stop - layout.start
            total = layout.global_tiles
            out["tile_ids"] = torch.arange(total, device=ids.device)
            out.pop("grad_energy", None)
            for key in _ROW_KEYS:
                if key in entry:
                    flat = torch.zeros(total * tile_size, dtype=entry[key].dtype, device=ids.device)
                    flat[layout.start : layout.stop] = entry[key].reshape(-1)[:size]
                    out[key] = merge_shards_(flat, param).view(total, tile_size)
            if "tile_steps" in entry:
                steps = entry["tile_steps"]
                per_element = torch.zeros(total * tile_size, dtype=steps.dtype, device=ids.device)
                per_element[layout.start : layout.stop] = steps.repeat_interleave(tile_size)[:size]
                out["tile_steps"] = merge_shards_(per_element, param)[::tile_size].clone()
        for key in (*_PER_ACTIVE_TILE, *_PER_TILE):
            if key in out:
                out[key] = split_rows_like(out[key], param)
        return out

    def _local_entries(self, state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[int, int]]:
        """``state_dict`` with the state of sharded params in this rank's layout (collective), and
        the number of selected tiles of each (by ``id(param)``). State given as ``DTensor`` s is
        all-gathered, plain tensors (a single-process or full state dict) are taken as they are;
        one entry at a time, each cut to this rank's part before the next is gathered, so at most
        one tensor's full state is held at once."""
        counts: dict[int, int] = {}
        state = state_dict.get("state")
        if not isinstance(state, dict):
            return state_dict, counts
        owners = {key: (param, group) for key, param, group in self._entries_by_index(state_dict)}
        settings_of: dict[int, dict[str, Any]] = {}
        if owners:
            settings_of = {
                id(group): {**group, **{k: v for k, v in saved.items() if k != "params"}}
                for saved, group in zip(state_dict["param_groups"], self.param_groups, strict=True)
            }
        local = dict(state)
        changed = False
        for key in sorted(local, key=str):  # the same order on every rank: all-gathers pair up
            entry = local[key]
            if not isinstance(entry, dict) or "tile_ids" not in entry:
                continue
            distributed = any(is_dtensor(value) for value in entry.values())
            if not distributed and key not in owners:
                continue
            local[key] = self._local_entry_of(entry, owners.get(key), settings_of, counts)
            changed = True
        return ({**state_dict, "state": local} if changed else state_dict), counts

    def _local_entry_of(
        self,
        entry: dict[str, Any],
        owner: tuple[Tensor, dict[str, Any]] | None,
        settings_of: dict[int, dict[str, Any]],
        counts: dict[int, int],
    ) -> dict[str, Any]:
        """One entry of :meth:`_local_entries`: gathered whole, then (for a sharded ``owner``
        param) checked and cut to this rank's part; the whole state is freed on return."""
        whole = {name: _full(entry[name]) for name in sorted(entry, key=str)}
        if owner is None:
            return whole
        param, group = owner
        settings = settings_of[id(group)]
        _validate_common(settings)
        _check_state_layout(whole, param.numel(), param.shape, settings, self._row_keys(settings))
        counts[id(param)] = whole["tile_ids"].numel()
        return self._local_entry(param, group, whole)

    def _local_entry(self, param: Tensor, group: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
        """The part of a single-process layout state (full tensors) this rank keeps for ``param``."""
        tile_size = group["tile_size"]
        layout = self._layout(param, tile_size)
        chosen = entry["tile_ids"]
        out = dict(entry)
        if layout.aligned:
            first = layout.first_tile
            mine = (chosen >= first) & (chosen < first + layout.local_tiles)
            out["tile_ids"] = chosen[mine] - first
            for key in _PER_ACTIVE_TILE[1:]:
                if key in entry:
                    out[key] = entry[key][mine]
            energy = entry.get("grad_energy")
            if energy is not None:
                out["grad_energy"] = energy[first : first + layout.local_tiles].clone()
        else:  # every tile of this rank's part active (a densely handled tensor): element by element
            size = layout.stop - layout.start
            total, count = layout.global_tiles, layout.local_tiles
            out["tile_ids"] = torch.arange(count, device=chosen.device)
            out.pop("grad_energy", None)
            for key in _ROW_KEYS:
                if key in entry:
                    rows = torch.zeros(total, tile_size, dtype=entry[key].dtype, device=chosen.device)
                    rows[chosen] = entry[key]
                    local = torch.zeros(count * tile_size, dtype=rows.dtype, device=chosen.device)
                    local[:size] = rows.reshape(-1)[layout.start : layout.stop]
                    out[key] = local.view(count, tile_size)
            if "tile_steps" in entry:
                steps = torch.zeros(total, dtype=entry["tile_steps"].dtype, device=chosen.device)
                steps[chosen] = entry["tile_steps"]
                starts = layout.start + torch.arange(count, device=chosen.device) * tile_size
                out["tile_steps"] = steps[starts // tile_size]
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``, but state keeps its dtypes (fp32 rows, int64 tile ids,
        int32 tile steps, a CPU int64 step counter) instead of being cast to the param dtype, and its
        layout is checked against the params and the groups' ``tile_size`` before anything is
        loaded. A state dict from another optimizer (e.g. ``torch.optim.AdamW``): the settings it
        lacks (``density``, ``tile_size``, ...) are kept from this optimizer's groups, settings this
        optimizer does not have (``amsgrad``, ``fused``, ...) are dropped, and its per-param state,
        which has no tiles, is dropped (the tiles are selected on the next step, their state starts
        from zero); all with a warning. Under FSDP2 it is collective (module docstring, which also
        says what resuming with ``torch.distributed.checkpoint`` after a density change needs)."""
        name = type(self).__name__
        state_dict, selected_counts = self._local_entries(state_dict)
        own = {"lr", *_COMMON_DEFAULTS, *self._extra_defaults()}
        # (torch adds "differentiable" to every group; LR schedulers add "initial_lr")
        known = {*own, "params", "initial_lr", "rest_lr_base", "differentiable"}

        def prepare(incoming: dict[str, Any]) -> None:
            saved_groups = incoming["param_groups"]
            if len(saved_groups) != len(self.param_groups):
                return  # torch raises its own error
            missing = sorted({key for group in saved_groups for key in own if key not in group})
            foreign = sorted({key for group in saved_groups for key in group if key not in known})
            if missing or foreign:
                incoming["param_groups"] = [
                    {
                        **{key: value for key, value in current.items() if key != "params"},
                        **{key: value for key, value in saved.items() if key in known},
                    }
                    for current, saved in zip(self.param_groups, saved_groups, strict=True)
                ]
                warn(
                    f"{name}.load_state_dict: the state dict was not saved by {name}"
                    + (f"; it lacks {missing}, kept from this optimizer" if missing else "")
                    + (f"; dropped settings {name} does not have: {foreign}" if foreign else "")
                )
            # Check the layout now, before torch swaps anything in.
            for current, saved in zip(self.param_groups, incoming["param_groups"], strict=True):
                settings = {**current, **saved}
                _validate_common(settings)
                for index, param in zip(saved["params"], current["params"], strict=False):
                    entry = incoming.get("state", {}).get(index)
                    if isinstance(entry, dict) and "tile_ids" in entry:
                        numel = local_tensor(param).numel()  # this rank's part (FSDP2: its shard)
                        _check_state_layout(entry, numel, param.shape, settings, self._row_keys(settings))

        load_state_dict_keeping_dtypes(
            self, super().load_state_dict, state_dict, dtype_of=lambda param, key, value: value.dtype, inspect=prepare
        )
        untiled = [param for param, state in self.state.items() if state and "tile_ids" not in state]
        if untiled:
            keys = sorted({key for param in untiled for key in self.state[param]})
            for param in untiled:
                del self.state[param]
            warn(
                f"{name}.load_state_dict: dropped the state of {len(untiled)} params that has no tiles "
                f"(keys {keys}: not saved by a dense-block optimizer); their tiles are selected on the next step"
            )
        for state in self.state.values():
            # On the CPU, as created: reading it then never waits for a GPU (torch may move it).
            state["step"] = torch.tensor(int(state["step"]), dtype=torch.int64)
        self.__dict__.setdefault("_selected_counts", {}).update(selected_counts)

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (measured, as :func:`optimizer_state_bytes`)."""
        return optimizer_state_bytes(self)

    def state_bytes_report(self) -> dict[str, int]:
        """Where the state bytes go, measured, and the documented bound they satisfy::

            total <= budget + overhead
            budget   = sum over blocked tensors of B * density * numel
            overhead = sum over blocked tensors of B * tile_size   (whole tiles: rounding up)
                       + index + selection + dense

        ``B`` is the bytes of row state per active element (8 for AdamW's two fp32 moments, 4 for
        SGD's fp32 momentum, 0 without). ``index``: tile ids (8 B per active tile), tile step counts
        (4 B per active tile) and step counters; ``selection``: gradient energy (4 B per tile of a
        blocked tensor, kept only with ``reselect_every`` and ``select="grad"|"off_principal"``);
        ``dense``: every state byte of densely handled tensors (``is_dense``).

        Under FSDP2 the report is this rank's: its state and the elements it holds (``numel`` of its
        shards). The bound holds for the sum over the ranks; one rank may hold more than its
        ``density`` share of a tensor's tiles, since the selection is global (module docstring).
        """
        report = dict.fromkeys(
            ("rows", "index", "selection", "dense", "total", "budget", "overhead", "blocked_numel", "dense_numel"), 0
        )
        for group in self.param_groups:
            per_element = 4 * len(self._row_keys(group))
            for param in group["params"]:
                state = self.state.get(param, {})
                sizes = {
                    key: value.numel() * value.element_size()
                    for key, value in state.items()
                    if isinstance(value, Tensor)
                }
                numel = local_tensor(param).numel()  # this rank's part
                if self.is_dense(param, group):
                    report["dense"] += sum(sizes.values())
                    report["dense_numel"] += numel
                    continue
                report["rows"] += sum(size for key, size in sizes.items() if key in _ROW_KEYS)
                report["index"] += sum(size for key, size in sizes.items() if key in _INDEX_KEYS)
                report["selection"] += sizes.get("grad_energy", 0)
                report["blocked_numel"] += numel
                report["budget"] += int(per_element * group["density"] * numel)
                report["overhead"] += per_element * group["tile_size"]
        report["overhead"] += report["index"] + report["selection"] + report["dense"]
        report["total"] = report["rows"] + report["index"] + report["selection"] + report["dense"]
        return report

    def active_tiles(self) -> dict[Tensor, Tensor]:
        """param -> sorted int64 ids of its active tiles (params that have stepped). Under FSDP2:
        the global ids of the active tiles in this rank's shard (for a densely handled tensor
        whose shards do not start on tile boundaries: every tile that overlaps the shard)."""
        tile_sizes = {id(param): group["tile_size"] for group in self.param_groups for param in group["params"]}
        active = {}
        for param, state in self.state.items():
            if "tile_ids" not in state:
                continue
            ids = state["tile_ids"]
            if id(param) in tile_sizes and is_sharded(param):
                tile_size = tile_sizes[id(param)]
                layout = self._layout(param, tile_size)
                if layout.aligned:
                    ids = ids + layout.first_tile
                elif layout.stop > layout.start:
                    ids = torch.arange(layout.start // tile_size, num_tiles(layout.stop, tile_size), device=ids.device)
            active[param] = ids
        return active


class DenseBlockAdamW(_DenseBlockOptimizer):
    r"""AdamW whose moments exist only for the active tiles of each weight matrix.

    Per step, on the active tiles (``s`` = the tile's steps since it became active; fp32, each
    operation rounded separately, formula in :func:`~sparse_rl_optim.optim.dense_block_functional.
    dense_block_adamw`)::

        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g * g
        p = round_nearest( p * (1 - lr * wd) - lr / (1 - beta1**s) * m / (sqrt(v) / sqrt(1 - beta2**s) + eps) )

    Elements outside the active tiles stay bit-identical (``rest="freeze"``) or get a stateless
    RLSGD step ``p -= rest_lr * g`` (``rest="sgd"``; no weight decay). At ``density=1`` this is
    AdamW (tested against ``torch.optim.AdamW``: fp32 weights within 2e-6 relative after 150 steps).

    Args:
        params: iterable of parameters or param groups (any setting below may differ per group).
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled weight decay, applied
            to the active tiles only).
        density: fraction of each blocked tensor's tiles that is active:
            ``max(1, floor(density * num_tiles))`` tiles.
        tile_size: elements per tile (a power of two, 32 to 16384; see :mod:`sparse_rl_optim.tiles`).
        select: ``"grad"``, ``"random"`` or ``"off_principal"``
            (:mod:`sparse_rl_optim.optim.tile_selection`, with sources).
        reselect_every: reselect the tiles every this many steps (``None`` or 0: keep the first
            choice). A tile that leaves drops its moments; a tile that enters starts from zero with
            its own bias correction. ``"grad"`` ranks by the gradient energy summed since the last
            selection; the first selection uses the first step's gradient.
        rest: ``"freeze"`` or ``"sgd"`` (then ``rest_lr`` is required: SGD needs a far larger
            learning rate than AdamW, ~0.1 in RL). ``rest_lr`` follows the group's lr: it is scaled by
            ``lr / (the lr when the group was added)``, so LR schedulers move both.
        dense_below: tensors with fewer elements, and every tensor with fewer than 2 dimensions,
            are handled densely: all tiles active, full AdamW state (counted in the memory report).
        principal_rank, principal_fraction: the rank-k reconstruction and the top fraction of
            ``"off_principal"`` (defaults from GeoRA: r = 16, rho = 0.2).
        seed: seed of ``"random"`` selection.
        maximize: maximize the objective.
        backend: ``"auto"`` (the fused Triton kernel on CUDA tensors, torch elsewhere), ``"torch"``
            or ``"triton"`` (on CPU only under ``TRITON_INTERPRET=1``).

    Memory: ``state_bytes_report()`` (at most ``8 * density`` bytes per blocked parameter plus the
    documented overhead; :func:`~sparse_rl_optim.optimizer_state_bytes` measures the same total).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        density: float = 0.05,
        tile_size: int = 64,
        select: str = "grad",
        reselect_every: int | None = 100,
        rest: str = "freeze",
        rest_lr: float | None = None,
        maximize: bool = False,
        dense_below: int = 4096,
        principal_rank: int = 16,
        principal_fraction: float = 0.2,
        seed: int = 0,
        backend: str = "auto",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            density=density,
            tile_size=tile_size,
            select=select,
            reselect_every=reselect_every,
            rest=rest,
            rest_lr=rest_lr,
            maximize=maximize,
            dense_below=dense_below,
            principal_rank=principal_rank,
            principal_fraction=principal_fraction,
            seed=seed,
            backend=backend,
        )
        super().__init__(params, defaults)

    @classmethod
    def _extra_defaults(cls) -> dict[str, Any]:
        return {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}

    def _row_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _validate_group(self, group: dict[str, Any]) -> None:
        _validate_lr(group["lr"])
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_real(b) for b in betas)) or not all(
            0.0 <= b < 1.0 for b in betas
        ):
            raise ValueError(f"Invalid betas: {betas!r} (two numbers, each in [0, 1))")
        _check_real("epsilon", group["eps"], 0.0)
        if group["eps"] == 0.0:
            raise ValueError("Invalid epsilon value: 0.0 (must be > 0: it keeps m / (sqrt(v) + eps) finite)")
        _check_real("weight_decay", group["weight_decay"], 0.0)
        if group["rest"] == "sgd" and group["rest_lr"] is None:
            raise ValueError(
                "DenseBlockAdamW(rest='sgd') needs rest_lr: the SGD step on the elements outside the "
                "active tiles needs a learning rate of its own (SGD in RL works at ~0.1, AdamW at ~1e-6)"
            )

    def _step_active(
        self, group: dict[str, Any], params: list[Tensor], local_params: list[Tensor], grads: list[Tensor]
    ) -> None:
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        dense_block_adamw(
            local_params,
            grads,
            [s["tile_ids"] for s in states],
            [s["tile_steps"] for s in states],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            tile_size=group["tile_size"],
            max_step=max(int(s["step"].item()) for s in states) + 1,
            backend=group["backend"],
            check_tile_ids=False,  # sorted, distinct and in range by construction (and checked on load)
        )


class DenseBlockSGD(_DenseBlockOptimizer):
    r"""SGD on the active tiles of each weight matrix, with momentum (when asked) only there.

    On the active tiles, RLSGD's formula with nearest rounding (fp32, each operation rounded)::

        buf = g (a tile's first step) or momentum * buf + (1 - dampening) * g
        d   = g + momentum * buf if nesterov else buf     (d = g without momentum)
        p   = round_nearest( p * (1 - lr * wd) - lr * d )

    Elements outside stay bit-identical (``rest="freeze"``) or get a stateless RLSGD step
    ``p -= rest_lr * g`` (``rest="sgd"``; ``rest_lr`` defaults to ``lr``; no weight decay). With
    ``momentum=0`` the state is the tile ids, a step counter and (for reselection by gradient) the
    per-tile gradient energy. Tile selection, dense handling of small tensors, ``backend`` and the
    memory report: as :class:`DenseBlockAdamW`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        density: float = 0.05,
        tile_size: int = 64,
        select: str = "grad",
        reselect_every: int | None = 100,
        rest: str = "freeze",
        rest_lr: float | None = None,
        maximize: bool = False,
        dense_below: int = 4096,
        principal_rank: int = 16,
        principal_fraction: float = 0.2,
        seed: int = 0,
        backend: str = "auto",
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            density=density,
            tile_size=tile_size,
            select=select,
            reselect_every=reselect_every,
            rest=rest,
            rest_lr=rest_lr,
            maximize=maximize,
            dense_below=dense_below,
            principal_rank=principal_rank,
            principal_fraction=principal_fraction,
            seed=seed,
            backend=backend,
        )
        super().__init__(params, defaults)

    @classmethod
    def _extra_defaults(cls) -> dict[str, Any]:
        return {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}

    def _validate_group(self, group: dict[str, Any]) -> None:
        _validate_lr(group["lr"])
        _check_real("momentum", group["momentum"], 0.0)
        _check_real("dampening", group["dampening"], 0.0, 1.0, closed_high=True)
        _check_real("weight_decay", group["weight_decay"], 0.0)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")

    def _row_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _step_active(
        self, group: dict[str, Any], params: list[Tensor], local_params: list[Tensor], grads: list[Tensor]
    ) -> None:
        states = [self.state[p] for p in params]
        has_momentum = group["momentum"] != 0
        dense_block_sgd(
            local_params,
            grads,
            [s["tile_ids"] for s in states],
            [s["tile_steps"] if has_momentum else None for s in states],
            [s["momentum_buffer"] if has_momentum else None for s in states],
            lr=float(group["lr"]),
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            tile_size=group["tile_size"],
            backend=group["backend"],
            check_tile_ids=False,  # sorted, distinct and in range by construction (and checked on load)
        )


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_real(name: str, value: Any, low: float, high: float = math.inf, *, closed_high: bool = False) -> None:
    """``value`` a finite real in ``[low, high)`` (``[low, high]`` with ``closed_high``); else ValueError."""
    ok = _is_real(value) and math.isfinite(value) and low <= value and (value <= high if closed_high else value < high)
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number in [{low}, {high}{bracket})")


def _validate_lr(lr: float | Tensor) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be a 1-element tensor, got shape {tuple(lr.shape)}")
        lr = float(lr)
    if not _is_real(lr) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"Invalid learning rate: {lr!r} (must be >= 0 and finite)")


def _validate_common(settings: dict[str, Any]) -> None:
    density = settings["density"]
    if not _is_real(density) or not 0.0 < density <= 1.0:
        raise ValueError(f"Invalid density: {density!r} (must be in (0, 1])")
    check_tile_size(int(settings["tile_size"]) if _is_count(settings["tile_size"]) else settings["tile_size"])
    if settings["select"] not in SELECTION_STRATEGIES:
        raise ValueError(f"Unknown select {settings['select']!r}; expected one of {SELECTION_STRATEGIES}")
    every = settings["reselect_every"]
    if every is not None and (not _is_count(every) or every < 0):
        raise ValueError(f"Invalid reselect_every: {every!r} (a number of steps >= 0, or None)")
    if settings["rest"] not in REST_MODES:
        raise ValueError(f"Unknown rest {settings['rest']!r}; expected one of {REST_MODES}")
    if settings["rest_lr"] is not None:
        _check_real("rest_lr", settings["rest_lr"], 0.0)
    if not _is_count(settings["dense_below"]) or settings["dense_below"] < 0:
        raise ValueError(f"Invalid dense_below: {settings['dense_below']!r} (a number of elements >= 0)")
    if not _is_count(settings["principal_rank"]) or settings["principal_rank"] < 1:
        raise ValueError(f"Invalid principal_rank: {settings['principal_rank']!r} (must be >= 1)")
    fraction = settings["principal_fraction"]
    if not _is_real(fraction) or not 0.0 < fraction < 1.0:
        raise ValueError(f"Invalid principal_fraction: {fraction!r} (must be in (0, 1))")
    if not _is_count(settings["seed"]):
        raise ValueError(f"Invalid seed: {settings['seed']!r} (an integer)")
    check_backend(settings["backend"])


def _full(value: Any) -> Any:
    """A ``DTensor`` as the full tensor (an all-gather), anything else as it is."""
    return value.full_tensor() if is_dtensor(value) else value


def _check_state_layout(
    state: dict[str, Any], numel: int, shape: tuple[int, ...], group: dict[str, Any], rows: tuple[str, ...]
) -> None:
    """A loaded state must describe a param of ``numel`` elements (of ``shape``, for the message;
    this rank's part under FSDP2) in this group's tile geometry."""
    tile_ids = state.get("tile_ids")
    if tile_ids is None:
        return
    tile_size = group["tile_size"]
    total = num_tiles(numel, tile_size)
    problem = None
    if state.get("tile_size", tile_size) != tile_size:
        problem = f"its tile ids are of tiles of {state['tile_size']}, the group's tile_size is {tile_size}"
    elif tile_ids.dim() != 1 or tile_ids.dtype != torch.int64:
        problem = f"tile_ids must be 1-D int64, got {tuple(tile_ids.shape)} {tile_ids.dtype}"
    elif tile_ids.numel() and (
        int(tile_ids.min()) < 0 or int(tile_ids.max()) >= total or bool((tile_ids.diff() <= 0).any())
    ):
        problem = f"tile_ids must be sorted, distinct and in [0, {total}) for tile_size={tile_size}"
    else:
        for key in rows:
            value = state.get(key)
            if value is not None and tuple(value.shape) != (tile_ids.numel(), tile_size):
                problem = f"{key} has shape {tuple(value.shape)}, expected ({tile_ids.numel()}, {tile_size})"
        steps = state.get("tile_steps")
        if steps is not None and tuple(steps.shape) != (tile_ids.numel(),):
            problem = f"tile_steps has shape {tuple(steps.shape)}, expected ({tile_ids.numel()},)"
        elif steps is not None and steps.numel():
            # A tile cannot be older than the optimizer (the bias-correction table is sized by step).
            step = int(state["step"]) if "step" in state else 0
            if steps.is_floating_point() or int(steps.min()) < 0 or int(steps.max()) > step:
                problem = f"tile_steps must be integers in [0, step={step}]"
    if problem:
        raise ValueError(f"loaded dense-block state does not fit a parameter of shape {tuple(shape)}: {problem}")
