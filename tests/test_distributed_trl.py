"""TRL's GRPOTrainer on 2 CPU processes with the optimizer built by the trainer from
``optimizer_cls_and_kwargs`` (OptimizerClsGRPOTrainer): DDP, FSDP2 and (when installed) DeepSpeed.

The worker ``tests/distributed/run_grpo.py`` trains a 2-layer bf16 Llama for 3 GRPO steps per
scenario under ``torchrun --nproc_per_node 2`` (gloo) and asserts what the trainer built; these tests
assert the equalities it measured (see its docstring). One launch per mode, shared by the tests.

FSDP2 on CPU needs a test-only switch: accelerate 1.15 enables its FSDP plugin only on GPU-like
devices, and with CPU processes silently falls back to DDP (see ``docs/distributed_trl.md``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torchrun import run_torchrun

SCENARIOS = ("rlsgd", "rlsgd_noclip", "rlsgd_stochastic", "dense_block", "rlsgd_instance")
STEPS = 3
OPTIMIZER = {"rlsgd": "RLSGD", "rlsgd_noclip": "RLSGD", "rlsgd_stochastic": "RLSGD", "dense_block": "DenseBlockAdamW"}

# With gradient clipping (transformers' default max_grad_norm=1.0) the clip coefficient comes from a
# norm summed in a different order (FSDP2: per-shard sums of squares, all-reduced; DDP: whole
# gradients), so it differs in the last fp32 bits and some bf16 roundings flip. Observed after 3
# steps: 675 of 19,616 elements (3.4%), at most 2.4e-4 apart (init std 0.02). Without clipping the
# two runs are bit-identical (asserted).
CLIPPED_MAX_DIFFERING_FRACTION = 0.10
CLIPPED_MAX_ABS_DIFF = 1e-3


def launch(out: Path, mode: str, *extra: str, scenarios: tuple[str, ...] = SCENARIOS) -> Path:
    run_torchrun("run_grpo.py", out, "--mode", mode, "--scenarios", ",".join(scenarios), "--steps", str(STEPS), *extra)
    return out


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return launch(tmp_path_factory.mktemp("grpo_ddp"), "ddp")


@pytest.fixture(scope="module")
def fsdp2_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return launch(tmp_path_factory.mktemp("grpo_fsdp2"), "fsdp2")


def result(out: Path, mode: str, scenario: str) -> dict[str, Any]:
    return json.loads((out / f"{mode}_{scenario}.json").read_text())


def final_weights(out: Path, mode: str, scenario: str) -> dict[str, torch.Tensor]:
    return torch.load(out / f"{mode}_{scenario}.pt")


def assert_trained_and_equal(run: dict[str, Any], optimizer: str) -> None:
    """What every (mode, class-path scenario) must show: the trainer's optimizer is the requested
    class over bf16 params, 3 steps each changed weights, the ranks agree bit for bit on weights and
    gradients, and each step equals a one-process step on the gathered full tensors."""
    assert run["optimizer_chain"] == ["AcceleratedOptimizer", optimizer]
    assert run["optimizer_param_dtypes"] == ["torch.bfloat16"]
    assert run["world"] == 2
    assert run["steps"] == STEPS
    assert len(run["changed_per_step"]) == STEPS and min(run["changed_per_step"]) > 0
    assert run["changed_total"] > 0
    assert run["rank_weight_mismatches"] == 0
    assert run["rank_grad_mismatches"] == 0
    assert run["replay_mismatches"] == [0] * STEPS


@pytest.mark.parametrize("scenario", ["rlsgd", "rlsgd_noclip", "dense_block"])
def test_ddp_grpo_with_optimizer_class_and_kwargs(ddp_out, scenario):
    run = result(ddp_out, "ddp", scenario)
    assert run["wrapped"] == "DistributedDataParallel"
    assert run["param_types"] == ["Parameter"]
    assert run["local_elements_rank0"] == run["elements"]  # replicas
    assert_trained_and_equal(run, OPTIMIZER[scenario])


@pytest.mark.parametrize("scenario", ["rlsgd", "rlsgd_noclip"])
def test_fsdp2_grpo_with_optimizer_class_and_kwargs(fsdp2_out, scenario):
    run = result(fsdp2_out, "fsdp2", scenario)
    assert run["wrapped"] == "FSDPLlamaForCausalLM"  # fully_shard's class swap
    assert run["param_types"] == ["DTensor"]
    assert run["local_elements_rank0"] < run["elements"]  # rank 0 holds its shards only
    assert_trained_and_equal(run, OPTIMIZER[scenario])


def test_fsdp2_grpo_dense_block_adamw(fsdp2_out):
    """DenseBlockAdamW over FSDP2's DTensor shards, every tensor blocked."""
    run = result(fsdp2_out, "fsdp2", "dense_block")
    assert run["param_types"] == ["DTensor"]
    assert run["local_elements_rank0"] < run["elements"]
    assert_trained_and_equal(run, "DenseBlockAdamW")


def test_fsdp2_and_ddp_train_the_same_weights(ddp_out, fsdp2_out):
    """Same data and per-rank sampling in both modes: without clipping the final weights are bit-identical;
    with clipping they agree within the stated tolerance (module comment)."""
    ddp = final_weights(ddp_out, "ddp", "rlsgd_noclip")
    fsdp2 = final_weights(fsdp2_out, "fsdp2", "rlsgd_noclip")
    assert ddp.keys() == fsdp2.keys()
    for name in ddp:
        assert torch.equal(ddp[name].view(torch.int16), fsdp2[name].view(torch.int16)), name

    for scenario in ("rlsgd", "dense_block"):
        ddp, fsdp2 = final_weights(ddp_out, "ddp", scenario), final_weights(fsdp2_out, "fsdp2", scenario)
        total = sum(t.numel() for t in ddp.values())
        differing = sum(int((ddp[n].view(torch.int16) != fsdp2[n].view(torch.int16)).sum()) for n in ddp)
        max_diff = max(float((ddp[n].float() - fsdp2[n].float()).abs().max()) for n in ddp)
        assert differing <= CLIPPED_MAX_DIFFERING_FRACTION * total, (scenario, differing, total)
        assert max_diff <= CLIPPED_MAX_ABS_DIFF, (scenario, max_diff)


def test_optimizer_instance_kept_by_ddp_refused_by_fsdp2(ddp_out, fsdp2_out):
    """Plain GRPOTrainer(optimizers=(RLSGD(...), None)): DDP trains with the instance; with FSDP
    transformers refuses it at init (hence the class path)."""
    ddp = result(ddp_out, "ddp", "rlsgd_instance")
    assert ddp["instance_kept"] is True and ddp["optimizer_chain"] == ["AcceleratedOptimizer", "RLSGD"]
    assert ddp["steps"] == STEPS
    fsdp2 = result(fsdp2_out, "fsdp2", "rlsgd_instance")
    assert "Passing `optimizers` is not allowed if PyTorch FSDP is enabled" in fsdp2["init_error"]


def test_stochastic_rounding_agrees_across_ranks(ddp_out, fsdp2_out):
    ddp = result(ddp_out, "ddp", "rlsgd_stochastic")
    fsdp2 = result(fsdp2_out, "fsdp2", "rlsgd_stochastic")
    assert ddp["rank_grad_mismatches"] == 0 and fsdp2["rank_grad_mismatches"] == 0  # not the gradients
    assert ddp["rank_weight_mismatches"] == 0, "DDP replicas diverged"
    assert fsdp2["replay_mismatches"] == [0] * STEPS, "FSDP2 steps differ from one process's"


# -- DeepSpeed: only where it is installed (the project does not depend on it) ------------------------


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_zero_grpo_keeps_the_class_path_optimizer(tmp_path, stage):
    """DeepSpeed builds the optimizer through the trainer's create_optimizer, so the class path gives
    RLSGD at every ZeRO stage, while an instance is replaced by AdamW. From stage 1 on, ZeRO hands
    RLSGD flat fp32 master partitions, not the bf16 weights (see docs/distributed_trl.md)."""
    pytest.importorskip("deepspeed")
    out = launch(tmp_path, "deepspeed", "--zero-stage", str(stage), scenarios=("rlsgd", "rlsgd_instance"))
    run = result(out, "deepspeed", "rlsgd")
    assert run["wrapped"] == "DeepSpeedEngine"
    assert run["optimizer_chain"][-1] == "RLSGD"
    assert run["steps"] == STEPS and run["changed_total"] > 0
    assert run["rank_weight_mismatches"] == 0
    if stage == 0:
        assert run["optimizer_chain"] == ["DeepSpeedOptimizerWrapper", "RLSGD"]
        assert run["optimizer_param_dtypes"] == ["torch.bfloat16"]
    else:
        zero = "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer"
        assert run["optimizer_chain"] == ["DeepSpeedOptimizerWrapper", zero, "RLSGD"]
        assert run["optimizer_param_dtypes"] == ["torch.float32"]
        assert all(len(shape) == 1 for shape in run["optimizer_param_shapes_rank0"])
    instance = result(out, "deepspeed", "rlsgd_instance")
    assert instance["instance_kept"] is False and instance["optimizer_chain"][-1] == "AdamW"
