"""The demo's RL phase: the optimizers it compares, TRL's ``GRPOTrainer`` set up for the addition
task, and a callback that prints the reward and the precision gate while training runs."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from transformers import TrainerCallback

from sparse_rl_optim import RLSGD, DenseBlockAdamW, DenseBlockSGD
from sparse_rl_optim.demo.evaluate import MAX_NEW_TOKENS
from sparse_rl_optim.demo.task import addition_reward, make_prompts

__all__ = [
    "DEFAULT_LR",
    "OPTIMIZERS",
    "GRPOSetup",
    "ProgressPrinter",
    "build_optimizer",
    "train_grpo",
]

OPTIMIZERS = ("rlsgd", "adamw", "sgd", "dense-block-adamw", "dense-block-sgd")
#: Per optimizer, the lr with the highest training reward in the committed sweeps
#: (``bench/results/demo_sweep/``, ``bench/results/rl_quality/``).
DEFAULT_LR = {"rlsgd": 0.1, "sgd": 0.1, "adamw": 3e-4, "dense-block-adamw": 1e-3, "dense-block-sgd": 0.1}


@dataclass(frozen=True)
class GRPOSetup:
    """One GRPO run: ``steps`` optimizer steps, each on ``prompts_per_step`` prompts with
    ``generations`` completions sampled per prompt at ``temperature`` (no KL term, constant lr)."""

    steps: int = 150
    prompts_per_step: int = 32
    generations: int = 8
    temperature: float = 1.0


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``args.optimizer`` names, over the model's trainable params, with the demo's
    ``lr``, ``momentum``, ``rounding`` and dense-block settings (no weight decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "rlsgd":
        with warnings.catch_warnings():
            # RLSGD warns that fp32 params make its bf16 rounding moot; that is the point of the option.
            warnings.simplefilter("ignore")
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
    """Prints a table row every ``every`` optimizer steps (and at the last): the mean sampled reward
    and gate figures over the steps since the previous row. Put it after ``PrecisionGateCallback``
    in ``callbacks``, so the ``gate/`` figures of a log call are there when it reads them."""

    HEADER = (
        f"{'step':>5} {'reward':>7} {'changed/step':>13} {'cumulative':>11} "
        f"{'swallowed/updates':>18} {'swallowed/weights':>18} {'time':>7}"
    )

    def __init__(self, every: int, *, stream: TextIO | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.stream = stream
        self._rewards: list[float] = []
        self._changed: list[float] = []
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
        self._rewards.append(float(logs["reward"]))
        if "gate/changed_fraction" in logs:
            self._changed.append(float(logs["gate/changed_fraction"]))
        step = state.global_step
        if step % self.every and step != state.max_steps:
            return

        def percent(key: str) -> str:
            return f"{100 * logs[key]:>.3f}%" if key in logs else "n/a"

        changed = f"{100 * sum(self._changed) / len(self._changed):.3f}%" if self._changed else "n/a"
        self._print(
            f"{step:>5} {sum(self._rewards) / len(self._rewards):>7.3f} {changed:>13} "
            f"{percent('gate/cumulative_changed_fraction'):>11} {percent('gate/swallowed_of_updates'):>18} "
            f"{percent('gate/swallowed_of_weights'):>18} {time.perf_counter() - self._started:>6.1f}s"
        )
        self._rewards.clear()
        self._changed.clear()


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
    callbacks: list[Any] = (),
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
        max_completion_length=MAX_NEW_TOKENS,
        temperature=setup.temperature,
        beta=0.0,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps" if save_every else "no",
        save_steps=save_every or 500,
        save_only_model=True,
        seed=seed,
        disable_tqdm=True,
    )
    prompts = make_prompts(setup.steps * setup.prompts_per_step, max_operand=max_operand, seed=seed + 2, split="train")
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
