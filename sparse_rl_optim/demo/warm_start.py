"""The supervised warm start that gives RL a policy to improve: trained until it is right on a
target share of validation problems, so that every seed starts RL at about the same accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sparse_rl_optim.demo.evaluate import greedy_accuracy
from sparse_rl_optim.demo.task import make_prompts

__all__ = ["WarmStart", "warm_start"]


@dataclass(frozen=True)
class WarmStart:
    """How the warm start ended: ``steps`` taken, the last ``loss``, greedy ``validation_accuracy``
    at the end, the ``target_accuracy`` it aimed at (``None``: a fixed number of steps), and whether it
    ``reached_target`` (``False``: it stopped at ``max_steps`` below the target); the ``seed`` and
    ``max_operand`` it was made with (its problems and batches)."""

    steps: int
    loss: float
    validation_accuracy: float
    target_accuracy: float | None
    reached_target: bool
    seed: int
    max_operand: int


def warm_start(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    max_operand: int,
    seed: int,
    target_accuracy: float = 0.3,
    max_steps: int = 1000,
    check_every: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
) -> WarmStart:
    """Teacher-forced AdamW on ``a+b=sum</s>`` from the train split, loss on the answer tokens only,
    until greedy accuracy on the validation split reaches ``target_accuracy`` (checked every
    ``check_every`` steps) or ``max_steps``. ``target_accuracy=None`` trains ``max_steps`` steps."""
    if max_steps < 0 or check_every < 1 or batch_size < 1:
        raise ValueError("warm_start needs max_steps >= 0, check_every >= 1 and batch_size >= 1")
    validation = make_prompts(None, max_operand=max_operand, seed=f"validation:{seed}", split="validation")
    rows = make_prompts(max_steps * batch_size, max_operand=max_operand, seed=f"warm-start:{seed}", split="train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loss = float("nan")
    accuracy, checked_at = float("nan"), -1
    for step in range(1, max_steps + 1):
        chunk = rows[(step - 1) * batch_size : step * batch_size]
        batch = tokenizer(
            [row["prompt"] + row["answer"] + tokenizer.eos_token for row in chunk], return_tensors="pt", padding=True
        ).to(model.device)
        # Left padding: the answer and </s> are the last tokens of every row.
        answer_tokens = torch.tensor([len(row["answer"]) + 1 for row in chunk], device=model.device)
        positions = torch.arange(batch.input_ids.shape[1], device=model.device)
        labels = batch.input_ids.masked_fill(positions < batch.input_ids.shape[1] - answer_tokens.unsqueeze(1), -100)
        model.train()
        step_loss = model(**batch, labels=labels).loss
        step_loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = step_loss.item()
        if target_accuracy is not None and step % check_every == 0:
            accuracy, checked_at = greedy_accuracy(model, tokenizer, validation), step
            if accuracy >= target_accuracy:
                return WarmStart(step, loss, accuracy, target_accuracy, True, seed, max_operand)
    if checked_at != max_steps:
        accuracy = greedy_accuracy(model, tokenizer, validation)
    reached = target_accuracy is None or accuracy >= target_accuracy
    return WarmStart(max_steps, loss, accuracy, target_accuracy, reached, seed, max_operand)
