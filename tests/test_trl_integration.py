"""TRL / transformers integration: PrecisionGateCallback, the optimizer-class path
(OptimizerClsGRPOTrainer), its DeepSpeed / FSDP motivation, and checkpoint resume with RLSGD.

Everything runs offline on CPU with a char-level tokenizer and a one-layer, 32-wide bf16 Llama
built locally, for a handful of GRPO steps.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import shutil
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from sparse_rl_optim import RLSGD, DenseBlockAdamW
from sparse_rl_optim.demo.task import build_tiny_llama, build_tokenizer, make_prompts
from sparse_rl_optim.integrations.trl import (
    OptimizerClsAndKwargsMixin,
    OptimizerClsGRPOTrainer,
    PrecisionGateCallback,
    with_optimizer_cls_and_kwargs,
)
from sparse_rl_optim.tiles import num_tiles
from sparse_rl_optim.tracker import unwrap_optimizer

# Large enough that lr * grad moves many bf16 weights of the tiny model every step.
LR = 0.05


def dense_reward(completions: list[str], **_: Any) -> list[float]:
    """A reward that varies within every group (an exact-match reward on an untrained model is all
    zeros, so GRPO's advantages and hence the gradients would be zero)."""
    return [float(c.count("1")) + 0.1 * len(c) for c in completions]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return Dataset.from_list(make_prompts(64, max_operand=9, seed=1))


def make_model(tokenizer: Any, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_tiny_llama(tokenizer, hidden_size=32, layers=1, dtype=torch.bfloat16)


def make_config(output_dir: Path, **overrides: Any) -> GRPOConfig:
    settings: dict[str, Any] = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        report_to="none",
        gradient_checkpointing=False,
        disable_tqdm=True,
        max_steps=3,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        beta=0.0,
        learning_rate=LR,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        data_seed=0,
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


def grpo_kwargs(tokenizer: Any, dataset: Dataset, model: torch.nn.Module, config: GRPOConfig) -> dict[str, Any]:
    return dict(model=model, reward_funcs=dense_reward, args=config, train_dataset=dataset, processing_class=tokenizer)


def gate_entries(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in log_history if any(key.startswith("gate/") for key in entry)]


def param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def assert_log_matches_history(
    entries: list[dict[str, Any]], history: list[dict[str, Any]], syncs: list[tuple[int, int]]
) -> None:
    """With logging_steps=1 each logged entry is exactly one tracker record. GRPO generates while it
    accumulates step s, loading the weights after step s - 1: that sync shows in step s's entry and
    shipped what differed after step s - 1 (that record's changed_since_sync)."""
    assert [entry["step"] for entry in entries] == [record["step"] for record in history]
    shipped_by_step = dict(syncs)
    records = {record["step"]: record for record in history}
    for entry, record in zip(entries, history, strict=True):
        total = record["total"]
        gate = {key: value for key, value in entry.items() if key.startswith("gate/")}
        required = {
            "gate/changed_fraction",
            "gate/cumulative_changed_fraction",
            "gate/swallowed_of_weights",
            "gate/changed_since_sync_fraction",
        } | {f"gate/cumulative/{kind}" for kind in record["by_kind"]}
        assert required <= gate.keys()
        assert "gate/nonfinite" not in gate
        for key, value in gate.items():
            assert isinstance(value, float), key
            assert 0.0 <= value <= 1.0, (key, value)
        assert gate["gate/changed_fraction"] == pytest.approx(record["changed_fraction"], rel=1e-12)
        assert gate["gate/changed_fraction"] == pytest.approx(record["changed"] / total, rel=1e-12)
        assert gate["gate/cumulative_changed_fraction"] == pytest.approx(
            record["cumulative_changed"] / total, rel=1e-12
        )
        assert gate["gate/changed_since_sync_fraction"] == pytest.approx(
            record["changed_since_sync"] / total, rel=1e-12
        )
        previous = record["step"] - 1
        if previous in shipped_by_step:
            assert shipped_by_step[previous] == records[previous]["changed_since_sync"]
            assert gate["gate/synced_fraction"] == pytest.approx(shipped_by_step[previous] / total, rel=1e-12)
        else:
            assert "gate/synced_fraction" not in gate
        assert gate["gate/swallowed_of_weights"] == pytest.approx(record["swallowed"] / total, rel=1e-12)
        for kind, counts in record["by_kind"].items():
            expected = counts["cumulative_changed"] / counts["total"]
            assert gate[f"gate/cumulative/{kind}"] == pytest.approx(expected, rel=1e-12)


# -- 1. optimizer instance + PrecisionGateCallback -----------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gate_callback_logs_metrics_that_match_tracker_and_weights(tmp_path, tokenizer, dataset, backend):
    """Also with the Triton step (in the interpreter here), where the tracker takes the changes from
    the kernel instead of snapshotting the weights."""
    model = make_model(tokenizer)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = RLSGD(model.parameters(), lr=LR, backend=backend)
    callback = PrecisionGateCallback()
    trainer = GRPOTrainer(
        **grpo_kwargs(tokenizer, dataset, model, make_config(tmp_path)),
        optimizers=(optimizer, None),
        callbacks=[callback],
    )
    trainer.train()

    assert unwrap_optimizer(trainer.optimizer) is optimizer
    tracker = callback.tracker
    assert tracker is not None
    # GRPO defaults generate at every step: the weights after steps 1 and 2 were loaded (those after
    # the last step never are).
    assert [step for step, _ in callback.syncs] == [1, 2]
    history = tracker.history
    assert [record["step"] for record in history] == [1, 2, 3]
    assert tracker.total == sum(p.numel() for p in model.parameters())
    assert {"attn_q", "attn_k", "attn_v", "attn_o", "mlp", "embed", "norm", "lm_head"} <= set(history[-1]["by_kind"])

    entries = gate_entries(trainer.state.log_history)
    assert len(entries) == 3
    assert_log_matches_history(entries, history, callback.syncs)

    # The bf16 weights really moved, and the tracker's counts are the real bitwise diff.
    assert any(record["changed"] > 0 for record in history)
    assert all(record["swallowed"] is not None and record["intended"] > 0 for record in history)
    for record in history:
        # Synced after every step, so "since sync" is exactly this step's change.
        assert record["changed_since_sync"] == record["changed"]
        assert record["changed"] == sum(record["per_param"].values())
    differing = sum(
        int((initial[name].view(torch.int16) != p.detach().view(torch.int16)).sum())
        for name, p in model.named_parameters()
    )
    assert differing > 0
    assert differing == history[-1]["cumulative_changed"]
    # The callback detaches at the end of training.
    assert optimizer.gate_stats_enabled is False
    assert optimizer.gate_changes_enabled is False
    snapshot_bytes = tracker.memory_bytes()["step_snapshot_bytes"]
    assert snapshot_bytes == 0 if backend == "triton" else snapshot_bytes > 0


def test_gate_callback_syncs_at_grpo_generation_interval(tmp_path, tokenizer, dataset):
    """num_iterations=2: GRPO generates (and would ship weights) every 2 optimizer steps, so
    changed_since_sync accumulates over two steps and restarts after each generation interval."""
    model = make_model(tokenizer)
    callback = PrecisionGateCallback()
    trainer = GRPOTrainer(
        **grpo_kwargs(tokenizer, dataset, model, make_config(tmp_path, max_steps=4, num_iterations=2)),
        optimizers=(RLSGD(model.parameters(), lr=LR), None),
        callbacks=[callback],
    )
    trainer.train()
    assert [step for step, _ in callback.syncs] == [2]  # generations while accumulating steps 1 and 3
    history = callback.tracker.history
    assert [record["step"] for record in history] == [1, 2, 3, 4]
    assert_log_matches_history(gate_entries(trainer.state.log_history), history, callback.syncs)
    # First step after a sync: since-sync is this step's change; second: the union of two steps'.
    for first, second in (history[0], history[1]), (history[2], history[3]):
        assert first["changed_since_sync"] == first["changed"]
        assert second["changed_since_sync"] > second["changed"]
        assert second["changed_since_sync"] <= first["changed"] + second["changed"]
    assert history[0]["changed_since_sync"] == history[0]["cumulative_changed"]


def train_recording_generations(
    output_dir: Path, tokenizer: Any, dataset: Dataset, config: GRPOConfig, resume: Path | None = None
) -> tuple[list[int], PrecisionGateCallback]:
    """Train and return the optimizer steps whose weights TRL's generations used (global_step at each
    training generation: with vLLM those are the weight loads), and the callback. The first generation
    of a train() call loads the weights the tracker is attached with (the initial full load), which is
    the tracker's sync reference, not a delta: it is left out."""
    model = make_model(tokenizer)
    callback = PrecisionGateCallback()
    trainer = GRPOTrainer(
        **grpo_kwargs(tokenizer, dataset, model, config),
        optimizers=(RLSGD(model.parameters(), lr=LR), None),
        callbacks=[callback],
    )
    generated_at: list[int] = []
    generate = trainer._generate_and_score_completions

    def recording_generate(*args: Any, **kwargs: Any) -> Any:
        if trainer.model.training:
            generated_at.append(trainer.state.global_step)
        return generate(*args, **kwargs)

    trainer._generate_and_score_completions = recording_generate
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    return sorted({step for step in generated_at if step > generated_at[0]}), callback


@pytest.mark.parametrize(
    ("overrides", "prompts"),
    [
        (dict(gradient_accumulation_steps=2, steps_per_generation=5), None),
        (dict(gradient_accumulation_steps=2, steps_per_generation=1), None),
        (dict(gradient_accumulation_steps=1, steps_per_generation=3, max_steps=8), None),
        (dict(num_iterations=2), None),
        # 15 prompts: an odd number of micro-batches per epoch, so each epoch ends on a short accumulation
        (dict(gradient_accumulation_steps=2, steps_per_generation=5, num_train_epochs=3, max_steps=14), 15),
    ],
    ids=["ga2-spg5", "ga2-spg1", "ga1-spg3", "iterations2", "epochs-with-remainder"],
)
def test_sync_schedule_matches_when_grpo_generates(tmp_path, tokenizer, dataset, overrides, prompts):
    data = Dataset.from_list(make_prompts(prompts, max_operand=9, seed=1)) if prompts else dataset
    settings = {"max_steps": 6, "per_device_train_batch_size": 4, **overrides}
    loaded, callback = train_recording_generations(tmp_path, tokenizer, data, make_config(tmp_path, **settings))
    assert len(loaded) >= 2, "too few generations after the first step: the test would prove little"
    assert [step for step, _ in callback.syncs] == loaded


def test_sync_schedule_after_resume_from_an_odd_step(tmp_path, tokenizer, dataset):
    """TRL's micro-batch counter restarts with train(), so after resuming from step 3 with
    num_iterations=2 generations fall at other steps than in an uninterrupted run."""
    settings = dict(per_device_train_batch_size=4, num_iterations=2)
    first = make_config(tmp_path / "first", max_steps=3, save_strategy="steps", save_steps=3, **settings)
    train_recording_generations(tmp_path / "first", tokenizer, dataset, first)
    resumed_config = make_config(tmp_path / "resumed", max_steps=6, **settings)
    loaded, callback = train_recording_generations(
        tmp_path / "resumed", tokenizer, dataset, resumed_config, resume=tmp_path / "first" / "checkpoint-3"
    )
    uninterrupted, _ = train_recording_generations(
        tmp_path / "straight", tokenizer, dataset, make_config(tmp_path / "straight", max_steps=6, **settings)
    )
    assert loaded != uninterrupted  # the case the schedule must follow
    assert [step for step, _ in callback.syncs] == loaded
    assert [record["step"] for record in callback.tracker.history] == [4, 5, 6]


def test_gate_callback_averages_over_logging_interval(tmp_path, tokenizer, dataset):
    model = make_model(tokenizer)
    callback = PrecisionGateCallback()
    trainer = GRPOTrainer(
        **grpo_kwargs(tokenizer, dataset, model, make_config(tmp_path, max_steps=4, logging_steps=2)),
        optimizers=(RLSGD(model.parameters(), lr=LR), None),
        callbacks=[callback],
    )
    trainer.train()
    history = callback.tracker.history
    total = history[0]["total"]
    entries = gate_entries(trainer.state.log_history)
    assert [entry["step"] for entry in entries] == [2, 4]
    for entry, records in zip(entries, (history[0:2], history[2:4]), strict=True):
        mean_changed = sum(r["changed_fraction"] for r in records) / 2
        assert entry["gate/changed_fraction"] == pytest.approx(mean_changed, rel=1e-12)
        swallowed = sum(r["swallowed"] for r in records) / (2 * total)
        assert entry["gate/swallowed_of_weights"] == pytest.approx(swallowed, rel=1e-12)
        last = records[-1]
        assert entry["gate/cumulative_changed_fraction"] == pytest.approx(last["cumulative_changed"] / total)
        assert entry["gate/changed_since_sync_fraction"] == pytest.approx(last["changed_since_sync"] / total)
    # GRPO defaults generate at every step, loading the previous step's weights: the syncs of steps 1
    # (during step 2) and 2, 3 (during steps 3, 4) fall into the two logging intervals.
    assert [step for step, _ in callback.syncs] == [1, 2, 3]
    shipped = [history[i]["changed_since_sync"] for i in range(3)]
    assert entries[0]["gate/synced_fraction"] == pytest.approx(shipped[0] / total, rel=1e-12)
    assert entries[1]["gate/synced_fraction"] == pytest.approx((shipped[1] + shipped[2]) / (2 * total), rel=1e-12)


# -- 2. optimizer class + kwargs -------------------------------------------------------------------


def test_optimizer_cls_grpo_trainer_builds_rlsgd_and_logs_gate_metrics(tmp_path, tokenizer, dataset):
    assert issubclass(OptimizerClsGRPOTrainer, GRPOTrainer)
    assert issubclass(OptimizerClsGRPOTrainer, OptimizerClsAndKwargsMixin)
    model = make_model(tokenizer)
    callback = PrecisionGateCallback()
    trainer = OptimizerClsGRPOTrainer(
        **grpo_kwargs(tokenizer, dataset, model, make_config(tmp_path, max_steps=2)),
        optimizer_cls_and_kwargs=(RLSGD, {"lr": LR}),
        callbacks=[callback],
    )
    assert trainer.optimizer is None  # built by the trainer, not at construction
    assert trainer.optimizer_cls_and_kwargs == (RLSGD, {"lr": LR})
    trainer.train()

    optimizer = unwrap_optimizer(trainer.optimizer)
    assert isinstance(optimizer, RLSGD)
    assert all(group["lr"] == LR for group in optimizer.param_groups)
    assert param_ids(optimizer) == {id(p) for p in model.parameters()}
    assert optimizer.state_bytes() == 0  # momentum=0: stateless

    history = callback.tracker.history
    assert [record["step"] for record in history] == [1, 2]
    assert any(record["changed"] > 0 for record in history)
    entries = gate_entries(trainer.state.log_history)
    assert len(entries) == 2
    # swallowed_of_weights is only there because the callback found RLSGD's gate statistics.
    assert_log_matches_history(entries, history, callback.syncs)


def test_with_optimizer_cls_and_kwargs_wraps_any_trainer_class():
    from transformers import Trainer

    wrapped = with_optimizer_cls_and_kwargs(Trainer)
    assert wrapped.__name__ == "OptimizerClsTrainer"
    assert issubclass(wrapped, Trainer) and issubclass(wrapped, OptimizerClsAndKwargsMixin)
    assert wrapped.__mro__.index(OptimizerClsAndKwargsMixin) < wrapped.__mro__.index(Trainer)


def test_optimizer_cls_and_kwargs_with_optimizers_instance_raises(tmp_path, tokenizer, dataset):
    model = make_model(tokenizer)
    with pytest.raises(RuntimeError, match="optimizer_cls_and_kwargs"):
        OptimizerClsGRPOTrainer(
            **grpo_kwargs(tokenizer, dataset, model, make_config(tmp_path)),
            optimizers=(RLSGD(model.parameters(), lr=LR), None),
            optimizer_cls_and_kwargs=(RLSGD, {"lr": LR}),
        )


@pytest.mark.parametrize(
    "cls_and_kwargs",
    [
        (torch.nn.Linear, {"lr": LR}),  # a class, but not an Optimizer
        ("RLSGD", {"lr": LR}),  # not a class
        (RLSGD, [("lr", LR)]),  # kwargs not a dict
    ],
    ids=["module-class", "string", "kwargs-not-dict"],
)
def test_optimizer_cls_and_kwargs_rejects_bad_arguments(tmp_path, tokenizer, dataset, cls_and_kwargs):
    model = make_model(tokenizer)
    with pytest.raises(TypeError, match=r"optimizer_cls_and_kwargs\[[01]\]"):
        OptimizerClsGRPOTrainer(
            **grpo_kwargs(tokenizer, dataset, model, make_config(tmp_path)),
            optimizer_cls_and_kwargs=cls_and_kwargs,
        )


def test_optimizer_cls_and_kwargs_rejects_optimizer_instance(tmp_path, tokenizer, dataset):
    model = make_model(tokenizer)
    with pytest.raises(TypeError, match="Optimizer class"):
        OptimizerClsGRPOTrainer(
            **grpo_kwargs(tokenizer, dataset, model, make_config(tmp_path)),
            optimizer_cls_and_kwargs=(RLSGD(model.parameters(), lr=LR), {}),
        )


# -- 3. DeepSpeed: deepspeed_optim_sched, without DeepSpeed installed -------------------------------


@pytest.fixture
def deepspeed_optim_sched(monkeypatch):
    """transformers' ``deepspeed_optim_sched``, callable without DeepSpeed installed.

    It starts with ``from accelerate.utils import DummyOptim, DummyScheduler``, names accelerate only
    exports when DeepSpeed is importable; expose the real classes from ``accelerate.utils.deepspeed``
    (which imports without DeepSpeed). Neither is used when the DS config has no optimizer/scheduler.
    """
    import accelerate.utils
    from accelerate.utils.deepspeed import DummyOptim, DummyScheduler
    from transformers.integrations.deepspeed import deepspeed_optim_sched as fn

    monkeypatch.setattr(accelerate.utils, "DummyOptim", DummyOptim, raising=False)
    monkeypatch.setattr(accelerate.utils, "DummyScheduler", DummyScheduler, raising=False)
    return fn


def fake_hf_deepspeed_config() -> types.SimpleNamespace:
    """An ``HfDeepSpeedConfig`` stand-in: a DS config naming no optimizer and no scheduler, no offload."""
    return types.SimpleNamespace(config={}, is_offload=lambda: False)


def run_deepspeed_optim_sched(fn: Any, trainer: Any) -> tuple[Any, Any, types.SimpleNamespace]:
    trainer.optimizer = None  # what deepspeed_init does before calling deepspeed_optim_sched
    ds_config = fake_hf_deepspeed_config()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    optimizer, scheduler = fn(trainer, ds_config, trainer.args, 3, params)
    return optimizer, scheduler, ds_config


def test_deepspeed_optim_sched_builds_rlsgd_from_optimizer_cls_and_kwargs(
    tmp_path, tokenizer, dataset, deepspeed_optim_sched
):
    model = make_model(tokenizer)
    trainer = OptimizerClsGRPOTrainer(
        **grpo_kwargs(tokenizer, dataset, model, make_config(tmp_path)),
        optimizer_cls_and_kwargs=(RLSGD, {"lr": LR}),
    )
    optimizer, scheduler, ds_config = run_deepspeed_optim_sched(deepspeed_optim_sched, trainer)
    assert isinstance(optimizer, RLSGD)
    assert trainer.optimizer is optimizer
    assert all(group["lr"] == LR for group in optimizer.param_groups)
    assert param_ids(optimizer) == {id(p) for p in model.parameters()}
    assert scheduler is None  # the HF scheduler is created later by the trainer
    assert ds_config.config["zero_allow_untested_optimizer"] is True


def test_deepspeed_optim_sched_discards_optimizer_instance_for_adamw(
    tmp_path, tokenizer, dataset, deepspeed_optim_sched
):
    """The contrast that motivates the class path: an instance passed via ``optimizers=`` is
    silently replaced by the default AdamW when DeepSpeed builds the optimizer."""
    model = make_model(tokenizer)
    instance = RLSGD(model.parameters(), lr=LR)
    trainer = GRPOTrainer(**grpo_kwargs(tokenizer, dataset, model, make_config(tmp_path)), optimizers=(instance, None))
    assert trainer.optimizer is instance
    optimizer, _, _ = run_deepspeed_optim_sched(deepspeed_optim_sched, trainer)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert not isinstance(optimizer, RLSGD)
    assert optimizer is not instance
    assert trainer.optimizer is optimizer


# -- 4. FSDP: the "Passing `optimizers` is not allowed" guard ---------------------------------------


def test_class_path_leaves_optimizer_unset_so_fsdp_optimizers_guard_cannot_fire(tmp_path, tokenizer, dataset):
    """FSDP cannot be enabled in one CPU process. transformers' guard raises when FSDP is enabled and
    ``self.optimizer`` (or ``self.lr_scheduler``) is set after ``__init__``; check the state each path
    leaves, then re-run transformers' own argument validation with only the FSDP flag forced on."""
    model = make_model(tokenizer)
    cls_trainer = OptimizerClsGRPOTrainer(
        **grpo_kwargs(tokenizer, dataset, model, make_config(tmp_path / "cls")),
        optimizer_cls_and_kwargs=(RLSGD, {"lr": LR}),
    )
    assert cls_trainer.optimizer is None
    assert cls_trainer.lr_scheduler is None

    instance = RLSGD(model.parameters(), lr=LR)
    instance_trainer = GRPOTrainer(
        **grpo_kwargs(tokenizer, dataset, model, make_config(tmp_path / "instance")), optimizers=(instance, None)
    )
    assert instance_trainer.optimizer is instance

    # The guard lives in Trainer._validate_args (called from __init__); with the flag forced on it
    # fires for the instance path only. (A stand-in for real FSDP, which needs a process group.)
    for trainer in (cls_trainer, instance_trainer):
        assert trainer.is_fsdp_enabled is False
        trainer.is_fsdp_enabled = True
    cls_trainer._validate_args()
    with pytest.raises(RuntimeError, match="Passing `optimizers` is not allowed if PyTorch FSDP is enabled"):
        instance_trainer._validate_args()


# -- 5. checkpoint resume ------------------------------------------------------------------------


def train_with_momentum(
    tmp_path: Path,
    tokenizer: Any,
    dataset: Dataset,
    name: str,
    optimizer_path: str,
    *,
    save: bool,
    resume: Path | None = None,
    callbacks: list[Any] | None = None,
) -> GRPOTrainer:
    """Four GRPO steps with RLSGD(momentum=0.9) from identical initial weights and seeds; the
    optimizer passed as an instance (``optimizers=``) or built by the trainer (class and kwargs)."""
    model = make_model(tokenizer)
    config = make_config(tmp_path / name, max_steps=4, save_strategy="steps" if save else "no", save_steps=2)
    if optimizer_path == "instance":
        trainer = GRPOTrainer(
            **grpo_kwargs(tokenizer, dataset, model, config),
            optimizers=(RLSGD(model.parameters(), lr=LR, momentum=0.9), None),
            callbacks=callbacks,
        )
    else:
        trainer = OptimizerClsGRPOTrainer(
            **grpo_kwargs(tokenizer, dataset, model, config),
            optimizer_cls_and_kwargs=(RLSGD, {"lr": LR, "momentum": 0.9}),
            callbacks=callbacks,
        )
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    return trainer


def weights(trainer: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def momentum_buffers(trainer: Any) -> list[torch.Tensor]:
    optimizer = unwrap_optimizer(trainer.optimizer)
    assert isinstance(optimizer, RLSGD)
    return [optimizer.state[p]["momentum_buffer"] for group in optimizer.param_groups for p in group["params"]]


def rewards_by_step(trainer: Any) -> dict[int, float]:
    return {entry["step"]: entry["reward"] for entry in trainer.state.log_history if "reward" in entry}


@pytest.mark.parametrize("optimizer_path", ["instance", "class"])
def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, tokenizer, dataset, optimizer_path):
    def train(name: str, *, save: bool = False, resume: Path | None = None, callbacks=None) -> GRPOTrainer:
        return train_with_momentum(
            tmp_path, tokenizer, dataset, name, optimizer_path, save=save, resume=resume, callbacks=callbacks
        )

    reference = train("uninterrupted")
    reference_weights = weights(reference)

    saving = train("saving", save=True)
    checkpoint = tmp_path / "saving" / "checkpoint-2"
    assert (tmp_path / "saving" / "checkpoint-4").is_dir()
    # Same settings and seeds: the saving run itself reproduces the reference.
    assert all(torch.equal(reference_weights[name], p) for name, p in weights(saving).items())

    # The checkpoint's optimizer state loads without pickle and holds fp32 momentum for bf16 params.
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    saved_buffers = [entry["momentum_buffer"] for entry in saved["state"].values()]
    assert len(saved_buffers) == sum(1 for _ in reference.model.parameters())
    assert all(buffer.dtype == torch.float32 for buffer in saved_buffers)
    assert any(bool(buffer.abs().sum() > 0) for buffer in saved_buffers)

    gate_callback = PrecisionGateCallback()
    resumed = train("resumed", resume=checkpoint, callbacks=[gate_callback])
    assert resumed.state.global_step == 4
    # the tracker numbers its records by the trainer's steps, also after a resume
    assert [record["step"] for record in gate_callback.tracker.history] == [3, 4]
    resumed_weights = weights(resumed)
    for name, param in resumed_weights.items():
        assert param.dtype == torch.bfloat16
        assert torch.equal(param, reference_weights[name]), name
    # Steps 3 and 4 really trained after the resume (the equality is not of untouched weights) ...
    from safetensors.torch import load_file

    at_checkpoint = load_file(str(checkpoint / "model.safetensors"))
    assert any(not torch.equal(at_checkpoint[name], resumed_weights[name]) for name in at_checkpoint)
    # ... on the same generations (same sampled completions give the same rewards) ...
    assert rewards_by_step(resumed)[3] == rewards_by_step(reference)[3]
    assert rewards_by_step(resumed)[4] == rewards_by_step(reference)[4]
    # ... with the same fp32 momentum as the uninterrupted run.
    resumed_buffers, reference_buffers = momentum_buffers(resumed), momentum_buffers(reference)
    assert all(buffer.dtype == torch.float32 for buffer in resumed_buffers)
    assert all(torch.equal(a, b) for a, b in zip(resumed_buffers, reference_buffers, strict=True))

    # Control: resuming without the optimizer state (momentum restarts) does not reproduce the run,
    # so the equality above depends on the restored momentum.
    without_optimizer = tmp_path / "checkpoint-2-without-optimizer"
    shutil.copytree(checkpoint, without_optimizer)
    (without_optimizer / "optimizer.pt").unlink()
    control = train("control", resume=without_optimizer)
    assert control.state.global_step == 4
    assert any(not torch.equal(reference_weights[name], p) for name, p in weights(control).items())


# -- 6. dense-block optimizers -------------------------------------------------------------------

DENSE_BLOCK_KWARGS = {"lr": 1e-2, "density": 0.1, "dense_below": 256, "reselect_every": None}


def test_grpo_with_dense_block_adamw_instance_changes_only_active_tiles(tmp_path, tokenizer, dataset):
    model = make_model(tokenizer)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = DenseBlockAdamW(model.parameters(), **DENSE_BLOCK_KWARGS)
    callback = PrecisionGateCallback()
    trainer = GRPOTrainer(
        **grpo_kwargs(tokenizer, dataset, model, make_config(tmp_path)),
        optimizers=(optimizer, None),
        callbacks=[callback],
    )
    trainer.train()

    assert unwrap_optimizer(trainer.optimizer) is optimizer
    history = callback.tracker.history
    entries = gate_entries(trainer.state.log_history)
    assert [entry["step"] for entry in entries] == [record["step"] for record in history] == [1, 2, 3]
    for entry, record in zip(entries, history, strict=True):
        assert entry["gate/changed_fraction"] == pytest.approx(record["changed"] / record["total"], rel=1e-12)
    blocked = 0
    for name, param in model.named_parameters():
        changed = (initial[name].view(torch.int16) != param.detach().view(torch.int16)).reshape(-1)
        tile_ids = optimizer.state[param]["tile_ids"]
        if optimizer.is_dense(param, optimizer.param_groups[0]):
            assert tile_ids.numel() == num_tiles(param.numel(), 64)
            continue
        blocked += 1
        inside = torch.zeros(param.numel(), dtype=torch.bool)
        for tile in tile_ids.tolist():
            inside[tile * 64 : (tile + 1) * 64] = True
        assert not (changed & ~inside).any(), name
        assert changed.any(), name
    assert blocked >= 4  # the attention and MLP matrices
    assert history[-1]["cumulative_changed"] > 0
    report = optimizer.state_bytes_report()
    assert report["total"] == optimizer.state_bytes() <= report["budget"] + report["overhead"]


def test_grpo_class_path_builds_dense_block_adamw_and_resumes_bit_identically(tmp_path, tokenizer, dataset):
    def train(name: str, *, save: bool = False, resume: Path | None = None) -> Any:
        config = make_config(
            tmp_path / name, max_steps=4, save_strategy="steps" if save else "no", save_steps=2, weight_decay=0.1
        )
        trainer = OptimizerClsGRPOTrainer(
            **grpo_kwargs(tokenizer, dataset, make_model(tokenizer), config),
            optimizer_cls_and_kwargs=(DenseBlockAdamW, {**DENSE_BLOCK_KWARGS, "reselect_every": 3}),
        )
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        return trainer

    reference = train("uninterrupted")
    optimizer = unwrap_optimizer(reference.optimizer)
    assert isinstance(optimizer, DenseBlockAdamW)
    # transformers' create_optimizer split the params into decay / no-decay groups, each with our settings.
    assert len(optimizer.param_groups) == 2
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.0, 0.1}
    assert all(group["density"] == 0.1 for group in optimizer.param_groups)

    train("saving", save=True)
    checkpoint = tmp_path / "saving" / "checkpoint-2"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert all(entry["exp_avg"].dtype == torch.float32 for entry in saved["state"].values())
    assert all(entry["tile_ids"].dtype == torch.int64 for entry in saved["state"].values())
    resumed = train("resumed", resume=checkpoint)  # step 3 reselects tiles, after the resume
    assert resumed.state.global_step == 4
    for name, param in weights(resumed).items():
        assert torch.equal(param, weights(reference)[name]), name
    without_optimizer = tmp_path / "checkpoint-2-without-optimizer"
    shutil.copytree(checkpoint, without_optimizer)
    (without_optimizer / "optimizer.pt").unlink()
    control = train("control", resume=without_optimizer)
    assert any(not torch.equal(weights(reference)[name], p) for name, p in weights(control).items())
