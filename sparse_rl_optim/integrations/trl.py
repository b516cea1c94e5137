"""TRL / transformers integration: gate metrics in the trainer logs, and an optimizer path that
survives FSDP and DeepSpeed.

Two ways to train with RLSGD::

    # 1. pass an instance (single process, DDP)
    trainer = GRPOTrainer(model=model, ..., optimizers=(RLSGD(model.parameters(), lr=0.1), None),
                          callbacks=[PrecisionGateCallback()])

    # 2. pass the class and its kwargs: the trainer builds the optimizer itself, after FSDP has
    #    wrapped the model and in DeepSpeed's ``create_optimizer`` call
    trainer = OptimizerClsGRPOTrainer(model=model, ...,
                                      optimizer_cls_and_kwargs=(RLSGD, {"lr": 0.1}))

transformers raises when an optimizer *instance* is passed with FSDP enabled, and its DeepSpeed
integration sets ``trainer.optimizer = None`` and calls ``trainer.create_optimizer()`` when the
DeepSpeed config names no optimizer: the instance is silently dropped. ``Trainer`` reads
``optimizer_cls_and_kwargs`` in ``create_optimizer``, but ``GRPOTrainer.__init__`` does not accept
the argument; :class:`OptimizerClsAndKwargsMixin` adds it to any ``Trainer`` subclass.

Weight sync by deltas: :class:`DeltaSyncCallback` keeps an in-process replica (a stand-in for the
inference engine) in sync with verified delta packets on GRPO's weight-load schedule, and
:class:`VLLMDeltaSync` makes TRL's vLLM weight sync ship only the tensors that changed::

    trainer = GRPOTrainer(model=model, ..., callbacks=[DeltaSyncCallback(replica_model)])
    VLLMDeltaSync.for_trainer(trainer)  # with use_vllm=True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from trl import GRPOTrainer

from sparse_rl_optim.deltas.encoding import ENCODINGS, tensor_checksum
from sparse_rl_optim.deltas.packet import DeltaReceiver, DeltaSender, packet_to_bytes
from sparse_rl_optim.tiles import DEFAULT_TILE_SIZE, _bits_dtype
from sparse_rl_optim.tracker import PrecisionGateTracker

__all__ = [
    "DeltaSyncCallback",
    "OptimizerClsAndKwargsMixin",
    "OptimizerClsGRPOTrainer",
    "PrecisionGateCallback",
    "ReplicaMismatchError",
    "VLLMDeltaSync",
    "WeightSyncScheduleCallback",
    "with_optimizer_cls_and_kwargs",
]

METRIC_PREFIX = "gate/"
DELTA_METRIC_PREFIX = "delta/"


def _write_log_metrics(state: TrainerState, logs: dict[str, Any], metrics: dict[str, float]) -> None:
    """Add ``metrics`` to ``logs`` and to the ``log_history`` entry of this log call.

    Keys added to ``logs`` inside ``on_log`` do not reach ``log_history`` (``Trainer.log`` appends a
    copy first), so they are also written into the last entry when it is this step's."""
    logs.update(metrics)
    last_entry = state.log_history[-1] if state.log_history else None
    if last_entry is not None and last_entry.get("step") == state.global_step:
        last_entry.update(metrics)


class WeightSyncScheduleCallback(TrainerCallback):
    """The optimizer steps at which TRL's ``GRPOTrainer`` loads the trained weights into its inference
    engine; subclasses act on each in :meth:`_on_sync`.

    GRPO generates at every ``steps_per_generation * num_iterations``-th training micro-batch, counted
    from the start of ``train()`` (also after a resume), and a generation loads the weights of the
    optimizer steps completed by then if they changed since the last load. The micro-batches are
    counted the same way (``on_substep_end``; gradient accumulation and short last accumulations of an
    epoch included), and a sync is reported in ``on_pre_optimizer_step`` of the accumulation holding
    the generation, where the weights are those the generation loaded. With vLLM, evaluation also
    loads the current weights (``on_evaluate``). For other trainers, ``sync_every=N`` marks a sync
    after every N optimizer steps instead (``on_step_end``).

    A subclass calls :meth:`_start_sync_schedule` from its ``on_train_begin`` (the weights at that
    point count as loaded: GRPO's first generation loads them in full) and implements
    :meth:`_on_sync`, called once per load with the optimizer step whose weights are loaded.
    """

    def __init__(self, *, sync_every: int | None = None) -> None:
        if sync_every is not None and sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.sync_every = sync_every
        self._generate_every: int | None = None
        self._micro_batches = 0  # training micro-batches started since train() began
        self._accumulation_start = 0
        self._last_synced_step = 0
        self._sync_schedule_started = False

    def _start_sync_schedule(self, args: TrainingArguments, state: TrainerState) -> None:
        steps_per_generation = getattr(args, "steps_per_generation", None)
        self._generate_every = None
        if self.sync_every is None and steps_per_generation:
            self._generate_every = steps_per_generation * (getattr(args, "num_iterations", 1) or 1)
        self._micro_batches = self._accumulation_start = 0  # TRL's counter restarts with train() too
        self._last_synced_step = state.global_step  # the weights at train begin are the engine's
        self._sync_schedule_started = True

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._micro_batches += 1

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The accumulation that just finished covered micro-batches [start, end); a generation in it
        # loaded the weights as they are now, after step global_step, before this optimizer step.
        end = self._micro_batches + 1
        start, self._accumulation_start = self._accumulation_start, end
        self._micro_batches = end
        if self._generate_every is not None:
            next_generation = -(-start // self._generate_every) * self._generate_every
            if next_generation < end:
                self._record_sync(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.sync_every is not None and state.global_step % self.sync_every == 0:
            self._record_sync(state.global_step)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if getattr(args, "use_vllm", False):  # TRL's vLLM generation loads the weights for evaluation too
            self._record_sync(state.global_step)

    def _record_sync(self, step: int) -> None:
        if not self._sync_schedule_started or step == self._last_synced_step:
            return  # TRL loads weights only when the step changed since the last load
        self._last_synced_step = step
        self._on_sync(step)

    def _on_sync(self, step: int) -> None:
        """The inference engine loads the current weights, those after optimizer step ``step``."""
        raise NotImplementedError


class PrecisionGateCallback(WeightSyncScheduleCallback):
    """Attaches a :class:`~sparse_rl_optim.PrecisionGateTracker` to the trainer's optimizer and logs
    gate metrics, under keys starting with ``gate/``, into ``trainer.state.log_history``.

    Logged at each logging step, over the optimizer steps since the previous log:

    * ``gate/changed_fraction``: mean per step of the fraction of weights whose bits changed;
    * ``gate/cumulative_changed_fraction``: weights that differ from those at the start of training;
    * ``gate/changed_since_sync_fraction``: weights that differ from the last weights synced to the
      inference engine, i.e. what the next sync must ship;
    * ``gate/synced_fraction``: mean of what each sync in the interval shipped (only when one happened);
    * ``gate/swallowed_of_updates`` (RLSGD only): of the weights whose gradient update was non-zero,
      the share whose bf16 value did not change (what the precision gate swallowed);
    * ``gate/swallowed_of_weights`` (RLSGD only): the same swallowed weights as a share of all weights
      (smaller: weights with a zero update are in the denominator, not the numerator);
    * ``gate/cumulative/<kind>`` per module kind, and ``gate/nonfinite`` if weights became NaN/inf.

    Syncs follow GRPO's weight loads (:class:`WeightSyncScheduleCallback`): by default
    ``steps_per_generation * num_iterations`` training micro-batches apart, plus evaluations with vLLM;
    for other trainers, ``sync_every=N`` marks a sync after every N steps.

    Keys added to ``logs`` inside ``on_log`` do not reach ``log_history`` (``Trainer.log`` appends a
    copy first), so the callback also writes them into the ``log_history`` entry of this log call.

    Args:
        tracker: a tracker to use; by default one is built from the trainer's model.
        sync_every: optimizer steps between two weight syncs, instead of GRPO's schedule.
        jsonl_path, plot_path: write the tracker history / a PNG plot at the end of training.
    """

    def __init__(
        self,
        tracker: PrecisionGateTracker | None = None,
        *,
        sync_every: int | None = None,
        jsonl_path: str | None = None,
        plot_path: str | None = None,
    ) -> None:
        super().__init__(sync_every=sync_every)
        self.tracker = tracker
        self.jsonl_path = jsonl_path
        self.plot_path = plot_path
        #: ``(optimizer step whose weights were shipped, elements that differed from the previous sync)``.
        self.syncs: list[tuple[int, int]] = []
        self._logged_records = 0
        self._logged_syncs = 0

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if optimizer is None:
            raise RuntimeError("PrecisionGateCallback needs the trainer's optimizer at on_train_begin")
        if self.tracker is None:
            if model is None:
                raise RuntimeError("PrecisionGateCallback needs a tracker or the trainer's model")
            self.tracker = PrecisionGateTracker(model)
        self._start_sync_schedule(args, state)
        self.tracker.attach(optimizer, start_step=state.global_step)  # global_step > 0 when resuming
        self._logged_records = len(self.tracker.history)

    def _on_sync(self, step: int) -> None:
        if self.tracker is not None:
            self.syncs.append((step, self.tracker.mark_synced()))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.tracker is None or logs is None:
            return
        metrics = self.metrics()
        if metrics:
            _write_log_metrics(state, logs, metrics)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.tracker is None:
            return
        if self.jsonl_path:
            self.tracker.save_history(self.jsonl_path)
        if self.plot_path and self.tracker.history:
            self.tracker.plot(self.plot_path)
        self.tracker.detach()

    def metrics(self) -> dict[str, float]:
        """Gate metrics over the optimizer steps recorded since the previous call."""
        assert self.tracker is not None
        records = self.tracker.history[self._logged_records :]
        if not records:
            return {}
        syncs = self.syncs[self._logged_syncs :]
        self._logged_records = len(self.tracker.history)
        self._logged_syncs = len(self.syncs)
        total = self.tracker.total
        last = records[-1]
        synced_since_last_step = bool(self.syncs) and self.syncs[-1][0] == last["step"]
        metrics = {
            "changed_fraction": sum(r["changed_fraction"] for r in records) / len(records),
            "cumulative_changed_fraction": last["cumulative_changed"] / total,
            "changed_since_sync_fraction": 0.0 if synced_since_last_step else last["changed_since_sync"] / total,
        }
        if syncs:
            metrics["synced_fraction"] = sum(shipped for _, shipped in syncs) / (len(syncs) * total)
        if all(r["swallowed"] is not None for r in records):
            metrics["swallowed_of_weights"] = sum(r["swallowed"] for r in records) / (len(records) * total)
            intended = sum(r["intended"] for r in records)
            metrics["swallowed_of_updates"] = sum(r["swallowed"] for r in records) / intended if intended else 0.0
        if any(r["nonfinite"] for r in records):
            metrics["nonfinite"] = float(sum(r["nonfinite"] for r in records))
        for kind, entry in last["by_kind"].items():
            metrics[f"cumulative/{kind}"] = entry["cumulative_changed"] / entry["total"]
        return {METRIC_PREFIX + key: float(value) for key, value in metrics.items()}


class OptimizerClsAndKwargsMixin:
    """Adds ``optimizer_cls_and_kwargs=(cls, kwargs)`` to a ``transformers.Trainer`` subclass whose
    ``__init__`` lacks it (such as TRL's ``GRPOTrainer``). The optimizer is then built inside
    ``Trainer.create_optimizer`` — after FSDP wraps the model, and when DeepSpeed asks for it — with
    the trainer's usual decay / no-decay param groups (``args.weight_decay`` for the decay group)."""

    def __init__(
        self,
        *args: Any,
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        if optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = optimizer_cls_and_kwargs
            if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
                raise TypeError(f"optimizer_cls_and_kwargs[0] must be an Optimizer class, got {optimizer_cls!r}")
            if not isinstance(optimizer_kwargs, dict):
                raise TypeError("optimizer_cls_and_kwargs[1] must be a dict of keyword arguments")
            optimizers = kwargs.get("optimizers", (None, None))
            if optimizers is not None and optimizers[0] is not None:
                raise RuntimeError(
                    "Passing both `optimizers` and `optimizer_cls_and_kwargs` arguments is incompatible."
                )
        super().__init__(*args, **kwargs)
        if optimizer_cls_and_kwargs is not None:
            if getattr(self, "optimizer", None) is not None:  # `optimizers` passed positionally
                raise RuntimeError(
                    "Passing both `optimizers` and `optimizer_cls_and_kwargs` arguments is incompatible."
                )
            self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs


def with_optimizer_cls_and_kwargs(trainer_cls: type) -> type:
    """``trainer_cls`` with :class:`OptimizerClsAndKwargsMixin` mixed in (e.g. ``SFTTrainer``)."""
    return type(f"OptimizerCls{trainer_cls.__name__}", (OptimizerClsAndKwargsMixin, trainer_cls), {})


class OptimizerClsGRPOTrainer(OptimizerClsAndKwargsMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` that also accepts ``optimizer_cls_and_kwargs=(RLSGD, {"lr": 0.1})``."""


# -- delta weight sync ---------------------------------------------------------------------------


class ReplicaMismatchError(RuntimeError):
    """After a sync, the replica does not hold the trained weights bit for bit. ``names``: the tensors
    that differ."""

    def __init__(self, message: str, names: list[str]) -> None:
        super().__init__(message)
        self.names = names


def _bit_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers (so NaNs compare equal to themselves and -0.0 != 0.0)."""
    tensor = tensor.detach()
    if tensor.is_floating_point():
        return tensor.contiguous().view(-1).view(_bits_dtype(tensor.dtype))
    return tensor.reshape(-1)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device != b.device:
        a = a.to(b.device)
    return torch.equal(_bit_view(a), _bit_view(b))


def _unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP / DeepSpeed-engine style wrappers (``.module``), whose parameters are the
    trained weights under the names a replica of the same architecture has."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _check_full_parameters(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id") or type(param).__name__ == "DTensor" or type(param.data).__name__ == "DTensor":
            raise NotImplementedError(
                f"{name} is a shard (DeepSpeed ZeRO-3 / FSDP): DeltaSyncCallback diffs full, local parameters. "
                "With sharded training, gather the weights first (as TRL's VLLMGeneration._iter_named_params "
                "does) and feed them to a DeltaSender over a dict of full tensors."
            )


class DeltaSyncCallback(WeightSyncScheduleCallback):
    """Keeps an in-process replica of the trained weights (standing in for the inference engine) in
    sync with delta packets (:mod:`sparse_rl_optim.deltas`) on GRPO's weight-load schedule, and
    checks after every sync that it holds the trained weights bit for bit.

    At ``on_train_begin`` a :class:`~sparse_rl_optim.deltas.packet.DeltaSender` is built over the
    trained model's named parameters (``.module`` wrappers unwrapped; sharded ZeRO-3 / FSDP parameters
    are refused) and a :class:`~sparse_rl_optim.deltas.packet.DeltaReceiver` over ``replica``, and an
    anchor (every tensor in full) is shipped: GRPO's first generation loads the weights in full too.
    At each later load (the schedule of :class:`WeightSyncScheduleCallback`, as in
    :class:`PrecisionGateCallback`; ``sync_every=N`` for other trainers) the next packet — what
    changed since the previous one, or an anchor every ``anchor_every`` packets — is applied to the
    replica. The receiver verifies each packet (sequence, CRCs, the replica's checksums before and
    after) and raises :class:`~sparse_rl_optim.deltas.packet.PacketError` if the replica does not hold
    what the packet was made against; with ``verify=True`` every replica tensor is then also compared
    bit for bit with the trained one (a full read of both, moved to the replica's device), raising
    :class:`ReplicaMismatchError` with the names that differ. After an error, ``sync(anchor=True)``
    rebuilds the replica.

    ``syncs``: per sync a dict with ``step`` (the optimizer step whose weights were shipped),
    ``sequence``, ``anchor``, ``packet_bytes`` (:meth:`DeltaPacket.nbytes`), ``full_bytes`` (the full
    state dict of the tracked tensors in their dtypes), ``changed_elements`` and ``changed_tensors``
    (``None`` for anchors, which ship everything without comparing). Each log entry gets
    ``delta/packet_bytes``, ``delta/full_bytes`` (sums over the syncs since the previous log, anchors
    included) and ``delta/ratio`` (their quotient), when a sync happened in the interval.

    Args:
        replica: a model with the same parameter names as the trained one, or a dict of tensors under
            those names; any device; written in place.
        encoding, anchor_every: as for :class:`~sparse_rl_optim.deltas.packet.DeltaSender`.
        verify: compare the whole replica with the trained weights after every sync.
        sync_every: optimizer steps between two syncs, instead of GRPO's schedule.
        tile_size, snapshot_device: as for :class:`~sparse_rl_optim.deltas.packet.DeltaSender`
            (``snapshot_device="cpu"`` keeps its copy of the last shipped weights off the GPU).
    """

    def __init__(
        self,
        replica: torch.nn.Module | Mapping[str, torch.Tensor],
        *,
        encoding: str = "auto",
        anchor_every: int | None = 100,
        verify: bool = True,
        sync_every: int | None = None,
        tile_size: int = DEFAULT_TILE_SIZE,
        snapshot_device: str | torch.device | None = None,
    ) -> None:
        super().__init__(sync_every=sync_every)
        if encoding not in (*ENCODINGS, "auto"):
            raise ValueError(f"Unknown encoding {encoding!r}; expected one of {(*ENCODINGS, 'auto')}")
        if anchor_every is not None and anchor_every < 1:
            raise ValueError(f"anchor_every must be >= 1 or None, got {anchor_every}")
        self.replica = replica
        self.encoding = encoding
        self.anchor_every = anchor_every
        self.verify = verify
        self.tile_size = tile_size
        self.snapshot_device = snapshot_device
        self.sender: DeltaSender | None = None
        self.receiver: DeltaReceiver | None = None
        self.syncs: list[dict[str, Any]] = []
        self._full_bytes = 0
        self._logged_syncs = 0

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise RuntimeError("DeltaSyncCallback needs the trainer's model at on_train_begin")
        trained = _unwrap_model(model)
        _check_full_parameters(trained)
        self.sender = DeltaSender(
            trained,
            encoding=self.encoding,
            tile_size=self.tile_size,
            anchor_every=self.anchor_every,
            snapshot_device=self.snapshot_device,
        )
        self.receiver = DeltaReceiver(self.replica)
        self._full_bytes = sum(t.numel() * t.element_size() for t in self.sender.tensors.values())
        self._start_sync_schedule(args, state)
        self._logged_syncs = len(self.syncs)
        self.sync(state.global_step)  # the anchor: GRPO's first generation loads the weights in full

    def _on_sync(self, step: int) -> None:
        self.sync(step)

    def sync(self, step: int | None = None, *, anchor: bool = False) -> dict[str, Any]:
        """Ship the current weights to the replica now (the next packet; an anchor when ``anchor``),
        verify, record and return the record."""
        if self.sender is None or self.receiver is None:
            raise RuntimeError("DeltaSyncCallback.sync needs on_train_begin to have run (it builds the sender)")
        packet = self.sender.packet(step=step, anchor=anchor)
        self.receiver.apply(packet)
        if self.verify:
            self.check_replica()
        changes = None if packet.is_anchor else packet.changes
        record = {
            "step": step,
            "sequence": packet.sequence,
            "anchor": packet.is_anchor,
            "packet_bytes": packet.nbytes(),
            # As a safetensors file (what a wire or a disk carries): payload plus header and checksums.
            "file_bytes": len(packet_to_bytes(packet)),
            "full_bytes": self._full_bytes,
            "changed_elements": None if changes is None else sum(c.count for c in changes.values()),
            "changed_tensors": None if changes is None else len(changes),
        }
        self.syncs.append(record)
        return record

    def mismatched_tensors(self) -> list[str]:
        """Names of the tensors whose replica differs from the trained weights (bits, shape or dtype)."""
        if self.sender is None or self.receiver is None:
            raise RuntimeError("DeltaSyncCallback has not started (on_train_begin)")
        trained, replica = self.sender.tensors, self.receiver.tensors
        differ = [name for name in trained if name not in replica or not _bits_equal(trained[name], replica[name])]
        return differ + sorted(set(replica) - set(trained))

    def check_replica(self) -> None:
        """Raise :class:`ReplicaMismatchError` unless the replica equals the trained weights bit for bit."""
        differ = self.mismatched_tensors()
        if differ:
            sequence = self.receiver.sequence if self.receiver is not None else None
            raise ReplicaMismatchError(
                f"after packet {sequence} the replica differs from the trained weights in {len(differ)} "
                f"tensor(s): {differ[:10]}",
                differ,
            )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None:
            return
        metrics = self.metrics()
        if metrics:
            _write_log_metrics(state, logs, metrics)

    def metrics(self) -> dict[str, float]:
        """``delta/packet_bytes``, ``delta/full_bytes``, ``delta/ratio`` over the syncs since the previous call."""
        syncs = self.syncs[self._logged_syncs :]
        self._logged_syncs = len(self.syncs)
        if not syncs:
            return {}
        packet_bytes = sum(r["packet_bytes"] for r in syncs)
        full_bytes = sum(r["full_bytes"] for r in syncs)
        return {
            f"{DELTA_METRIC_PREFIX}packet_bytes": float(packet_bytes),
            f"{DELTA_METRIC_PREFIX}full_bytes": float(full_bytes),
            f"{DELTA_METRIC_PREFIX}ratio": packet_bytes / full_bytes if full_bytes else 0.0,
        }

    def delta_summary(self) -> dict[str, Any]:
        """Totals over all syncs: ``syncs``, ``anchors``, ``deltas``, ``packet_bytes`` and ``full_bytes``
        (all syncs), ``delta_packet_bytes`` / ``delta_full_bytes`` / ``changed_elements`` (delta packets
        only), ``mean_ratio``: the mean over delta packets of packet / full bytes (``None`` without any)."""
        deltas = [r for r in self.syncs if not r["anchor"]]
        return {
            "syncs": len(self.syncs),
            "anchors": len(self.syncs) - len(deltas),
            "deltas": len(deltas),
            "packet_bytes": sum(r["packet_bytes"] for r in self.syncs),
            "full_bytes": sum(r["full_bytes"] for r in self.syncs),
            "delta_packet_bytes": sum(r["packet_bytes"] for r in deltas),
            "delta_full_bytes": sum(r["full_bytes"] for r in deltas),
            "changed_elements": sum(r["changed_elements"] for r in deltas),
            "mean_ratio": sum(r["packet_bytes"] / r["full_bytes"] for r in deltas) / len(deltas) if deltas else None,
        }


# -- TRL's vLLM weight sync, changed tensors only ---------------------------------------------------

_VLLM_GENERATION_ATTRIBUTES = ("mode", "accelerator", "_iter_named_params", "sync_weights")
_VLLM_DETECT = ("snapshot", "checksum")


def _missing_attributes(obj: Any, names: Iterable[str]) -> list[str]:
    return [name for name in names if not hasattr(obj, name)]


def _trl_drift_error(what: str, missing: list[str]) -> AttributeError:
    import trl

    return AttributeError(
        f"{what} lacks {missing}: VLLMDeltaSync was written against trl 1.16's VLLMGeneration "
        f"(trl/generation/vllm_generation.py) and its VLLMClient.update_named_params; this is trl "
        f"{getattr(trl, '__version__', '?')}. Use TRL's own sync_weights, or adapt VLLMDeltaSync."
    )


class VLLMDeltaSync:
    """Replaces ``sync_weights`` of TRL's ``VLLMGeneration`` (trl 1.x; ``trainer.vllm_generation`` of a
    ``GRPOTrainer`` with ``use_vllm=True``) by one that ships only the tensors whose bits changed
    since the previous sync; the first sync ships everything. Install it after building the trainer::

        sync = VLLMDeltaSync.for_trainer(trainer)   # or VLLMDeltaSync(trainer.vllm_generation)
        trainer.train()
        sync.history  # per sync: tensors and bytes sent, of how many

    It walks the parameters with TRL's own ``_iter_named_params`` (FSDP / ZeRO-3 gathering, PEFT
    merging and vLLM names included), so every process takes part in the same gather collectives:

    * server mode: a first pass finds the changed tensors (their ``(name, dtype, shape)`` metadata must
      reach the server before the first tensor is broadcast); a second pass streams only those through
      ``vllm_client.update_named_params`` on the main process (skipped when nothing changed), then
      ``reset_prefix_cache``. Under ZeRO-3 / FSDP this gathers each parameter twice per sync.
    * colocate mode: one pass, ``load_weights([(name, tensor)])`` for the changed tensors only (TRL
      loads tensor by tensor too), then ``llm.reset_prefix_cache()``. With ``vllm_enable_sleep_mode``
      (sleep level 2 discards vLLM's weights after every generation) everything must be re-pushed,
      so TRL's own ``sync_weights`` runs.

    What changed is decided per tensor against the previous sync: ``detect="snapshot"`` (default)
    keeps a copy of the weights as last sent (on ``snapshot_device``, default each tensor's own
    device: as much memory as the model; ``"cpu"`` moves every tensor to the host at each sync) and
    compares bit patterns, exactly; ``detect="checksum"`` keeps 8 bytes per tensor, a 64-bit
    position-sensitive checksum (:func:`~sparse_rl_optim.deltas.encoding.tensor_checksum`; any change
    of a single element is always detected, a multi-element change is missed with probability about
    2**-64). If a sync fails part-way the record is dropped, so the next sync sends everything.

    Whole tensors only: vLLM's weight loading (``update_weights`` / ``load_weights``) takes complete
    named tensors, so changed tiles cannot be sent through it; tile- or element-level packets
    (:class:`DeltaSyncCallback`, :mod:`sparse_rl_optim.deltas`) need a receiver of their own on the
    engine side (e.g. a vLLM worker extension applying packets to its weights in place).

    Not tested here (no vLLM, no GPU, one process): the tests drive the real ``VLLMGeneration``
    methods with a fake ``VLLMClient`` / fake colocated ``LLM`` that record what they receive. Not
    checked: that a vLLM server accepts an ``update_weights`` naming a subset of its tensors and
    leaves the others in place (vLLM's ``load_weights`` loads what it is given, which is what TRL's
    colocate path relies on; models that vLLM quantizes or repacks in ``process_weights_after_loading``
    may need every tensor), the NCCL transfer itself, multi-process (server mode's non-main processes
    and ZeRO-3 / FSDP gathering), PEFT (merged adapter weights change every step, so they are always
    sent), and tensor-parallel colocate mode.
    """

    def __init__(
        self,
        vllm_generation: Any,
        *,
        detect: str = "snapshot",
        snapshot_device: str | torch.device | None = None,
        install: bool = True,
    ) -> None:
        if detect not in _VLLM_DETECT:
            raise ValueError(f"detect must be one of {_VLLM_DETECT}, got {detect!r}")
        missing = _missing_attributes(vllm_generation, _VLLM_GENERATION_ATTRIBUTES)
        if missing:
            raise _trl_drift_error(type(vllm_generation).__name__, missing)
        mode = vllm_generation.mode
        if mode not in ("server", "colocate"):
            raise ValueError(f"VLLMGeneration.mode must be 'server' or 'colocate', got {mode!r}")
        if mode == "server" and vllm_generation.accelerator.is_main_process:
            client = getattr(vllm_generation, "vllm_client", None)
            if client is None:
                raise _trl_drift_error(type(vllm_generation).__name__, ["vllm_client"])
            missing = _missing_attributes(client, ("update_named_params", "reset_prefix_cache"))
            if missing:
                raise _trl_drift_error(type(client).__name__, missing)
        if mode == "colocate" and not hasattr(vllm_generation, "llm"):
            raise _trl_drift_error(type(vllm_generation).__name__, ["llm"])
        self.generation = vllm_generation
        self.detect = detect
        self.snapshot_device = snapshot_device
        #: per sync: ``sent`` / ``total`` tensors, ``sent_bytes`` / ``full_bytes``, ``sent_names``, ``full``.
        self.history: list[dict[str, Any]] = []
        self._reference: dict[str, Any] = {}
        self._original_sync_weights = vllm_generation.sync_weights
        self._installed = False
        if install:
            self.install()

    @classmethod
    def for_trainer(cls, trainer: Any, **kwargs: Any) -> VLLMDeltaSync:
        """Install on ``trainer.vllm_generation`` (a ``GRPOTrainer`` built with ``use_vllm=True``)."""
        generation = getattr(trainer, "vllm_generation", None)
        if generation is None:
            raise ValueError("the trainer has no vllm_generation: build it with use_vllm=True (trl >= 1.0)")
        return cls(generation, **kwargs)

    def install(self) -> None:
        """Route ``vllm_generation.sync_weights()`` (what GRPOTrainer calls) to :meth:`sync_weights`."""
        self.generation.sync_weights = self.sync_weights
        self._installed = True

    def uninstall(self) -> None:
        """Restore TRL's ``sync_weights``."""
        if self._installed and vars(self.generation).get("sync_weights") == self.sync_weights:
            del self.generation.sync_weights  # the instance attribute; the class method shows again
        self._installed = False

    def reset(self) -> None:
        """Forget what was sent: the next sync sends every tensor."""
        self._reference.clear()

    def _changed(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` differs from what was last sent under ``name``; records it as sent."""
        tensor = tensor.detach()
        previous = self._reference.get(name)
        if self.detect == "checksum":
            signature = (tensor.dtype, tuple(tensor.shape), tensor_checksum(tensor))
            self._reference[name] = signature
            return previous != signature
        if previous is not None and _bits_equal(tensor, previous):
            return False
        self._reference[name] = tensor.to(self.snapshot_device or tensor.device, copy=True)
        return True

    def sync_weights(self) -> None:
        """What ``VLLMGeneration.sync_weights`` does, for the changed tensors only."""
        generation = self.generation
        if generation.mode == "colocate" and getattr(generation, "enable_sleep_mode", False):
            # Sleep level 2 discarded vLLM's weights: all of them must be pushed again.
            self._reference.clear()
            self._original_sync_weights()
            self.history.append({"full": True, "sent": None, "total": None, "sent_bytes": None, "full_bytes": None})
            return
        try:
            if generation.mode == "server":
                record = self._sync_server(generation)
            else:
                record = self._sync_colocate(generation)
        except BaseException:
            self._reference.clear()  # part of what was recorded as sent may not have arrived
            raise
        self.history.append(record)

    def _sync_server(self, generation: Any) -> dict[str, Any]:
        accelerator = generation.accelerator
        if not accelerator.is_main_process:
            for _ in generation._iter_named_params():  # take part in the gather collectives, twice
                pass
            for _ in generation._iter_named_params():
                pass
            return {"full": False, "sent": None, "total": None, "sent_bytes": None, "full_bytes": None}
        metadata: list[tuple[str, str, list[int]]] = []
        total = full_bytes = sent_bytes = 0
        for name, param in generation._iter_named_params():
            total += 1
            full_bytes += param.numel() * param.element_size()
            if self._changed(name, param):
                metadata.append((name, str(param.dtype).removeprefix("torch."), list(param.shape)))
                sent_bytes += param.numel() * param.element_size()
        names = {name for name, _, _ in metadata}
        stream = ((name, param) for name, param in generation._iter_named_params() if name in names)
        if metadata:
            generation.vllm_client.update_named_params(metadata, stream)
        for _ in stream:  # finish the walk (gather collectives) if the client stopped early or was not called
            pass
        generation.vllm_client.reset_prefix_cache()
        return {
            "full": len(metadata) == total,
            "sent": len(metadata),
            "total": total,
            "sent_bytes": sent_bytes,
            "full_bytes": full_bytes,
            "sent_names": [name for name, _, _ in metadata],
        }

    def _sync_colocate(self, generation: Any) -> dict[str, Any]:
        llm = generation.llm
        try:
            model = llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError as error:
            raise _trl_drift_error(
                "VLLMGeneration.llm", ["llm_engine.model_executor.driver_worker.model_runner.model"]
            ) from error
        sent: list[str] = []
        total = full_bytes = sent_bytes = 0
        for name, param in generation._iter_named_params():
            total += 1
            full_bytes += param.numel() * param.element_size()
            if self._changed(name, param):
                model.load_weights([(name, param)])
                sent.append(name)
                sent_bytes += param.numel() * param.element_size()
        llm.reset_prefix_cache()
        return {
            "full": len(sent) == total,
            "sent": len(sent),
            "total": total,
            "sent_bytes": sent_bytes,
            "full_bytes": full_bytes,
            "sent_names": sent,
        }
