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
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from trl import GRPOTrainer

from sparse_rl_optim.tracker import PrecisionGateTracker

__all__ = [
    "OptimizerClsAndKwargsMixin",
    "OptimizerClsGRPOTrainer",
    "PrecisionGateCallback",
    "with_optimizer_cls_and_kwargs",
]

METRIC_PREFIX = "gate/"


class PrecisionGateCallback(TrainerCallback):
    """Attaches a :class:`~sparse_rl_optim.PrecisionGateTracker` to the trainer's optimizer and logs
    gate metrics, under keys starting with ``gate/``, into ``trainer.state.log_history``.

    Logged at each logging step, over the optimizer steps since the previous log:

    * ``gate/changed_fraction``: mean per step of the fraction of weights whose bits changed;
    * ``gate/cumulative_changed_fraction``: weights that differ from those at the start of training;
    * ``gate/changed_since_sync_fraction``: weights that differ from the last weights synced to the
      inference engine, i.e. what the next sync must ship;
    * ``gate/synced_fraction``: mean of what each sync in the interval shipped (only when one happened);
    * ``gate/swallowed_fraction``, ``gate/swallowed_of_intended`` (RLSGD only): weights whose gradient
      update was non-zero but whose bf16 value did not change, over all weights / over those updates;
    * ``gate/cumulative/<kind>`` per module kind, and ``gate/nonfinite`` if weights became NaN/inf.

    Syncs mirror TRL's GRPOTrainer: it generates at every ``steps_per_generation * num_iterations``-th
    training micro-batch, counted from the start of ``train()`` (also after a resume), and a generation
    loads the weights of the optimizer steps completed by then if they changed since the last load.
    The callback counts micro-batches the same way (``on_substep_end``; gradient accumulation and
    short last accumulations of an epoch included). With vLLM, evaluation also loads the current
    weights (``on_evaluate``). For other trainers, ``sync_every=N`` marks a sync after every N steps.

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
        if sync_every is not None and sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.tracker = tracker
        self.sync_every = sync_every
        self.jsonl_path = jsonl_path
        self.plot_path = plot_path
        #: ``(optimizer step whose weights were shipped, elements that differed from the previous sync)``.
        self.syncs: list[tuple[int, int]] = []
        self._generate_every: int | None = None
        self._micro_batches = 0  # training micro-batches started since train() began
        self._accumulation_start = 0
        self._last_synced_step = 0
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
        steps_per_generation = getattr(args, "steps_per_generation", None)
        if self.sync_every is None and steps_per_generation:
            self._generate_every = steps_per_generation * (getattr(args, "num_iterations", 1) or 1)
        self._micro_batches = self._accumulation_start = 0  # TRL's counter restarts with train() too
        self._last_synced_step = state.global_step  # the weights at attach are the engine's
        self.tracker.attach(optimizer, start_step=state.global_step)  # global_step > 0 when resuming
        self._logged_records = len(self.tracker.history)

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
        if self.tracker is None or step == self._last_synced_step:
            return  # TRL loads weights only when the step changed since the last load
        self.syncs.append((step, self.tracker.mark_synced()))
        self._last_synced_step = step

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
        if not metrics:
            return
        logs.update(metrics)
        last_entry = state.log_history[-1] if state.log_history else None
        if last_entry is not None and last_entry.get("step") == state.global_step:
            last_entry.update(metrics)

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
            metrics["swallowed_fraction"] = sum(r["swallowed"] for r in records) / (len(records) * total)
            intended = sum(r["intended"] for r in records)
            metrics["swallowed_of_intended"] = sum(r["swallowed"] for r in records) / intended if intended else 0.0
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
