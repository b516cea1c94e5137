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


def _to_host(rows: list[Tensor]) -> list[list[int]]:
    """Rows of small int tensors as Python lists, with one device-to-host copy per device."""
    if not rows:
        return []
    device = rows[0].device
    return torch.stack([row.to(device) for row in rows]).cpu().tolist()


def _name_list(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` names, comma-separated, with ``...`` when there are more."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


class _TrackedParam:
    __slots__ = (
        "before",
        "checksum",
        "kernel_fed",
        "kind",
        "layer",
        "name",
        "param",
        "reference",
        "since_sync",
        "view_dtype",
    )

    def __init__(self, name: str, param: Tensor) -> None:
        self.name = name
        self.param = param
        self.kind = module_kind(name)
        self.layer = layer_index(name)
        self.view_dtype = bits_view_dtype(param.dtype)
        bits = self.bits()
        self.reference = SparseReference(bits)
        self.since_sync = SparseReference(bits)
        self.checksum: Tensor | None = None  # of the bits after the last observed step
        self.before: Tensor | None = None
        self.kernel_fed = False  # this step's changes come from the step kernel, not a snapshot

    def bits(self) -> Tensor:
        return gate_view_bits(self.param.detach()).reshape(-1)


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
        self.total = sum(t.param.numel() for t in self._params)
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
        return int(torch.stack(shipped).sum()) if shipped else 0

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
        counts: list[Tensor] = []  # per param: changed, cumulative, since sync, nonfinite, moved outside
        intended: list[Tensor] = []
        swallowed: list[Tensor] = []
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
            counts.append(
                torch.stack(
                    [
                        changed_count.to(device=after.device, dtype=torch.int64),
                        tracked.reference.count_differing(after),
                        tracked.since_sync.count_differing(after),
                        became_nonfinite,
                        self._moved_outside_step[position].to(torch.int64),
                    ]
                )
            )
            if stats is not None:  # params without a gradient this step had no intended update
                intended.append(stats.intended.reshape(()))
                swallowed.append(stats.swallowed.reshape(()))
        table = _to_host(counts)  # one host sync per step, not one per tensor
        gate_totals = _to_host([torch.stack([a, b]) for a, b in zip(intended, swallowed, strict=True)])
        has_gate_stats = bool(getattr(optimizer, "gate_stats_enabled", False))
        moved_outside = [t.name for t, row in zip(self._params, table, strict=True) if row[4]]
        record = self._make_record(
            table,
            sum(row[0] for row in gate_totals) if has_gate_stats else None,
            sum(row[1] for row in gate_totals) if has_gate_stats else None,
        )
        record["changed_outside_step"] = moved_outside
        if moved_outside:
            warn(
                f"step {self._step}: {len(moved_outside)} tensors changed outside optimizer.step() since the "
                f"previous step ({_name_list(moved_outside)}); their cumulative and since-sync counts miss "
                "those changes. Call reset_reference() after editing weights (load_state_dict, EMA, manual edits).",
                RuntimeWarning,
            )
        self.history.append(record)
        if self.jsonl_path is not None:
            with open(self.jsonl_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if record["nonfinite"] and self.warn_nonfinite:
            names = [t.name for t, row in zip(self._params, table, strict=True) if row[3]]
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
        changed_total = sum(row[0] for row in table)
        return {
            "step": self._step,
            "changed": changed_total,
            "total": self.total,
            "changed_fraction": changed_total / self.total,
            "cumulative_changed": sum(row[1] for row in table),
            "changed_since_sync": sum(row[2] for row in table),
            "intended": intended,
            "swallowed": swallowed,
            "nonfinite": sum(row[3] for row in table),
            "per_param": {tracked.name: row[0] for tracked, row in zip(self._params, table, strict=True)},
            "by_kind": {kind: by_kind[kind] for kind in MODULE_KINDS if kind in by_kind},
            "by_layer": by_layer,
        }

    # -- reading -----------------------------------------------------------------------------
    @property
    def changed_since_sync(self) -> int:
        """Elements whose gate view differs from the weights at the last ``mark_synced()``."""
        return int(sum(int(t.since_sync.count_differing(t.bits())) for t in self._params))

    def changed_masks(self, since: str = "reference") -> dict[str, Tensor]:
        """Per-parameter bool masks (param-shaped) of elements that differ from the reference
        (``since="reference"``) or from the last sync (``since="sync"``)."""
        if since not in ("reference", "sync"):
            raise ValueError(f"since must be 'reference' or 'sync', got {since!r}")
        masks = {}
        for tracked in self._params:
            store = tracked.reference if since == "reference" else tracked.since_sync
            masks[tracked.name] = store.differing_mask(tracked.bits()).reshape(tracked.param.shape)
        return masks

    def memory_bytes(self) -> dict[str, float]:
        """Extra memory the tracker costs: persistent bytes now, the peak transient step snapshot,
        and both per tracked element."""
        persistent = sum(t.reference.nbytes() + t.since_sync.nbytes() for t in self._params)
        return {
            "persistent_bytes": persistent,
            "persistent_bytes_per_param": persistent / self.total,
            "step_snapshot_bytes": self._peak_snapshot_bytes,
            "step_snapshot_bytes_per_param": self._peak_snapshot_bytes / self.total,
        }

    def summary(self) -> dict[str, Any]:
        """Totals over the history: per-step and cumulative changed fractions, overall, by module
        kind and by layer; the swallowed fraction (``swallowed / total`` and ``swallowed / intended``)."""
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
            "swallowed_fraction": None,
            "swallowed_of_intended": None,
            "memory": self.memory_bytes(),
        }
        with_stats = [r for r in self.history if r["swallowed"] is not None]
        if with_stats:
            result["swallowed_fraction"] = sum(r["swallowed"] for r in with_stats) / (len(with_stats) * self.total)
            intended = sum(r["intended"] for r in with_stats)
            result["swallowed_of_intended"] = sum(r["swallowed"] for r in with_stats) / intended if intended else 0.0
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
