"""Dense-block optimizers: AdamW and SGD whose state and updates live on selected dense tiles.

RL updates of LLMs are sparse and avoid the principal directions of the weights ("The Path Not
Taken", arXiv 2511.08567; GeoRA, arXiv 2601.09361), but unstructured sparse updates run slower than
dense ones on GPUs. :class:`DenseBlockAdamW` and :class:`DenseBlockSGD` keep optimizer state only
for a ``density`` fraction of each weight matrix, chosen as whole tiles of
:mod:`sparse_rl_optim.tiles` (contiguous runs of ``tile_size`` elements), so every step is dense work:
gather the active tiles' gradients into dense rows, update, scatter back
(:mod:`sparse_rl_optim.optim.dense_block_functional`, a fused Triton kernel on CUDA).

Tile selection: :mod:`sparse_rl_optim.optim.tile_selection`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sparse_rl_optim._backend import check_backend, check_triton_available, resolve_backend
from sparse_rl_optim._warnings import warn
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
from sparse_rl_optim.tiles import check_tile_size, num_tiles

__all__ = ["DenseBlockAdamW", "DenseBlockSGD"]

REST_MODES = ("freeze", "sgd")
#: Moments and momentum buffers are fp32 whatever the param dtype (so they keep contributions far
#: below a bf16 ulp), which is where AdamW's 8 bytes per element come from.
_ROW_DTYPE = torch.float32
#: State keys holding dense rows ``[n_active, tile_size]`` (one per active tile).
_ROW_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")
#: State keys that are bookkeeping: the index overhead of the memory bound.
_INDEX_KEYS = ("tile_ids", "tile_steps", "step")

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

    def _prepare_tiles(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Create the state of new params, accumulate gradient energy, and (re)select tiles where due:
        on the first step, every ``reselect_every`` steps, and when the group's ``density`` (or a
        tensor's dense handling) no longer matches the active tiles."""
        tile_size = group["tile_size"]
        needs_energy = group["select"] in USES_GRAD_ENERGY
        every = group["reselect_every"]
        positions: dict[int, int] | None = None
        for param, grad in zip(params, grads, strict=True):
            state = self.state[param]
            if "tile_ids" not in state:
                state["step"] = torch.tensor(0, dtype=torch.int64)  # on the CPU: reading it never syncs
            step = int(state["step"].item())  # a CPU tensor: no device sync
            total = num_tiles(param.numel(), tile_size)
            if "tile_ids" in state:
                self._check_rows(param, group)
            if self.is_dense(param, group) or group["density"] >= 1.0:
                if "tile_ids" not in state or state["tile_ids"].numel() != total:
                    self._warn_if_flat(param, group)
                    self._set_tiles(param, group, torch.arange(total, device=param.device))
                continue
            wanted = n_active_tiles(param.numel(), tile_size, group["density"])
            first = "tile_ids" not in state
            resized = not first and state["tile_ids"].numel() != wanted  # density changed
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
            chosen = select_tiles(
                group["select"],
                weight=param,
                n_active=wanted,
                tile_size=tile_size,
                grad_energy=energy,
                seed=group["seed"],
                tensor_index=positions[id(param)],
                selection_round=step // every if every else 0,
                principal_rank=group["principal_rank"],
                principal_fraction=group["principal_fraction"],
                name=f"param {positions[id(param)]} {tuple(param.shape)}",
            )
            self._set_tiles(param, group, chosen)
            if "grad_energy" in state:
                state["grad_energy"] = torch.zeros_like(state["grad_energy"])  # a new window

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
        new_rows = {key: torch.zeros(count, tile_size, dtype=_ROW_DTYPE, device=param.device) for key in row_keys}
        new_steps = torch.zeros(count, dtype=torch.int32, device=param.device)
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
            params, grads = [], []
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if param.grad.shape != param.shape:
                    raise RuntimeError(
                        f"gradient of shape {tuple(param.grad.shape)} for a parameter of shape {tuple(param.shape)}"
                    )
                params.append(param)
                grads.append(param.grad)
            if not params:
                continue
            self._prepare_tiles(group, params, grads)
            if group["rest"] == "sgd":
                self._step_rest(group, params, grads)
            self._step_active(group, params, grads)
            for param in params:
                self.state[param]["step"] += 1
        return loss

    def _step_rest(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """``rest="sgd"``: a stateless RLSGD step (``rest_lr``, nearest rounding, no weight decay) on
        every element outside the active tiles. RLSGD steps whole tensors, so the active tiles'
        values are saved before and put back after (the active step then updates them)."""
        tile_size = group["tile_size"]
        partial = [
            slot
            for slot, param in enumerate(params)
            if self.state[param]["tile_ids"].numel() < num_tiles(param.numel(), tile_size)
        ]
        if not partial:
            return
        on_kernels = [self._tile_kernels_apply(params[i], group) for i in partial]
        saved = []
        for slot, kernels in zip(partial, on_kernels, strict=True):
            param, ids = params[slot], self.state[params[slot]]["tile_ids"]
            if kernels:  # the pack kernel: no host sync (the reference's partial-tile check reads the ids)
                from sparse_rl_optim.kernels.launch import pack_tiles_triton

                saved.append(pack_tiles_triton(param.detach().view(-1), None, None, ids, tile_size)[1])
            else:
                saved.append(_gather_rows(param, ids, tile_size, param.dtype))
        rlsgd(
            [params[i] for i in partial],
            [grads[i] for i in partial],
            [None] * len(partial),
            lr=self._rest_lr(group),
            maximize=group["maximize"],
            backend=group["backend"],
        )
        for slot, rows, kernels in zip(partial, saved, on_kernels, strict=True):
            param, ids = params[slot], self.state[params[slot]]["tile_ids"]
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

    @staticmethod
    def _tile_kernels_apply(param: Tensor, group: dict[str, Any]) -> bool:
        """Whether the Triton tile kernels save and restore ``param``'s active tiles (CUDA, or the
        interpreter with ``backend="triton"``; contiguous params)."""
        return param.is_contiguous() and resolve_backend(group["backend"], [param]) == "triton"

    def _step_active(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``, but state keeps its dtypes (fp32 rows, int64 tile ids,
        int32 tile steps, a CPU int64 step counter) instead of being cast to the param dtype, and its
        layout is checked against the params and the groups' ``tile_size`` before anything is
        loaded. A state dict from another optimizer (e.g. ``torch.optim.AdamW``): the settings it
        lacks (``density``, ``tile_size``, ...) are kept from this optimizer's groups, settings this
        optimizer does not have (``amsgrad``, ``fused``, ...) are dropped, and its per-param state,
        which has no tiles, is dropped (the tiles are selected on the next step, their state starts
        from zero); all with a warning."""
        name = type(self).__name__
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
                        _check_state_layout(entry, param, settings, self._row_keys(settings))

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
                if self.is_dense(param, group):
                    report["dense"] += sum(sizes.values())
                    report["dense_numel"] += param.numel()
                    continue
                report["rows"] += sum(size for key, size in sizes.items() if key in _ROW_KEYS)
                report["index"] += sum(size for key, size in sizes.items() if key in _INDEX_KEYS)
                report["selection"] += sizes.get("grad_energy", 0)
                report["blocked_numel"] += param.numel()
                report["budget"] += int(per_element * group["density"] * param.numel())
                report["overhead"] += per_element * group["tile_size"]
        report["overhead"] += report["index"] + report["selection"] + report["dense"]
        report["total"] = report["rows"] + report["index"] + report["selection"] + report["dense"]
        return report

    def active_tiles(self) -> dict[Tensor, Tensor]:
        """param -> sorted int64 ids of its active tiles (params that have stepped)."""
        return {param: state["tile_ids"] for param, state in self.state.items() if "tile_ids" in state}


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

    def _step_active(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        dense_block_adamw(
            params,
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

    def _step_active(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        states = [self.state[p] for p in params]
        has_momentum = group["momentum"] != 0
        dense_block_sgd(
            params,
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


def _check_state_layout(state: dict[str, Any], param: Tensor, group: dict[str, Any], rows: tuple[str, ...]) -> None:
    """A loaded state must describe this param in this group's tile geometry."""
    tile_ids = state.get("tile_ids")
    if tile_ids is None:
        return
    tile_size = group["tile_size"]
    total = num_tiles(param.numel(), tile_size)
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
        raise ValueError(f"loaded dense-block state does not fit a parameter of shape {tuple(param.shape)}: {problem}")
