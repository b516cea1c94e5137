"""RLSGD: stateless SGD for RL fine-tuning of LLMs, a drop-in for ``torch.optim.AdamW``.

Layout follows ``torch/optim/sgd.py``: the :class:`RLSGD` class validates arguments and holds
``param_groups``; the functional :func:`rlsgd` dispatches to ``_single_tensor_rlsgd`` (the
readable reference, the ground truth every fast path is tested against) or
``_multi_tensor_rlsgd`` (foreach).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sparse_rl_optim._backend import check_backend, check_triton_available, resolve_backend
from sparse_rl_optim._warnings import warn
from sparse_rl_optim.bf16 import (
    compute_dtype,
    gate_view_bits,
    random_bits16,
    round_nearest,
    stochastic_round,
    stochastic_seed,
)
from sparse_rl_optim.distributed import (
    broadcast_int,
    is_dtensor,
    local_parts,
    local_tensor,
    shard_like,
    shard_span,
    wrap_like,
)
from sparse_rl_optim.optim._state_dict import load_state_dict_keeping_dtypes
from sparse_rl_optim.optim.memory import optimizer_state_bytes

__all__ = ["RLSGD", "GateStats", "rlsgd"]

ROUNDING_MODES = ("nearest", "stochastic")

#: Below this lr RLSGD warns: an AdamW-scale lr (~1e-6) times an RL gradient is far below half a
#: bf16 ulp of almost every weight, so SGD would leave the bf16 model bit-identical.
_ADAMW_SCALE_LR = 1e-3
_FP32_MAX = 3.4028234663852886e38

_DEFAULTS: dict[str, Any] = {
    "momentum": 0.0,
    "dampening": 0.0,
    "nesterov": False,
    "weight_decay": 0.0,
    "maximize": False,
    "rounding": "nearest",
    "foreach": None,
    "fused": None,
    "backend": "auto",
}


@dataclass
class GateStats:
    """Per-parameter counts from one step (0-dim int64 tensors, so reading them is the only sync).

    ``intended``: elements whose gradient update was non-zero (``fp32(lr*d) != 0``; weight decay is
    not counted). ``swallowed``: of those, elements whose gate view (the stored bf16/fp16 bits, or the
    bf16 rounding of an fp32 weight) did not change.

    On the Triton path with ``record_changes`` (what :class:`~sparse_rl_optim.PrecisionGateTracker`
    asks for), also from the step kernel: ``tile_changed`` (int32 per tile of
    :mod:`sparse_rl_optim.tiles`, elements whose gate view changed), ``changed_indices`` (flat int64,
    sorted), ``old_bits`` (their int16 gate-view bits before the step; the tracker releases these two
    once it has recorded them) and ``old_checksum`` (int64 sum of all int16 gate-view patterns before
    the step).
    """

    intended: Tensor
    swallowed: Tensor
    tile_changed: Tensor | None = None
    changed_indices: Tensor | None = None
    old_bits: Tensor | None = None
    old_checksum: Tensor | None = None


def _fp32(value: float) -> float:
    """``value`` rounded to the nearest fp32, as a Python float (so torch uses it exactly)."""
    return struct.unpack("f", struct.pack("f", value))[0]


class RLSGD(Optimizer):
    r"""SGD for RL fine-tuning with exact, documented bf16 rounding and no state without momentum.

    For each parameter ``p`` with gradient ``g`` (``g = -g`` if ``maximize``), computed in fp32 for
    bf16/fp16 params (in the param dtype otherwise), each operation rounded separately (no FMA)::

        d   = g                                    (momentum == 0)
        buf = momentum * buf + (1 - dampening) * g (momentum > 0; buf = g on the first step)
        d   = g + momentum * buf if nesterov else buf
        p32 = fp32(p) * fp32(1 - lr * weight_decay)          (decoupled, as AdamW; skipped if wd == 0)
        p   = round( p32 - fp32( fp32(lr) * d ) )

    With ``rounding="nearest"`` ``round`` is round-to-nearest-even to the param dtype, so for bf16::

        p_new = bf16_rtne( fp32(p) - fp32( fp32(lr) * fp32(g) ) )

    With ``rounding="stochastic"`` it is unbiased stochastic rounding to bf16/fp16 (updates below
    half an ulp survive in expectation). Its random bits come from a counter-based hash of (a per-step
    seed drawn from torch's default generator, the tensor's index, the element's index), so
    ``torch.manual_seed`` reproduces a run and every execution path draws the same bits. fp32/fp64
    params always round to nearest (there is no coarser grid to round to). One seed is drawn per
    step (later param groups use a hash of it and their index). With several processes
    (``torch.distributed``) the seed is global rank 0's, broadcast in each step where some param
    group rounds stochastically at a non-zero lr (one int64): every rank of the default group must
    then step an RLSGD configured alike, as data-parallel training does (an RLSGD stepped on some
    ranks only would wait for the others; use ``rounding="nearest"`` there). The element index is
    global, so DDP replicas stay identical and FSDP2 shards get the bits one process would.

    Many processes: under DDP nothing changes; under FSDP2 each rank steps its local shards
    (``DTensor`` params sharded on dim 0, no all-gather) and momentum buffers are ``DTensor`` s
    sharded like their params, for ``torch.distributed.checkpoint``. A stepped param gets an
    (empty) entry in ``state``, so that checkpointing does not run its dummy step on a stepped
    optimizer.

    Differences from ``torch.optim.SGD``: weight decay is decoupled (``p *= 1 - lr*wd``, as in
    AdamW, not ``g += wd*p``); for bf16 params torch's CPU path ``p.add_(g, alpha=-lr)`` rounds lr
    to bf16 first (lr 0.1 acts as 0.10009765625) and may fuse the multiply-add, RLSGD does not.

    Memory: with ``momentum=0`` no per-parameter state at all. With momentum the buffer is fp32 for
    bf16/fp16 params (so momentum keeps contributions below a bf16 ulp) and the param dtype otherwise.

    Learning rate: SGD has no per-parameter normalisation, so AdamW-scale rates (~1e-6) leave bf16
    weights bit-identical. The SGD-in-RL paper reports vanilla SGD at lr ~0.1 (no momentum, bf16
    weights); RLSGD warns below 1e-3. Use :class:`~sparse_rl_optim.PrecisionGateTracker` to see the
    fraction of updates the bf16 gate swallows at your lr.

    Args:
        params: iterable of parameters or param groups.
        lr: learning rate, a float or a 1-element tensor.
        momentum, dampening, nesterov, weight_decay, maximize: as in ``torch.optim.SGD``
            (weight decay decoupled, see above).
        rounding: ``"nearest"`` or ``"stochastic"``.
        foreach: on the torch backend, ``False`` runs the single-tensor reference; ``None`` (default)
            or ``True`` the multi-tensor path (bounded fp32 scratch memory, bit-equal to the reference).
        fused: on the torch backend, ``True`` runs a ``torch.compile``-generated fused kernel (one
            pass per tensor, bit-equal to the reference; the first step compiles for a few seconds;
            falls back to ``foreach`` with a warning where torch.compile cannot run). Like
            ``torch.optim``, ``fused`` and ``foreach`` cannot both be ``True``.
        backend: ``"auto"`` (default) runs the fused Triton kernel on CUDA tensors and torch
            elsewhere; ``"torch"`` always torch; ``"triton"`` always the kernel (on CPU tensors only
            under ``TRITON_INTERPRET=1``, otherwise a clear error). The kernel is bit-equal to the
            reference; it handles bf16/fp16/fp32 params and grads, and runs fp64 or non-contiguous
            tensors through the reference (``foreach`` and ``fused`` do not apply there). On the
            Triton path an attached tracker takes the change counts from the kernel instead of
            snapshotting the weights.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        maximize: bool = False,
        rounding: str = "nearest",
        foreach: bool | None = None,
        fused: bool | None = None,
        backend: str = "auto",
    ) -> None:
        _validate_hyperparameters(lr, momentum, dampening, nesterov, weight_decay, rounding, backend)
        if fused and foreach:
            raise ValueError("`fused` and `foreach` cannot be `True` together.")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            maximize=maximize,
            rounding=rounding,
            foreach=foreach,
            fused=fused,
            backend=backend,
        )
        super().__init__(params, defaults)
        #: Set by :class:`~sparse_rl_optim.PrecisionGateTracker`: collect :class:`GateStats` per step.
        self.gate_stats_enabled = False
        #: Set by the tracker: on the Triton path also record the changed elements (see GateStats).
        self.gate_changes_enabled = False
        #: param -> :class:`GateStats` of the last step (filled only when ``gate_stats_enabled``).
        self.gate_stats: dict[Tensor, GateStats] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _DEFAULTS.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("gate_stats_enabled", False)
        self.__dict__.setdefault("gate_changes_enabled", False)
        self.__dict__.setdefault("gate_stats", {})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``Optimizer.add_param_group``; also validates the group's hyperparameters, rejects a
        parameter listed twice (it would be stepped twice), and warns about settings that the bf16
        gate turns into surprises (an AdamW-scale lr, weight decay that rounds away or bites hard)."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if len({id(p) for p in params}) != len(params):
            raise ValueError("RLSGD got a parameter group that lists the same parameter twice")
        super().add_param_group({**param_group, "params": params})
        group = self.param_groups[-1]
        try:
            _validate_hyperparameters(
                group["lr"],
                group["momentum"],
                group["dampening"],
                group["nesterov"],
                group["weight_decay"],
                group["rounding"],
                group["backend"],
            )
            if group["fused"] and group["foreach"]:
                raise ValueError("`fused` and `foreach` cannot be `True` together.")
            if resolve_backend(group["backend"], params) == "triton":
                for device in {p.device for p in params}:
                    check_triton_available(device, "RLSGD(backend='triton')")
        except Exception:
            self.param_groups.pop()
            raise
        _warn_about_group(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``, but momentum buffers are restored in the compute dtype
        (fp32 for bf16 params) instead of being cast to the param dtype, so state survives a round
        trip exactly. Runs the optimizer's load hooks as usual: user pre-hooks see the whole dict,
        user post-hooks see the restored fp32 buffers."""

        def warn_if_foreign(incoming: dict[str, Any]) -> None:
            if any("rounding" not in group for group in incoming["param_groups"]):
                warn(
                    "Loading a state dict that RLSGD did not save (its param groups lack 'rounding'): "
                    "RLSGD's weight_decay is decoupled (p *= 1 - lr*wd), not added to the gradient as in "
                    "torch.optim.SGD; check the loaded weight_decay."
                )

        # The compute dtype (fp32 for bf16 params): lossless for buffers RLSGD saved, and an exact
        # upcast for a bf16 buffer from elsewhere.
        load_state_dict_keeping_dtypes(
            self,
            super().load_state_dict,
            state_dict,
            dtype_of=lambda param, key, value: compute_dtype(param.dtype),
            inspect=warn_if_foreign,
            keys=("momentum_buffer",),
            place=shard_like,
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.gate_stats = {}
        step_seeds = _step_seeds(self.param_groups)
        for group, step_seed in zip(self.param_groups, step_seeds, strict=True):
            # FSDP2 parameters (DTensors) are stepped on their local shards, with the global index of
            # each shard's first element (stochastic rounding draws its random bits by global index).
            owners, params, grads, momentum_buffers, offsets = [], [], [], [], []
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(
                        "RLSGD does not support sparse gradients; use dense gradients "
                        "(e.g. nn.Embedding(sparse=False))."
                    )
                local_param, local_grad = local_parts(param, "RLSGD")
                # An entry (even an empty one) marks the param as stepped: torch.distributed.checkpoint
                # runs a dummy step (zero grads, lr 0) on optimizers whose `state` is empty.
                state = self.state[param]
                owners.append(param)
                params.append(local_param)
                grads.append(local_grad)
                # Only stochastic rounding reads the element index (so only it needs a Shard(0) layout).
                sharded_stream = is_dtensor(param) and group["rounding"] == "stochastic"
                offsets.append(self._element_offset(param) if sharded_stream else 0)
                buffer = state.get("momentum_buffer") if group["momentum"] != 0 else None
                momentum_buffers.append(None if buffer is None else local_tensor(buffer))
            if not params:
                continue
            stats = rlsgd(
                params,
                grads,
                momentum_buffers,
                lr=group["lr"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                rounding=group["rounding"],
                foreach=group["foreach"],
                fused=group["fused"],
                backend=group["backend"],
                collect_gate_stats=self.gate_stats_enabled,
                record_changes=self.gate_changes_enabled,
                element_offsets=offsets if any(offsets) else None,
                step_seed=step_seed,
            )
            if group["momentum"] != 0:
                for param, buffer in zip(owners, momentum_buffers, strict=True):
                    held = self.state[param].get("momentum_buffer")
                    if held is None or local_tensor(held) is not buffer:
                        # Param-shaped state is laid out like its param (a DTensor under FSDP2), so
                        # torch.distributed.checkpoint saves and loads it sharded.
                        self.state[param]["momentum_buffer"] = wrap_like(buffer, param)
            if stats is not None:
                self.gate_stats.update(zip(owners, stats, strict=True))
        return loss

    def _element_offset(self, param: Tensor) -> int:
        """Flat index, in its full tensor, of the first element of ``param``'s local shard. Cached:
        a param's shape and placements do not change, and working it out (torch's shard geometry)
        took 18-27 us per param here, the lookup 0.3 us: per step and param, under FSDP2."""
        cache = self.__dict__.setdefault("_element_offsets", {})
        hit = cache.get(id(param))
        if hit is None or hit[0] is not param:
            hit = cache[id(param)] = (param, shard_span(param).start)
        return hit[1]

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (0 with ``momentum=0``)."""
        return optimizer_state_bytes(self)

    def gate_change_param_ids(self) -> set[int]:
        """``id()`` of the params whose changed elements a step records in :attr:`gate_stats` (the
        Triton path with ``gate_changes_enabled``), so a tracker need not snapshot them."""
        if not self.gate_changes_enabled:
            return set()
        return {
            id(param)
            for group in self.param_groups
            if resolve_backend(group["backend"], group["params"]) == "triton"
            for param in group["params"]
        }


def _validate_hyperparameters(
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    rounding: str,
    backend: str = "auto",
) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be a 1-element tensor, got shape {tuple(lr.shape)}")
    if not 0.0 <= float(lr) <= _FP32_MAX:
        raise ValueError(f"Invalid learning rate: {float(lr)} (must be >= 0 and finite in fp32)")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum} (must be >= 0)")
    if not 0.0 <= dampening <= 1.0:
        raise ValueError(f"Invalid dampening value: {dampening} (must be in [0, 1])")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"Unknown rounding {rounding!r}; expected one of {ROUNDING_MODES}")
    check_backend(backend)


#: Half a bf16 (fp16) ulp relative to the weight is at least 2**-9 (2**-12): a decoupled decay
#: factor (1 - lr*wd) closer to 1 than that cannot move a weight under round-to-nearest.
_DECAY_GATE = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}


def _warn_about_group(group: dict[str, Any]) -> None:
    lr = float(group["lr"])
    if 0.0 < lr < _ADAMW_SCALE_LR:
        warn(
            f"RLSGD got lr={lr:g}, an AdamW-scale learning rate. Plain SGD has no per-parameter "
            "normalisation: lr * grad is then far below half a bf16 ulp of almost every weight and the "
            "bf16 model stays bit-identical. SGD in RL is reported to work at lr ~0.1 (no momentum, bf16 "
            "weights); attach a PrecisionGateTracker to see how many updates the bf16 gate swallows."
        )
    decay = lr * group["weight_decay"]
    low_precision = {p.dtype for p in group["params"]} & set(_DECAY_GATE)
    if decay == 0 or not low_precision or group["rounding"] != "nearest":
        return
    names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    rounded_away = sorted(names[dtype] for dtype in low_precision if decay < _DECAY_GATE[dtype])
    if rounded_away:
        warn(
            f"RLSGD: lr * weight_decay = {decay:.3g} is too small to move a {'/'.join(rounded_away)} weight: with "
            "rounding='nearest' the decoupled weight decay (the factor 1 - lr*wd) rounds back to the same "
            "value. Use rounding='stochastic' to apply it in expectation, or weight_decay=0."
        )
    if len(rounded_away) < len(low_precision):
        warn(
            f"RLSGD: lr * weight_decay = {decay:.3g} shrinks every weight by {100 * decay:.2g}% per step, "
            "gradient or not. AdamW's weight_decay is tuned for lr ~1e-6; at SGD-scale learning rates "
            "scale it down accordingly."
        )


def rlsgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
    rounding: str = "nearest",
    foreach: bool | None = None,
    fused: bool | None = None,
    backend: str = "auto",
    collect_gate_stats: bool = False,
    record_changes: bool = False,
    element_offsets: list[int] | None = None,
    step_seed: int | None = None,
) -> list[GateStats] | None:
    """Functional RLSGD (see :class:`RLSGD` for the formula). Updates ``params`` in place; new
    momentum buffers are written into ``momentum_buffers``. Returns per-param :class:`GateStats`
    when ``collect_gate_stats`` (or ``record_changes``, which on the Triton path adds the kernel's
    per-tile change counts and the changed elements).

    ``backend``: see :class:`RLSGD`. On the torch backend ``fused=True`` runs the compiled fused
    kernel, ``foreach=False`` the single-tensor reference, and otherwise (the default) the
    multi-tensor path, which works through fp32 scratch buffers of bounded size (so the transient
    memory of a step does not grow with the model). Every path is tested bit-equal to the reference.

    ``element_offsets``: for tensors that are shards of larger ones (FSDP2), the flat index of each
    tensor's first element in its full tensor, so stochastic rounding draws the random bits the
    full tensor would get there (a sharded run then equals a single-process one bit for bit).

    ``step_seed``: stochastic rounding's seed for this call; by default one is drawn from torch's
    default generator (with several processes, rank 0's, broadcast: a collective).
    """
    if fused and foreach:
        raise ValueError("`fused` and `foreach` cannot be `True` together.")
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"Unknown rounding {rounding!r}; expected one of {ROUNDING_MODES}")
    check_backend(backend)
    if not (len(params) == len(grads) == len(momentum_buffers)):
        raise ValueError("params, grads and momentum_buffers must have the same length")
    if element_offsets is not None and len(element_offsets) != len(params):
        raise ValueError("element_offsets must have one entry per param")
    if foreach is None:
        foreach = not torch.jit.is_scripting()
    # One 32-bit seed per step from torch's default generator (so torch.manual_seed reproduces a run);
    # each tensor's random bits derive from it and the element index, whatever path computes them.
    # At lr 0 every result is a representable value that rounding returns unchanged: no draw, so a
    # dummy step (torch.distributed.checkpoint makes one) leaves the random stream alone.
    if rounding != "stochastic" or float(lr) == 0.0:
        step_seed = 0
    elif step_seed is None:
        step_seed = _draw_step_seed()
    # The same keyword arguments for every implementation (as in torch/optim/sgd.py's dispatch).
    options: dict[str, Any] = dict(
        lr=float(lr),
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        maximize=maximize,
        rounding=rounding,
        step_seed=step_seed,
        collect_gate_stats=collect_gate_stats,
        element_offsets=element_offsets,
    )
    if resolve_backend(backend, params) == "triton":
        from sparse_rl_optim.optim._triton import triton_rlsgd

        for device in {p.device for p in params}:
            check_triton_available(device, "RLSGD(backend='triton')")
        return triton_rlsgd(params, grads, momentum_buffers, record_changes=record_changes, **options)
    if fused:
        from sparse_rl_optim.optim._compiled import _compiled_rlsgd

        return _compiled_rlsgd(params, grads, momentum_buffers, **options)
    fn = _multi_tensor_rlsgd if foreach else _single_tensor_rlsgd
    return fn(params, grads, momentum_buffers, **options)


def _step_seeds(param_groups: list[dict[str, Any]]) -> list[int]:
    """One stochastic-rounding seed per param group for an optimizer step: one draw from torch's
    default generator per step (when any group rounds stochastically at a non-zero lr; a group's own
    lr and rounding decide, not which params have gradients, so every rank draws alike), group 0
    gets it as is, later groups a hash of it and their index."""
    stochastic = [group["rounding"] == "stochastic" and float(group["lr"]) != 0.0 for group in param_groups]
    if not any(stochastic):
        return [0] * len(param_groups)
    base = _draw_step_seed()
    return [
        (base if index == 0 else ((base * 0x2C1B3C6D) ^ (index * 0x7FEB352D)) & 0x7FFFFFFF) if uses else 0
        for index, uses in enumerate(stochastic)
    ]


@torch._dynamo.disable
def _draw_step_seed() -> int:
    """A 31-bit seed from torch's default generator, drawn eagerly even inside ``torch.compile``
    (compiled code would draw it from inductor's own generator: a different stream). With several
    processes, global rank 0's seed on every rank: trainers seed ranks differently (TRL's
    ``set_seed(seed, device_specific=True)``), and DDP replicas must round alike, FSDP2 shards as
    one process would."""
    return broadcast_int(int(torch.randint(0, 2**31, (1,)).item()))


def _step_scalars(work_dtype: torch.dtype, lr: float, weight_decay: float) -> tuple[float, float]:
    """``(lr, decay)`` as the compute dtype holds them. In fp32, op by op as a kernel computes them:
    ``lr32 = fp32(lr)``, ``decay = fp32(1 - fp32(lr32 * fp32(wd)))``. (The product of two fp32 values
    is exact in a Python float, and so is ``1 - p`` for any p that does not round to 1 in fp32.)"""
    if work_dtype != torch.float32:
        return lr, 1.0 - lr * weight_decay
    lr32 = _fp32(lr)
    return lr32, _fp32(1.0 - _fp32(lr32 * _fp32(weight_decay)))


def _round_to_param(
    new32: Tensor, dtype: torch.dtype, rounding: str, step_seed: int, index: int, start: int = 0
) -> Tensor:
    """Round the fp32 result to the param dtype; ``start`` is the flat offset of ``new32`` in its param."""
    if dtype == new32.dtype:
        return new32
    if rounding == "stochastic":
        bits = random_bits16(stochastic_seed(step_seed, index), start, new32.numel(), new32.device)
        return stochastic_round(new32, dtype, bits)
    return round_nearest(new32, dtype)


def _single_tensor_rlsgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    rounding: str,
    step_seed: int,
    collect_gate_stats: bool,
    element_offsets: list[int] | None = None,
    tensor_indices: list[int] | None = None,
) -> list[GateStats] | None:
    """The reference: one parameter at a time, the formula op by op. ``tensor_indices`` are the
    tensors' positions in the step (they select the random stream of stochastic rounding), and
    ``element_offsets`` their first elements' indices in their full tensors (the position in it)."""
    stats: list[GateStats] = []
    for slot, (param, grad) in enumerate(zip(params, grads, strict=True)):
        index = slot if tensor_indices is None else tensor_indices[slot]
        offset = 0 if element_offsets is None else element_offsets[slot]
        work_dtype = compute_dtype(param.dtype)
        step_lr, decay = _step_scalars(work_dtype, lr, weight_decay)
        direction = grad.to(work_dtype)
        if maximize:
            direction = -direction
        if momentum != 0:
            buffer = momentum_buffers[slot]
            if buffer is None:
                buffer = direction.clone().detach()
                momentum_buffers[slot] = buffer
            else:
                buffer.mul_(momentum)
                buffer.add_(direction if dampening == 0 else direction * (1 - dampening))
            direction = direction + buffer * momentum if nesterov else buffer
        param32 = param.to(work_dtype, copy=True)
        if decay != 1.0:
            param32 = param32 * decay
        scaled_update = direction * step_lr
        new32 = param32 - scaled_update
        new_value = _round_to_param(new32.contiguous(), param.dtype, rounding, step_seed, index, offset).view(
            param.shape
        )
        if collect_gate_stats:
            before = gate_view_bits(param.detach()).clone()
            param.copy_(new_value)
            intended = scaled_update != 0  # the gradient's intent; weight decay is not counted
            unchanged = before == gate_view_bits(param.detach())
            stats.append(GateStats(intended=intended.sum(), swallowed=(intended & unchanged).sum()))
        else:
            param.copy_(new_value)
    return stats if collect_gate_stats else None


#: Elements per fp32 scratch buffer of the multi-tensor path: on a CPU about the size of L2 (2**18
#: was fastest of 2**14..2**22 in bench/bench_step.py here), on a GPU large enough that each launch
#: does real work. A step's transient memory is two such buffers, whatever the model size.
_SCRATCH_NUMEL = {"cpu": 1 << 18, "cuda": 1 << 24}
_DEFAULT_SCRATCH_NUMEL = 1 << 20


@dataclass
class _Segment:
    """Elements ``start:stop`` (flat, row-major) of parameter ``index``."""

    index: int
    start: int
    stop: int


def _plan_buckets(numels: list[tuple[int, int]], bucket_numel: int) -> list[list[_Segment]]:
    """Cut tensors ``(index, numel)`` into segments and pack them into buckets of at most
    ``bucket_numel`` elements, in order."""
    buckets: list[list[_Segment]] = [[]]
    filled = 0
    for index, numel in numels:
        start = 0
        while start < numel:
            if filled == bucket_numel:
                buckets.append([])
                filled = 0
            stop = min(numel, start + bucket_numel - filled)
            buckets[-1].append(_Segment(index, start, stop))
            filled += stop - start
            start = stop
    return [bucket for bucket in buckets if bucket]


def _multi_tensor_rlsgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    rounding: str,
    step_seed: int,
    collect_gate_stats: bool,
    element_offsets: list[int] | None = None,
) -> list[GateStats] | None:
    """The same formula with ``torch._foreach_*`` ops over buckets of flat segments, through two fp32
    scratch buffers per (device, dtype) group."""
    intended_counts: list[Tensor | int] = [0] * len(params)
    swallowed_counts: list[Tensor | int] = [0] * len(params)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    strided: list[int] = []
    for index, (param, grad) in enumerate(zip(params, grads, strict=True)):
        if param.is_contiguous() and grad.is_contiguous():
            groups.setdefault((param.device, param.dtype), []).append(index)
        else:
            strided.append(index)
    if strided:
        # Non-contiguous params or grads take the reference path one tensor at a time (bit-equal by
        # definition, and no flat copy of every such tensor held at once).
        strided_buffers = [momentum_buffers[i] for i in strided]
        strided_stats = _single_tensor_rlsgd(
            [params[i] for i in strided],
            [grads[i] for i in strided],
            strided_buffers,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            maximize=maximize,
            rounding=rounding,
            step_seed=step_seed,
            collect_gate_stats=collect_gate_stats,
            element_offsets=None if element_offsets is None else [element_offsets[i] for i in strided],
            tensor_indices=strided,
        )
        for slot, i in enumerate(strided):
            momentum_buffers[i] = strided_buffers[slot]
            if strided_stats is not None:
                intended_counts[i] = strided_stats[slot].intended
                swallowed_counts[i] = strided_stats[slot].swallowed

    for (device, dtype), indices in groups.items():
        work_dtype = compute_dtype(dtype)
        step_lr, decay = _step_scalars(work_dtype, lr, weight_decay)
        flat_params = {i: params[i].detach().view(-1) for i in indices}
        flat_grads = {i: grads[i].view(-1) for i in indices}
        flat_buffers: dict[int, Tensor] = {}
        first_step: set[int] = set()
        if momentum != 0:
            for i in indices:
                if momentum_buffers[i] is None:
                    momentum_buffers[i] = torch.empty(params[i].shape, dtype=work_dtype, device=device)
                    first_step.add(i)
                elif not momentum_buffers[i].is_contiguous():
                    momentum_buffers[i] = momentum_buffers[i].contiguous()
                flat_buffers[i] = momentum_buffers[i].view(-1)

        bucket_numel = _SCRATCH_NUMEL.get(device.type, _DEFAULT_SCRATCH_NUMEL)
        group_numel = sum(params[i].numel() for i in indices)
        scratch_direction = torch.empty(min(bucket_numel, group_numel), dtype=work_dtype, device=device)
        scratch_param = torch.empty_like(scratch_direction)
        for bucket in _plan_buckets([(i, params[i].numel()) for i in indices], bucket_numel):
            sizes = [segment.stop - segment.start for segment in bucket]
            total = sum(sizes)
            directions = list(scratch_direction[:total].split(sizes))
            params32 = list(scratch_param[:total].split(sizes))
            param_parts = [flat_params[seg.index][seg.start : seg.stop] for seg in bucket]
            torch._foreach_copy_(directions, [flat_grads[seg.index][seg.start : seg.stop] for seg in bucket])
            if maximize:
                torch._foreach_neg_(directions)
            if momentum != 0:
                _momentum_update(bucket, directions, flat_buffers, first_step, momentum, dampening, nesterov)
            torch._foreach_mul_(directions, step_lr)  # now the scaled update fp32(lr * d)
            torch._foreach_copy_(params32, param_parts)
            if decay != 1.0:
                torch._foreach_mul_(params32, decay)
            if collect_gate_stats:
                befores = [gate_view_bits(part).clone() for part in param_parts]
                intended = [d != 0 for d in directions]
            torch._foreach_sub_(params32, directions)
            if rounding == "nearest" or work_dtype == dtype:
                torch._foreach_copy_(param_parts, params32)  # copy_ from fp32 rounds to nearest even
            else:
                for seg, part, value in zip(bucket, param_parts, params32, strict=True):
                    start = seg.start + (0 if element_offsets is None else element_offsets[seg.index])
                    part.copy_(_round_to_param(value, dtype, rounding, step_seed, seg.index, start))
            if collect_gate_stats:
                for seg, part, before, mask in zip(bucket, param_parts, befores, intended, strict=True):
                    unchanged = before == gate_view_bits(part)
                    intended_counts[seg.index] += mask.sum()
                    swallowed_counts[seg.index] += (mask & unchanged).sum()

    if not collect_gate_stats:
        return None
    return [
        GateStats(intended=torch.as_tensor(intended), swallowed=torch.as_tensor(swallowed))
        for intended, swallowed in zip(intended_counts, swallowed_counts, strict=True)
    ]


def _momentum_update(
    bucket: list[_Segment],
    directions: list[Tensor],
    flat_buffers: dict[int, Tensor],
    first_step: set[int],
    momentum: float,
    dampening: float,
    nesterov: bool,
) -> None:
    """buf = momentum * buf + (1 - dampening) * d (buf = d on the first step); then d = g + momentum
    * buf (nesterov) or d = buf, written into ``directions``."""
    buffer_parts = [flat_buffers[seg.index][seg.start : seg.stop] for seg in bucket]
    fresh = [slot for slot, seg in enumerate(bucket) if seg.index in first_step]
    running = [slot for slot, seg in enumerate(bucket) if seg.index not in first_step]
    if fresh:
        torch._foreach_copy_([buffer_parts[s] for s in fresh], [directions[s] for s in fresh])
    if running:
        running_buffers = [buffer_parts[s] for s in running]
        running_directions = [directions[s] for s in running]
        torch._foreach_mul_(running_buffers, momentum)
        if dampening == 0:
            torch._foreach_add_(running_buffers, running_directions)
        else:
            torch._foreach_add_(running_buffers, torch._foreach_mul(running_directions, 1 - dampening))
    if nesterov:
        torch._foreach_add_(directions, torch._foreach_mul(buffer_parts, momentum))
    else:
        torch._foreach_copy_(directions, buffer_parts)
