"""Held-out accuracy of the demo's policy: greedy, and sampled at the training temperature."""

from __future__ import annotations

from typing import Any

import torch

from sparse_rl_optim.demo.task import addition_reward, completion_budget

__all__ = ["SAMPLES_PER_PROMPT", "greedy_accuracy", "sampled_accuracy"]

#: Completions sampled per held-out prompt for the sampled accuracy.
SAMPLES_PER_PROMPT = 4


@torch.no_grad()
def _completions(model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, str]], **generate: Any) -> list[str]:
    """One completion per row, up to :func:`completion_budget` tokens of the longest answer."""
    if not rows:
        raise ValueError("no prompts to evaluate")
    prompts = [row["prompt"] for row in rows]
    max_new_tokens = completion_budget(max(len(row["answer"]) for row in rows))
    was_training = model.training
    model.eval()
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **generate)
    finally:
        model.train(was_training)
    return tokenizer.batch_decode(output[:, batch.input_ids.shape[1] :], skip_special_tokens=True)


def greedy_accuracy(model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, str]]) -> float:
    """Fraction of prompts whose greedy completion is exactly the sum."""
    completions = _completions(model, tokenizer, rows, do_sample=False)
    rewards = addition_reward(completions, [row["answer"] for row in rows])
    return sum(rewards) / len(rewards)


def sampled_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: list[dict[str, str]],
    *,
    temperature: float = 1.0,
    samples_per_prompt: int = SAMPLES_PER_PROMPT,
    seed: int = 0,
) -> float:
    """Mean exact-match reward of ``samples_per_prompt`` completions per prompt sampled at
    ``temperature`` (no top-k/top-p, as in GRPO's rollouts): the expected training reward on these
    prompts. Seeded; the global RNG state is left as it was."""
    repeated = [row for row in rows for _ in range(samples_per_prompt)]
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        completions = _completions(
            model, tokenizer, repeated, do_sample=True, temperature=temperature, top_k=0, top_p=1.0
        )
    rewards = addition_reward(completions, [row["answer"] for row in repeated])
    return sum(rewards) / len(rewards)
