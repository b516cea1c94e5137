"""PrecisionGateTracker: which weights an optimizer step actually changed, exactly, and why not."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sparse_rl_optim._warnings import warn
from sparse_rl_optim.bf16 import bits_view_dtype, gate_view_bits
from sparse_rl_optim.distributed import (
    all_reduce_sum,
    counts_here,
    is_distributed,
    is_dtensor,
    is_main_rank,
    local_tensor,
    wrap_like,
)
from sparse_rl_optim.tracker.module_kinds import MODULE_KINDS, layer_index, module_kind
from sparse_rl_optim.tracker.reference import SparseReference

__all__ = ["PrecisionGateTracker", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Optimizer) -> Optimizer:
    """The innermost torch optimizer behind wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while isinstance(getattr(optimizer, "optimizer", None), Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


#: Elements per chunk of the checksum on a CPU, where ``sum(dtype=int64)`` makes an int64 copy.
_CHECKSUM_CHUNK = 1 << 20


def _checksum(bits: Tensor) -> Tensor:
    """Sum of the 16-bit patterns as int64 (a 0-dim tensor): any single edit changes it, and so does
    any realistic bulk edit (swapping two elements would not)."""
    if bits.device.type != "cpu" or bits.numel() <= _CHECKSUM_CHUNK:
        return bits.sum(dtype=torch.int64)
    return torch.stack([chunk.sum(dtype=torch.int64) for chunk in bits.split(_CHECKSUM_CHUNK)]).sum()


# Columns of the per-step table, one row per tracked param. All but the last are counts (summed over
# ranks); the last is a flag (OR over ranks: a sum that is > 0).
_CHANGED, _CUMULATIVE, _SINCE_SYNC, _NONFINITE, _INTENDED, _SWALLOWED, _MOVED = range(7)
_COUNT_COLUMNS = _MOVED


def _name_list(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` names, comma-separated, with ``...`` when there are more."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


class _TrackedParam:
    __slots__ = (
        "before",
        "checksum",
        "counted",
        "kernel_fed",
        "kind",
        "layer",
        "name",
        "param",
        "reference",
        "sharded",
        "since_sync",
        "view_dtype",
    )

    def __init__(self, name: str, param: Tensor) -> None:
        self.name = name
        self.param = param
        self.kind = module_kind(name)
        self.layer = layer_index(name)
        self.view_dtype = bits_view_dtype(param.dtype)
        self.sharded = is_dtensor(param)  # an FSDP2 param: every per-element figure is of the local shard
        # Whether this rank's figures for the param count in a sum over ranks (a shard on its rank, a
        # plain replica on rank 0 only), so nothing is counted twice.
        self.counted = counts_here(param)
        bits = self.bits()
        self.reference = SparseReference(bits)
        self.since_sync = SparseReference(bits)
        self.checksum: Tensor | None = None  # of the bits after the last observed step
        self.before: Tensor | None = None
        self.kernel_fed = False  # this step's changes come from the step kernel, not a snapshot

    def local(self) -> Tensor:
        """The elements this rank holds (a DTensor's local shard, no copy), detached."""
        return local_tensor(self.param).detach()

    def bits(self) -> Tensor:
        """Flat gate-view bits of the local elements (the local flat index is the tracker's index)."""
        return gate_view_bits(self.local()).reshape(-1)


class PrecisionGateTracker:
    """Records, per optimizer step, exactly which stored weights changed (bitwise) and why not.

    ``tracker = PrecisionGateTracker(model); tracker.attach(optimizer)`` works for any
    ``torch.optim.Optimizer`` (through its step pre/post hooks). Per step it diffs the *gate view*
    of each tracked parameter: the stored bits of bf16/fp16 params, and for fp32 params the bf16
    value an inference engine would load. ``history`` gets one record per step::

        {"step", "changed", "total", "changed_fraction", "per_param": {name: changed},
         "cumulative_changed", "changed_since_sync", "intended", "swallowed", "nonfinite",
         "changed_outside_step": [names],
         "by_kind": {kind: {"changed", "cumulative_changed", "total"}},
         "by_layer": {layer: {...}}}

    ``cumulative_changed`` counts elements that differ from the reference weights (those at attach
    time, or ``reset_reference()``); ``changed_since_sync`` those that differ from the weights at the
    last ``mark_synced()``; both exact. ``intended``/``swallowed`` (only for optimizers that report
    them, such as :class:`~sparse_rl_optim.RLSGD`): elements whose gradient update was non-zero, and
    of those the ones the precision gate swallowed (the gate view did not change).

    The counts are exact for changes made by ``optimizer.step()``. A tensor edited between steps
    (``load_state_dict``, an EMA, a manual edit) is caught by a checksum, named in the next record's
    ``changed_outside_step`` and warned about; call ``reset_reference()`` after such edits (it makes
    the current weights the reference and the sync point: reload the inference engine in full).
    Under DeepSpeed ZeRO the optimizer steps fp32 master partitions and copies them into the model
    after the step hooks have run: there, track the optimizer's own params (untested here).

    Memory: while attached, 1/8 byte per element per reference (reference and sync), plus 10 bytes
    per element that changed since that reference, capped at a 2-byte dense copy per element; during
    a step a transient 2-byte snapshot per element (plus, for the checksum on a CPU, an int64 copy of
    at most 2**20 elements). With :class:`~sparse_rl_optim.RLSGD` on the Triton path there is no
    snapshot: the step kernel reports the changed elements, their old bits and a checksum of the old
    bits (params without a gradient in a step are still snapshotted). ``memory_bytes()`` reports the
    figures.

    Many processes (FSDP2, DDP, both): build a tracker on every rank from the same model (after
    ``fully_shard``) and attach it to every rank's optimizer. Each rank counts on the elements it holds
    (an FSDP2 param's local shard; the step kernel reports local flat indices); when any tracked param
    is a ``DTensor`` in a multi-rank run, each step ends with ONE all-reduce of a small int64 table (a
    row per param: changed, cumulative, since sync, became non-finite, intended, swallowed, edited
    outside the step), so every record on every rank holds the global figures, equal to one process
    stepping the whole model on the same data: ``total`` and the ``by_kind``/``by_layer`` totals are
    full sizes, ``changed_outside_step`` names a param edited on any rank. Plain params (DDP replicas,
    or modules left out of ``fully_shard``) count on rank 0 only in that sum, so a replica is counted
    once. With no ``DTensor`` (single process, DDP) there is no collective: a replica's local figures
    are the global ones. Where params are sharded, ``mark_synced()``, ``changed_since_sync`` and
    ``summary()`` (which reads it) are collectives too, one all-reduce each: call them on every rank. ``changed_masks()`` gives a
    ``DTensor`` mask laid out like a ``DTensor`` param (its local part is this rank's shard; no
    communication; ``.full_tensor()`` gathers it). ``memory_bytes()`` is this rank's. Warnings and the
    ``jsonl_path`` stream come from global rank 0 only (its records are the global ones; under DDP a
    replica edited on another rank only shows in that rank's record).

    Args:
        model: an ``nn.Module`` (its parameters with ``requires_grad``) or ``(name, param)`` pairs.
        jsonl_path: if given, every record is appended to this JSON-lines file as it is made.
        warn_nonfinite: warn when weights become NaN/inf (they are always counted in ``nonfinite``).
        detect_outside_edits: checksum the weights before each step to catch edits made between
            steps (one extra read of the weights per step; off saves it).
    """

    def __init__(
        self,
        model: nn.Module | Iterable[tuple[str, Tensor]],
        *,
        jsonl_path: str | os.PathLike[str] | None = None,
        warn_nonfinite: bool = True,
        detect_outside_edits: bool = True,
    ) -> None:
        if isinstance(model, nn.Module):
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        else:
            named = list(model)
        for name, param in named:
            if not isinstance(param, Tensor) or not param.is_floating_point():
                raise TypeError(f"PrecisionGateTracker tracks floating-point tensors; {name!r} is not one")
        if not named:
            raise ValueError("PrecisionGateTracker got no parameters to track")
        self._params = [_TrackedParam(name, param) for name, param in named]
        self.total = sum(t.param.numel() for t in self._params)  # a DTensor's numel is the full size
        # Sum the figures over ranks: only where some param is sharded (replicas already agree).
        self._reduce_over_ranks = is_distributed() and any(t.sharded for t in self._params)
        self._counted: dict[torch.device, Tensor] = {}  # per device: (params, 1) int64, 1 where counted
        self.history: list[dict[str, Any]] = []
        self.jsonl_path = os.fspath(jsonl_path) if jsonl_path is not None else None
        self.warn_nonfinite = warn_nonfinite
        self.detect_outside_edits = detect_outside_edits
        self._optimizer: Optimizer | None = None
        self._hook_handles: list[Any] = []
        self._step = 0
        self._peak_snapshot_bytes = 0
        self._moved_outside_step: list[Tensor] = []

    # -- attaching -------------------------------------------------------------------------
    def attach(self, optimizer: Optimizer, *, start_step: int = 0) -> PrecisionGateTracker:
        """Observe every ``optimizer.step()`` from now on; the reference weights are the current ones.
        Records are numbered from ``start_step + 1`` (e.g. a trainer's step when resuming)."""
        if self._optimizer is not None:
            raise RuntimeError("PrecisionGateTracker is already attached; call detach() first")
        optimizer = unwrap_optimizer(optimizer)
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"attach() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._optimizer = optimizer
        self._step = start_step
        self.reset_reference()
        self._hook_handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        if hasattr(optimizer, "gate_stats_enabled"):
            optimizer.gate_stats_enabled = True
        if hasattr(optimizer, "gate_changes_enabled"):
            optimizer.gate_changes_enabled = True
        return self

    def detach(self) -> None:
        """Stop observing; history and counts are kept."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        if self._optimizer is not None and hasattr(self._optimizer, "gate_stats_enabled"):
            self._optimizer.gate_stats_enabled = False
        if self._optimizer is not None and hasattr(self._optimizer, "gate_changes_enabled"):
            self._optimizer.gate_changes_enabled = False
        self._optimizer = None
        for tracked in self._params:
            tracked.before = None

    def reset_reference(self) -> None:
        """Make the current weights the reference for ``cumulative_changed`` (and the sync point)."""
        for tracked in self._params:
            bits = tracked.bits()
            tracked.reference.reset(bits)
            tracked.since_sync.reset(bits)
            tracked.checksum = _checksum(bits) if self.detect_outside_edits else None

    def mark_synced(self) -> int:
        """The current weights were shipped (e.g. to the inference engine): restart
        ``changed_since_sync``. Returns what this sync shipped: the elements that differed from the
        previous sync."""
        shipped = []
        for tracked in self._params:
            bits = tracked.bits()
            shipped.append(tracked.since_sync.count_differing(bits))
            # The checksum stays: an edit made outside the step is still reported at the next step.
            tracked.since_sync.reset(bits)
        return self._global_sum(shipped)

    # -- over ranks --------------------------------------------------------------------------
    def _counted_rows(self, device: torch.device) -> Tensor:
        """(params, 1) int64: 1 where this rank's figures for the param count in a sum over ranks."""
        if device not in self._counted:
            counted = [[int(t.counted)] for t in self._params]
            self._counted[device] = torch.tensor(counted, dtype=torch.int64, device=device)
        return self._counted[device]

    def _global_table(self, rows: list[Tensor]) -> list[list[int]]:
        """The per-param table summed over ranks (one all-reduce, only where some param is sharded),
        as Python lists: one host sync."""
        device = rows[0].device
        table = torch.stack([row.to(device=device, dtype=torch.int64) for row in rows])
        if self._reduce_over_ranks:
            table[:, :_COUNT_COLUMNS] *= self._counted_rows(device)
            all_reduce_sum(table)
        return table.cpu().tolist()

    def _global_sum(self, counts: list[Tensor]) -> int:
        """The sum of per-param 0-dim counts over params and ranks (one all-reduce where sharded)."""
        table = self._global_table([count.reshape(1) for count in counts])
        return sum(row[0] for row in table)

    # -- the hooks -------------------------------------------------------------------------
    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        snapshot_bytes = 0
        moved: list[Tensor] = []
        reported = getattr(optimizer, "gate_change_param_ids", None)
        kernel_fed_ids = reported() if reported is not None else set()
        for tracked in self._params:
            tracked.before = None
            # Only params the kernel will step: one without a gradient is snapshotted, so an edit made
            # to it between steps is still caught at the next step.
            tracked.kernel_fed = id(tracked.param) in kernel_fed_ids and tracked.param.grad is not None
            if tracked.kernel_fed:
                # The step kernel reports the changed elements, their old bits and a checksum of the
                # old bits: no snapshot, no extra read of the weights.
                moved.append(torch.zeros((), dtype=torch.bool, device=tracked.param.device))
                continue
            tracked.before = tracked.bits().clone()
            snapshot_bytes += tracked.before.numel() * tracked.before.element_size()
            if tracked.checksum is None:
                moved.append(torch.zeros((), dtype=torch.bool, device=tracked.before.device))
                continue
            before_checksum = _checksum(tracked.before)
            moved.append(before_checksum != tracked.checksum)
            tracked.checksum = before_checksum
        # Read in the post-hook together with the counts: one host sync per step.
        self._moved_outside_step = moved
        self._peak_snapshot_bytes = max(self._peak_snapshot_bytes, snapshot_bytes)

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._step += 1
        gate_stats = getattr(optimizer, "gate_stats", None) or {}
        rows: list[Tensor] = []  # per param: the columns _CHANGED ... _MOVED
        has_gate_stats = bool(getattr(optimizer, "gate_stats_enabled", False))
        for position, tracked in enumerate(self._params):
            stats = gate_stats.get(tracked.param)
            after = tracked.bits()
            if tracked.kernel_fed:
                changed_indices, changed_before, changed_count = self._kernel_changes(position, tracked, stats)
            else:
                before = tracked.before
                tracked.before = None
                if before is None:
                    raise RuntimeError("PrecisionGateTracker saw a step end without its start")
                # From here on the work is proportional to the changed elements, which RL keeps few.
                changed_indices = (before != after).nonzero().squeeze(1)
                changed_before = before[changed_indices]
                changed_count = torch.tensor(changed_indices.numel(), device=after.device)
            changed_after = after[changed_indices]
            tracked.reference.record(changed_indices, changed_before, after)
            tracked.since_sync.record(changed_indices, changed_before, after)
            if tracked.checksum is not None:
                tracked.checksum = (
                    tracked.checksum + changed_after.sum(dtype=torch.int64) - changed_before.sum(dtype=torch.int64)
                )
            became_nonfinite = (
                ~torch.isfinite(changed_after.view(tracked.view_dtype))
                & torch.isfinite(changed_before.view(tracked.view_dtype))
            ).sum()
            # Params without a gradient this step (no stats) had no intended update.
            no_update = torch.zeros((), dtype=torch.int64, device=after.device)
            rows.append(
                torch.stack(
                    [
                        changed_count.to(device=after.device, dtype=torch.int64),
                        tracked.reference.count_differing(after),
                        tracked.since_sync.count_differing(after),
                        became_nonfinite,
                        no_update if stats is None else stats.intended.reshape(()).to(after.device, torch.int64),
                        no_update if stats is None else stats.swallowed.reshape(()).to(after.device, torch.int64),
                        self._moved_outside_step[position].to(torch.int64),
                    ]
                )
            )
        # One host sync per step, not one per tensor; over ranks, one all-reduce of this table.
        table = self._global_table(rows)
        moved_outside = [t.name for t, row in zip(self._params, table, strict=True) if row[_MOVED]]
        record = self._make_record(
            table,
            sum(row[_INTENDED] for row in table) if has_gate_stats else None,
            sum(row[_SWALLOWED] for row in table) if has_gate_stats else None,
        )
        record["changed_outside_step"] = moved_outside
        main_rank = is_main_rank()  # the one that warns and streams records
        if moved_outside and main_rank:
            warn(
                f"step {self._step}: {len(moved_outside)} tensors changed outside optimizer.step() since the "
                f"previous step ({_name_list(moved_outside)}); their cumulative and since-sync counts miss "
                "those changes. Call reset_reference() after editing weights (load_state_dict, EMA, manual edits).",
                RuntimeWarning,
            )
        self.history.append(record)
        if self.jsonl_path is not None and main_rank:
            with open(self.jsonl_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if record["nonfinite"] and self.warn_nonfinite and main_rank:
            names = [t.name for t, row in zip(self._params, table, strict=True) if row[_NONFINITE]]
            warn(
                f"step {self._step}: {record['nonfinite']} weights became NaN/inf (in {_name_list(names)}); "
                "check the gradients and the learning rate",
                RuntimeWarning,
            )

    def _kernel_changes(self, position: int, tracked: _TrackedParam, stats: Any) -> tuple[Tensor, Tensor, Tensor]:
        """(changed indices, their old bits, the changed count) from the step kernel's report; also
        the outside-edit check against the kernel's checksum of the old bits."""
        if stats is None or stats.changed_indices is None:
            raise RuntimeError(
                f"PrecisionGateTracker: the optimizer reports changes for {tracked.name!r} but its step did not "
                "record them (were gate_changes_enabled or the param's gradient changed inside the step?)"
            )
        if tracked.checksum is not None:
            self._moved_outside_step[position] = stats.old_checksum != tracked.checksum
            tracked.checksum = stats.old_checksum
        changed = stats.changed_indices, stats.old_bits, stats.tile_changed.sum(dtype=torch.int64)
        stats.changed_indices = stats.old_bits = None  # recorded: do not keep them alive until the next step
        return changed

    def _make_record(self, table: list[list[int]], intended: int | None, swallowed: int | None) -> dict[str, Any]:
        by_kind: dict[str, dict[str, int]] = {}
        by_layer: dict[str, dict[str, int]] = {}
        for tracked, (changed, cumulative, *_) in zip(self._params, table, strict=True):
            for groups, key in ((by_kind, tracked.kind), (by_layer, str(tracked.layer))):
                entry = groups.setdefault(key, {"changed": 0, "cumulative_changed": 0, "total": 0})
                entry["changed"] += changed
                entry["cumulative_changed"] += cumulative
                entry["total"] += tracked.param.numel()
        changed_total = sum(row[_CHANGED] for row in table)
        return {
            "step": self._step,
            "changed": changed_total,
            "total": self.total,
            "changed_fraction": changed_total / self.total,
            "cumulative_changed": sum(row[_CUMULATIVE] for row in table),
            "changed_since_sync": sum(row[_SINCE_SYNC] for row in table),
            "intended": intended,
            "swallowed": swallowed,
            "nonfinite": sum(row[_NONFINITE] for row in table),
            "per_param": {tracked.name: row[_CHANGED] for tracked, row in zip(self._params, table, strict=True)},
            "by_kind": {kind: by_kind[kind] for kind in MODULE_KINDS if kind in by_kind},
            "by_layer": by_layer,
        }

    # -- reading -----------------------------------------------------------------------------
    @property
    def changed_since_sync(self) -> int:
        """Elements whose gate view differs from the weights at the last ``mark_synced()``, over all
        ranks (a collective where some param is sharded: read it on every rank)."""
        return self._global_sum([t.since_sync.count_differing(t.bits()) for t in self._params])

    def changed_masks(self, since: str = "reference") -> dict[str, Tensor]:
        """Per-parameter bool masks (param-shaped) of elements that differ from the reference
        (``since="reference"``) or from the last sync (``since="sync"``).

        For a ``DTensor`` param the mask is a ``DTensor`` with the param's mesh and placements whose
        local part is this rank's shard (no communication; ``.full_tensor()`` gathers it)."""
        if since not in ("reference", "sync"):
            raise ValueError(f"since must be 'reference' or 'sync', got {since!r}")
        masks = {}
        for tracked in self._params:
            store = tracked.reference if since == "reference" else tracked.since_sync
            local = tracked.local()
            mask = store.differing_mask(gate_view_bits(local).reshape(-1)).reshape(local.shape)
            masks[tracked.name] = wrap_like(mask, tracked.param)
        return masks

    def memory_bytes(self) -> dict[str, float]:
        """Extra memory the tracker costs on this rank: persistent bytes now, the peak transient step
        snapshot, and both per element held on this rank (the whole model in one process, the local
        shards under FSDP2)."""
        persistent = sum(t.reference.nbytes() + t.since_sync.nbytes() for t in self._params)
        held = sum(t.local().numel() for t in self._params)
        return {
            "persistent_bytes": persistent,
            "persistent_bytes_per_param": persistent / held if held else 0.0,
            "step_snapshot_bytes": self._peak_snapshot_bytes,
            "step_snapshot_bytes_per_param": self._peak_snapshot_bytes / held if held else 0.0,
        }

    def summary(self) -> dict[str, Any]:
        """Totals over the history: per-step and cumulative changed fractions, overall, by module
        kind and by layer; what the gate swallowed as ``swallowed_of_updates`` (``swallowed / intended``:
        the share of the non-zero updates) and ``swallowed_of_weights`` (``swallowed / total``).
        Global figures, except ``memory`` (this rank's); a collective where some param is sharded."""
        steps = len(self.history)
        last = self.history[-1] if self.history else None
        result: dict[str, Any] = {
            "steps": steps,
            "total": self.total,
            "last_changed_fraction": last["changed_fraction"] if last else 0.0,
            "mean_changed_fraction": sum(r["changed_fraction"] for r in self.history) / steps if steps else 0.0,
            "cumulative_changed": last["cumulative_changed"] if last else 0,
            "cumulative_changed_fraction": last["cumulative_changed"] / self.total if last else 0.0,
            "changed_since_sync": self.changed_since_sync,
            "swallowed_of_weights": None,
            "swallowed_of_updates": None,
            "memory": self.memory_bytes(),
        }
        with_stats = [r for r in self.history if r["swallowed"] is not None]
        if with_stats:
            result["swallowed_of_weights"] = sum(r["swallowed"] for r in with_stats) / (len(with_stats) * self.total)
            intended = sum(r["intended"] for r in with_stats)
            result["swallowed_of_updates"] = sum(r["swallowed"] for r in with_stats) / intended if intended else 0.0
        for group_key in ("by_kind", "by_layer"):
            grouped: dict[str, dict[str, float]] = {}
            if last:
                for key, entry in last[group_key].items():
                    step_fractions = [r[group_key][key]["changed"] / entry["total"] for r in self.history]
                    grouped[key] = {
                        "total": entry["total"],
                        "mean_changed_fraction": sum(step_fractions) / steps,
                        "cumulative_changed_fraction": entry["cumulative_changed"] / entry["total"],
                    }
            result[group_key] = grouped
        return result

    def save_history(self, path: str | os.PathLike[str]) -> None:
        """Write the whole history as JSON lines, one record per step."""
        with open(path, "w", encoding="utf-8") as handle:
            for record in self.history:
                handle.write(json.dumps(record) + "\n")

    def plot(self, path: str | os.PathLike[str], title: str | None = None) -> None:
        """Save a PNG: changed fraction per step and cumulative, overall and by module kind."""
        from sparse_rl_optim.tracker.plot import plot_history

        plot_history(self.history, path, title=title)
