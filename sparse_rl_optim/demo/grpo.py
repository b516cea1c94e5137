"""The demo's RL phase: the optimizers it compares, TRL's ``GRPOTrainer`` set up for the addition
task, and a callback that prints the reward and the precision gate while training runs."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from transformers import TrainerCallback

from sparse_rl_optim.demo.task import addition_reward, make_prompts, max_completion_tokens
from sparse_rl_optim.optim.dense_block import DenseBlockAdamW, DenseBlockSGD
from sparse_rl_optim.optim.sgd import RLSGD

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_LR_WITH_MOMENTUM",
    "OPTIMIZERS",
    "GRPOSetup",
    "ProgressPrinter",
    "build_optimizer",
    "train_grpo",
]

OPTIMIZERS = ("rlsgd", "adamw", "sgd", "dense-block-adamw", "dense-block-sgd")
#: Per optimizer, the lr with the highest training reward in the committed sweeps: RLSGD in
#: ``bench/results/demo_sweep/``, AdamW and DenseBlockAdamW in ``bench/results/rl_quality/``. torch SGD
#: on bf16 weights rounds to nearest like RLSGD's ``rounding="nearest"`` and takes its best lr;
#: DenseBlockSGD is not swept and takes RLSGD's.
DEFAULT_LR = {"rlsgd": 0.1, "sgd": 0.1, "adamw": 3e-4, "dense-block-adamw": 3e-3, "dense-block-sgd": 0.1}
#: The SGD family with momentum 0.9 (RLSGD in the demo sweep, torch SGD on fp32 master weights in
#: ``bench/results/rl_quality/``): the best lr is about a tenth, as the step is ~1/(1 - momentum) larger.
DEFAULT_LR_WITH_MOMENTUM = 0.01


@dataclass(frozen=True)
class GRPOSetup:
    """One GRPO run: ``steps`` optimizer steps, each on ``prompts_per_step`` prompts with
    ``generations`` completions sampled per prompt at ``temperature``; no KL term, constant lr, the
    gradient clipped to ``max_grad_norm`` (TRL's default) before the optimizer sees it."""

    steps: int = 150
    prompts_per_step: int = 32
    generations: int = 8
    temperature: float = 1.0
    max_grad_norm: float = 1.0


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``args.optimizer`` names, over the model's trainable params, with the demo's
    ``lr``, ``momentum``, ``rounding`` and dense-block settings (no weight decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "rlsgd":
        return RLSGD(params, lr=args.lr, momentum=args.momentum, rounding=args.rounding)
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum)
    dense_block = dict(
        density=args.density,
        select=args.select,
        reselect_every=args.reselect_every,
        rest=args.rest,
        rest_lr=args.rest_lr,
    )
    if args.optimizer == "dense-block-adamw":
        if args.rest == "sgd" and args.rest_lr is None:
            dense_block["rest_lr"] = DEFAULT_LR["rlsgd"]  # SGD needs its own, far larger lr than AdamW
        return DenseBlockAdamW(params, lr=args.lr, weight_decay=0.0, **dense_block)
    if args.optimizer == "dense-block-sgd":
        return DenseBlockSGD(params, lr=args.lr, momentum=args.momentum, **dense_block)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {args.optimizer!r}; choose from {OPTIMIZERS}")


class ProgressPrinter(TrainerCallback):
    """Prints a table row every ``every`` optimizer steps (and at the last): over the steps since the
    previous row, the mean of each step's sampled reward, changed fraction and swallowed shares; and
    the cumulative changed fraction at the row's step. Put it after ``PrecisionGateCallback`` in
    ``callbacks``, so the ``gate/`` figures of a log call are there when it reads them."""

    _MEANS = ("reward", "gate/changed_fraction", "gate/swallowed_of_updates", "gate/swallowed_of_weights")

    HEADER = (
        f"{'step':>5} {'reward':>7} {'changed/step':>13} {'cumulative':>11} "
        f"{'swallowed/updates':>18} {'swallowed/weights':>18} {'time':>7}"
    )

    def __init__(self, every: int, *, stream: TextIO | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.stream = stream
        self._values: dict[str, list[float]] = {key: [] for key in self._MEANS}
        self._started = time.perf_counter()

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._started = time.perf_counter()
        self._print(self.HEADER)
        self._print("-" * len(self.HEADER))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs or "reward" not in logs:
            return
        for key, values in self._values.items():
            if key in logs:
                values.append(float(logs[key]))
        step = state.global_step
        if step % self.every and step != state.max_steps:
            return

        def mean_percent(key: str) -> str:
            values = self._values[key]
            return f"{100 * sum(values) / len(values):.3f}%" if values else "n/a"

        cumulative = logs.get("gate/cumulative_changed_fraction")
        rewards = self._values["reward"]
        self._print(
            f"{step:>5} {sum(rewards) / len(rewards):>7.3f} {mean_percent('gate/changed_fraction'):>13} "
            f"{'n/a' if cumulative is None else f'{100 * cumulative:.3f}%':>11} "
            f"{mean_percent('gate/swallowed_of_updates'):>18} {mean_percent('gate/swallowed_of_weights'):>18} "
            f"{time.perf_counter() - self._started:>6.1f}s"
        )
        for values in self._values.values():
            values.clear()


def train_grpo(
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    setup: GRPOSetup,
    *,
    lr: float,
    seed: int,
    max_operand: int,
    output_dir: str,
    callbacks: Sequence[Any] = (),
    save_every: int = 0,
) -> Any:
    """Run GRPO (TRL's ``GRPOTrainer``, beta 0, exact-match reward) on prompts from the train split;
    returns the trainer (``trainer.state.log_history`` holds the per-step ``reward``)."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(
        output_dir=output_dir,
        use_cpu=model.device.type == "cpu",
        bf16=False,  # the weights are already in their training dtype; no autocast
        report_to="none",
        gradient_checkpointing=False,
        max_steps=setup.steps,
        per_device_train_batch_size=setup.prompts_per_step * setup.generations,
        num_generations=setup.generations,
        max_completion_length=max_completion_tokens(max_operand),
        temperature=setup.temperature,
        beta=0.0,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=setup.max_grad_norm,
        logging_steps=1,
        save_strategy="steps" if save_every else "no",
        save_steps=save_every or 500,
        save_only_model=True,
        seed=seed,
        disable_tqdm=True,
    )
    prompts = make_prompts(
        setup.steps * setup.prompts_per_step, max_operand=max_operand, seed=f"grpo:{seed}", split="train"
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=addition_reward,
        args=config,
        train_dataset=Dataset.from_list(prompts),
        processing_class=tokenizer,
        optimizers=(optimizer, None),
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # ProgressPrinter replaces the per-step log dicts
    trainer.train()
    return trainer
