"""torchrun worker: TRL's GRPOTrainer on 2 CPU processes (gloo), the optimizer built by the trainer
from ``optimizer_cls_and_kwargs`` (:class:`~sparse_rl_optim.integrations.trl.OptimizerClsGRPOTrainer`).

Modes (``--mode``):

* ``ddp``: what transformers / accelerate do with 2 CPU processes: ``DistributedDataParallel``.
* ``fsdp2``: ``GRPOConfig(fsdp=True, fsdp_config={"version": 2})``. accelerate 1.15 ignores an FSDP
  plugin on CPU (``AcceleratorState`` switches to ``DistributedType.FSDP`` only in its GPU branch, so
  CPU processes silently get DDP); :func:`force_fsdp_on_cpu` flips that one switch so the GPU code
  path runs here: ``fsdp2_prepare_model`` (``fully_shard`` on each decoder layer, the embeddings, the
  norm + head, the root), then the optimizer built on the ``DTensor`` params.
* ``deepspeed`` (``--zero-stage``; needs ``deepspeed`` installed, which the project does not depend
  on): ``GRPOConfig(deepspeed={...}, use_cpu=True)``; no switch needed (accelerate's DeepSpeed branch
  does not look at the device; DeepSpeed's CPU accelerator uses gloo).

The worker fails if the model it trains is not what the mode asks for. Per scenario (``--scenarios``,
names in :data:`SCENARIOS`) it asserts that the trainer's optimizer (inside accelerate's wrapper) is
the requested class over the trained model's own parameters (``DTensor`` shards under FSDP2, plain
replicas under DDP), that ``--steps`` optimizer steps ran and each changed weights, and measures,
writing them out for the launching test to assert (so a known failure can be marked there):

* ``rank_weight_mismatches``: elements whose bits differ between rank 0's and rank 1's full
  weights at the end (gathered from the shards under FSDP2);
* ``rank_grad_mismatches``: the same for the full gradients the optimizer saw at every step;
* ``replay_mismatches``: per step, elements whose bits differ between what the distributed optimizer
  produced and what one process produces with the same optimizer class and kwargs on the gathered
  full weights and gradients (what DDP's all-reduce / FSDP2's reduce-scatter delivered, after
  clipping) with the same random state; every rank replays, rank 0's counts are written.

Scenario ``rlsgd_instance`` instead passes an RLSGD *instance* to TRL's plain ``GRPOTrainer``
(``optimizers=(instance, None)``) and records whether the mode kept it, replaced it or refused it.

Rank 0 writes ``<out>/<mode>_<scenario>.json`` and ``.pt`` (the final full weights), so the test
can also compare the DDP and FSDP2 runs with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
from _common import finish

LR_RLSGD = 0.05
LR_DENSE_BLOCK = 1e-3

#: ``name: (optimizer class in sparse_rl_optim, its kwargs, GRPOConfig overrides)``; the trainer
#: builds ``cls(param_groups, **kwargs)``. Gradient clipping at 1.0 (transformers' default) unless
#: overridden.
SCENARIOS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "rlsgd": ("RLSGD", {"lr": LR_RLSGD, "momentum": 0.9}, {}),
    "rlsgd_noclip": ("RLSGD", {"lr": LR_RLSGD, "momentum": 0.9}, {"max_grad_norm": 0.0}),
    "rlsgd_stochastic": ("RLSGD", {"lr": LR_RLSGD, "momentum": 0.9, "rounding": "stochastic"}, {}),
    # Every tensor blocked (the tiny model's are all below the default dense_below), reselected
    # every 2 steps: tile selection across the shards goes through the trainer.
    "dense_block": ("DenseBlockAdamW", {"lr": LR_DENSE_BLOCK, "dense_below": 0, "reselect_every": 2}, {}),
}
#: Not a class path: TRL's plain ``GRPOTrainer(optimizers=(RLSGD(model.parameters(), ...), None))``,
#: to record what each mode does with an optimizer *instance* (:func:`run_instance`).
INSTANCE_SCENARIO = "rlsgd_instance"


def dense_reward(completions: list[str], **_: Any) -> list[float]:
    """Varies within every group (exact match on an untrained model is all zeros: no gradient)."""
    return [float(c.count("1")) + 0.1 * len(c) for c in completions]


def force_fsdp_on_cpu() -> None:
    """Let accelerate's FSDP plugin take effect with CPU processes (test-only; see the module doc).

    ``AcceleratorState.__init__`` sets ``distributed_type = FSDP`` only in its GPU branch; on CPU it
    stays ``MULTI_CPU`` and ``Accelerator.prepare`` wraps the model in DDP. Set it to FSDP where the
    plugin was given, in both shared states (every later ``AcceleratorState()`` re-copies
    ``PartialState``'s)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original_init = AcceleratorState.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor), detached, as a new plain tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().clone()


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Bit patterns (so NaN == NaN, -0.0 != 0.0) for exact comparisons."""
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(view)


def differing(a: torch.Tensor, b: torch.Tensor) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    return int((bits(a) != bits(b)).sum())


def unwrap_chain(optimizer: Any) -> list[Any]:
    """``[accelerate's wrapper, (DeepSpeed's ZeRO optimizer,) the optimizer the trainer built]``."""
    chain = [optimizer]
    while getattr(chain[-1], "optimizer", None) is not None:
        chain.append(chain[-1].optimizer)
    return chain


class StepRecorder:
    """Optimizer step hooks: the full weights, gradients and RNG state before each step and the full
    weights after. Every rank runs the same collectives in the same order (hooks fire on all ranks)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.steps: list[dict[str, Any]] = []
        optimizer.register_step_pre_hook(self._before)
        optimizer.register_step_post_hook(self._after)

    def _before(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.steps.append(
            {
                "rng": torch.get_rng_state(),
                "before": [full(p) for p in self.params],
                "grads": [None if p.grad is None else full(p.grad) for p in self.params],
            }
        )

    def _after(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.steps[-1]["after"] = [full(p) for p in self.params]


def build_trainer(args: argparse.Namespace, scenario: str) -> tuple[Any, dict[str, torch.Tensor]]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    import sparse_rl_optim
    from sparse_rl_optim.demo.task import build_tiny_llama, build_tokenizer, make_prompts
    from sparse_rl_optim.integrations.trl import OptimizerClsGRPOTrainer

    tokenizer = build_tokenizer()
    dataset = Dataset.from_list(make_prompts(64, max_operand=9, seed=1))
    torch.manual_seed(0)  # the same initial weights on every rank (and in every mode)
    model = build_tiny_llama(tokenizer, hidden_size=32, layers=2, dtype=torch.bfloat16)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}

    cls_name, kwargs, overrides = SCENARIOS["rlsgd" if scenario == INSTANCE_SCENARIO else scenario]
    parallel: dict[str, Any] = {}
    if args.mode == "fsdp2":
        parallel = dict(fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": True})
    if args.mode == "deepspeed":
        # No "optimizer" section: transformers then calls the trainer's create_optimizer (the class
        # path) and sets zero_allow_untested_optimizer itself.
        parallel = dict(
            deepspeed={
                "zero_optimization": {"stage": args.zero_stage},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
            }
        )
    settings: dict[str, Any] = dict(
        output_dir=str(args.out / "trainer"),
        use_cpu=True,  # with DeepSpeed too (use_cpu=False without a GPU: accelerate records 1 process)
        # The model is bf16 itself (RLSGD's use case). Mixed precision would also make accelerate's
        # FSDP2 preparation upcast the trainable params to fp32 (fsdp2_prepare_model).
        bf16=False,
        report_to="none",
        gradient_checkpointing=False,
        disable_tqdm=True,
        max_steps=args.steps,
        per_device_train_batch_size=4,
        num_generations=4,  # one group per rank per step: 2 prompts a step in all
        max_completion_length=4,
        beta=0.0,
        learning_rate=LR_RLSGD,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        data_seed=0,
        **parallel,
    )
    config = GRPOConfig(**{**settings, **overrides})
    common = dict(
        model=model, reward_funcs=dense_reward, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    optimizer_cls = getattr(sparse_rl_optim, cls_name)
    if scenario == INSTANCE_SCENARIO:
        trainer = GRPOTrainer(**common, optimizers=(optimizer_cls(model.parameters(), **kwargs), None))
    else:
        trainer = OptimizerClsGRPOTrainer(**common, optimizer_cls_and_kwargs=(optimizer_cls, dict(kwargs)))
    return trainer, initial


def replay(inner: torch.optim.Optimizer, recorder: StepRecorder, kwargs: dict[str, Any]) -> list[int]:
    """Step a one-process copy of ``inner`` (its class built with the trainer's ``kwargs`` on param
    groups with ``inner``'s hyperparameters) on the recorded full weights and gradients, each step
    from the recorded weights; return per step the elements whose bits differ from what the
    distributed optimizer produced. Optimizer state (momentum, moments) carries over as usual."""
    groups, index, replicas = [], 0, []
    first = recorder.steps[0]["before"]
    for group in inner.param_groups:
        count = len(group["params"])
        params = [torch.nn.Parameter(t.clone()) for t in first[index : index + count]]
        replicas.extend(params)
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
        index += count
    copy = type(inner)(groups, **kwargs)
    mismatches = []
    for step in recorder.steps:
        with torch.no_grad():
            for replica, before, grad in zip(replicas, step["before"], step["grads"], strict=True):
                replica.copy_(before)
                replica.grad = None if grad is None else grad.clone()
        torch.set_rng_state(step["rng"])
        copy.step()
        mismatches.append(sum(differing(r.detach(), after) for r, after in zip(replicas, step["after"], strict=True)))
    return mismatches


def compare_with_rank0(values: list[torch.Tensor | None]) -> int:
    """Elements (summed over ranks) whose bits differ from rank 0's ``values``."""
    reference = [values if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(reference, src=0)
    count = 0
    for mine, theirs in zip(values, reference[0], strict=True):
        if (mine is None) != (theirs is None):
            count += (mine if mine is not None else theirs).numel()
        elif mine is not None:
            count += differing(mine, theirs)
    total = torch.tensor([count])
    dist.all_reduce(total)
    return int(total)


def write_result(args: argparse.Namespace, scenario: str, result: dict[str, Any]) -> None:
    if dist.get_rank() == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.mode}_{scenario}.json").write_text(json.dumps(result, indent=1))
    print(f"[rank {dist.get_rank()}] {json.dumps(result)}", flush=True)


def run_instance(args: argparse.Namespace) -> None:
    """Record what the mode does with an optimizer instance: kept, replaced, or refused at init."""
    result: dict[str, Any] = {"mode": args.mode, "scenario": INSTANCE_SCENARIO}
    try:
        trainer, _ = build_trainer(args, INSTANCE_SCENARIO)
    except (RuntimeError, ValueError) as error:  # transformers refuses an instance under FSDP
        result["init_error"] = f"{type(error).__name__}: {error}"
        write_result(args, INSTANCE_SCENARIO, result)
        return
    instance = trainer.optimizer
    trainer.train()
    chain = unwrap_chain(trainer.optimizer)
    result["optimizer_chain"] = [type(o).__name__ for o in chain]
    result["instance_kept"] = any(o is instance for o in chain)
    result["steps"] = trainer.state.global_step
    write_result(args, INSTANCE_SCENARIO, result)


def run(args: argparse.Namespace, scenario: str) -> None:
    """Train one scenario; assert what the trainer built and that the steps changed weights; measure
    the equalities and write them out."""
    from accelerate.utils import DistributedType
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel
    from transformers import TrainerCallback

    started = time.perf_counter()
    trainer, initial = build_trainer(args, scenario)
    recorders: list[StepRecorder] = []
    deepspeed = args.mode == "deepspeed"

    class Record(TrainerCallback):
        def on_train_begin(self, *_: Any, optimizer: Any = None, **__: Any) -> None:
            if not deepspeed:  # ZeRO steps flat fp32 partitions: nothing param-shaped to record
                recorders.append(StepRecorder(unwrap_chain(optimizer)[-1]))

    trainer.add_callback(Record())
    trainer.train()
    rank, world = dist.get_rank(), dist.get_world_size()

    # The mode is the one asked for, and the trainer built the optimizer over the trained params.
    state = trainer.accelerator.state
    wrapped = trainer.model_wrapped
    params = dict(trainer.model.named_parameters())
    chain = unwrap_chain(trainer.optimizer)
    inner = chain[-1]
    assert type(inner).__name__ == SCENARIOS[scenario][0], [type(o).__name__ for o in chain]
    optimizer_params = [p for group in inner.param_groups for p in group["params"]]
    if not optimizer_params and hasattr(chain[-2], "fp32_partitioned_groups_flat"):  # ZeRO-3 hands them over at step
        optimizer_params = list(chain[-2].fp32_partitioned_groups_flat)
    local_elements = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params.values())
    total_elements = sum(p.numel() for p in params.values())
    if args.mode == "fsdp2":
        assert state.distributed_type == DistributedType.FSDP and trainer.accelerator.is_fsdp2, state.distributed_type
        assert all(isinstance(p, DTensor) for p in params.values()), "FSDP2 params must be DTensors"
        assert local_elements < total_elements, f"rank {rank} holds all {total_elements} elements: not sharded"
    elif args.mode == "ddp":
        assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
        assert isinstance(wrapped, DistributedDataParallel), type(wrapped)
        assert not any(isinstance(p, DTensor) for p in params.values())
    else:
        assert state.distributed_type == DistributedType.DEEPSPEED and trainer.is_deepspeed_enabled
        assert wrapped.zero_optimization_stage() == args.zero_stage, wrapped.zero_optimization_stage()
    if not deepspeed or args.zero_stage == 0:
        assert len(optimizer_params) == len(params)
        assert {id(p) for p in optimizer_params} == {id(p) for p in params.values()}, "optimizer params != model params"
    assert trainer.state.global_step == args.steps, trainer.state.global_step

    # The weights at the end, whole, on every rank.
    if deepspeed and args.zero_stage == 3:
        import deepspeed as ds

        with ds.zero.GatheredParameters(list(params.values())):
            final = {name: p.detach().clone() for name, p in params.items()}
    else:
        final = {name: full(p) for name, p in params.items()}
    changed_total = sum(differing(final[name], initial[name]) for name in initial)
    assert changed_total > 0, "training left every weight unchanged"
    result: dict[str, Any] = {
        "mode": args.mode,
        "scenario": scenario,
        "optimizer_chain": [type(o).__name__ for o in chain],
        "optimizer_kwargs": SCENARIOS[scenario][1],
        "optimizer_param_dtypes": sorted({str(p.dtype) for p in optimizer_params}),
        "optimizer_param_shapes_rank0": [list(p.shape) for p in optimizer_params] if deepspeed else None,
        "wrapped": type(wrapped).__name__,
        "param_types": sorted({type(p).__name__ for p in params.values()}),
        "world": world,
        "local_elements_rank0": local_elements,
        "elements": total_elements,
        "steps": trainer.state.global_step,
        "changed_total": changed_total,
        "max_grad_norm": trainer.args.max_grad_norm,
    }
    if recorders:
        (recorder,) = recorders
        assert len(recorder.steps) == args.steps, len(recorder.steps)
        changed_per_step = [
            sum(differing(a, b) for a, b in zip(s["before"], s["after"], strict=True)) for s in recorder.steps
        ]
        assert all(changed > 0 for changed in changed_per_step), changed_per_step
        names = {id(p): name for name, p in params.items()}
        last = {names[id(p)]: t for p, t in zip(recorder.params, recorder.steps[-1]["after"], strict=True)}
        assert all(differing(final[name], last[name]) == 0 for name in final), "weights moved after the last step"
        result["changed_per_step"] = changed_per_step
        result["rank_grad_mismatches"] = compare_with_rank0([g for s in recorder.steps for g in s["grads"]])
        result["replay_mismatches"] = replay(inner, recorder, trainer.optimizer_cls_and_kwargs[1])
    result["rank_weight_mismatches"] = compare_with_rank0([final[name] for name in sorted(final)])
    result["seconds"] = round(time.perf_counter() - started, 2)
    write_result(args, scenario, result)
    if rank == 0:
        torch.save(final, args.out / f"{args.mode}_{scenario}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", choices=["ddp", "fsdp2", "deepspeed"], required=True)
    parser.add_argument("--scenarios", default="rlsgd", help=f"comma-separated, of {[*SCENARIOS, INSTANCE_SCENARIO]}")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.mode == "fsdp2":
        force_fsdp_on_cpu()
    for scenario in args.scenarios.split(","):
        if scenario == INSTANCE_SCENARIO:
            run_instance(args)
            continue
        run(args, scenario)
    finish()  # barrier, shut down, exit without the interpreter teardown (see _common.finish)


if __name__ == "__main__":
    main()
