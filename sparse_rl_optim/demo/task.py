"""The demo's verifiable task, built offline: integer addition with an exact-match reward.

Everything is made locally (no hub access): a character-level tokenizer from ``tokenizers``, a tiny
Llama from a config, prompt sets, and a reward function with the signature TRL expects.

The problems ``a+b=`` with ``0 <= a, b <= max_operand`` are split once, by a fixed permutation of the
unordered pairs ``{a, b}`` (so ``a+b=`` and ``b+a=`` always fall in the same split), into ``train``
(70%: the warm start and the GRPO prompts), ``validation`` (10%: when to stop the warm start) and
``held_out`` (20%: accuracy before and after RL), so held-out accuracy measures problems the model
never trained on, not even in the other order.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Literal

import torch

__all__ = [
    "PROMPT_FORMAT",
    "SPLITS",
    "addition_reward",
    "build_tiny_llama",
    "build_tokenizer",
    "completion_budget",
    "make_prompts",
    "max_completion_tokens",
    "split_pairs",
]

PROMPT_FORMAT = "{a}+{b}="
_CHARACTERS = list("0123456789+=")
_SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
Split = Literal["train", "validation", "held_out"]
#: Share of the unordered pairs ``{a, b}`` in each split, in the order the permuted pairs are dealt out.
SPLITS: dict[str, float] = {"train": 0.7, "validation": 0.1, "held_out": 0.2}
_SPLIT_SEED = 20260  # fixed: every seed and every run sees the same split


def build_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast`` for digits, ``+`` and ``=`` (built locally)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate([*_SPECIAL.values(), *_CHARACTERS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_SPECIAL["unk"]))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=_SPECIAL["pad"],
        bos_token=_SPECIAL["bos"],
        eos_token=_SPECIAL["eos"],
        unk_token=_SPECIAL["unk"],
    )
    tokenizer.padding_side = "left"  # generation appends on the right
    return tokenizer


def build_tiny_llama(
    tokenizer: Any,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
    initializer_range: float | None = None,
) -> Any:
    """A small ``LlamaForCausalLM`` from a config (random init, seeded by the caller).

    ``initializer_range`` (the std of the weight init) defaults to ``hidden_size ** -0.5``: the scale
    that the usual 0.02 has in a 2048- to 4096-wide LLM (0.02 * sqrt(2048) = 0.9). At 0.02 a 128-wide
    model starts 4.4x smaller than that, its per-tensor gradient-to-weight ratios spread 70x instead of
    20x, and plain SGD (one lr for all tensors) learns far more slowly than AdamW (``docs/rl_task.md``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=hidden_size**-0.5 if initializer_range is None else initializer_range,
    )
    model = LlamaForCausalLM(config)
    return model.to(dtype)


def completion_budget(answer_digits: int) -> int:
    """New tokens a completion may have for answers of up to ``answer_digits`` digits: the digits,
    ``</s>`` and one more, so that a completion is only ever cut after it has gone wrong."""
    return answer_digits + 2


def max_completion_tokens(max_operand: int) -> int:
    """:func:`completion_budget` of the largest sum, ``2 * max_operand`` (4 tokens for ``max_operand=49``)."""
    return completion_budget(len(str(2 * max_operand)))


@lru_cache(maxsize=8)
def split_pairs(max_operand: int) -> Mapping[str, tuple[tuple[int, int], ...]]:
    """All ``(a, b)`` pairs with operands in ``[0, max_operand]``, dealt into the :data:`SPLITS` by
    unordered pair (``(a, b)`` and ``(b, a)`` together); read-only."""
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    unordered = [(a, b) for a in range(max_operand + 1) for b in range(a, max_operand + 1)]
    random.Random(_SPLIT_SEED).shuffle(unordered)
    result, start = {}, 0
    for index, (name, share) in enumerate(SPLITS.items()):
        stop = len(unordered) if index == len(SPLITS) - 1 else start + round(share * len(unordered))
        dealt = unordered[start:stop]
        both_orders = dealt + [(b, a) for a, b in dealt if a != b]
        if not both_orders:
            raise ValueError(f"max_operand={max_operand} leaves the {name} split empty: use max_operand >= 2")
        result[name] = tuple(sorted(both_orders))
        start = stop
    return MappingProxyType(result)


def _row(a: int, b: int) -> dict[str, str]:
    return {"prompt": PROMPT_FORMAT.format(a=a, b=b), "answer": str(a + b)}


def make_prompts(
    count: int | None, *, max_operand: int, seed: int | str, split: Split | None = None
) -> list[dict[str, str]]:
    """Rows ``{"prompt": "a+b=", "answer": "a+b"}``.

    ``split=None``: ``count`` pairs drawn with replacement from all operands in ``[0, max_operand]``.
    ``split="train"|"validation"|"held_out"``: drawn from that split only; ``count=None`` gives every
    pair of the split once, in a seeded order. ``seed`` may be a string (``"grpo:3"``): each use
    of the prompts draws from its own stream.
    """
    rng = random.Random(seed)
    if split is None:
        if count is None:
            raise ValueError("make_prompts(count=None) needs a split")
        return [_row(rng.randint(0, max_operand), rng.randint(0, max_operand)) for _ in range(count)]
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)} or None, got {split!r}")
    pairs = split_pairs(max_operand)[split]
    if count is None:
        order = list(pairs)
        rng.shuffle(order)
        return [_row(a, b) for a, b in order]
    return [_row(*rng.choice(pairs)) for _ in range(count)]


def addition_reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """Exact-match reward: 1.0 if the completion, stripped of spaces and the end token, is the sum."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        text = completion.replace(_SPECIAL["eos"], "").replace(_SPECIAL["pad"], "").replace(" ", "").strip()
        rewards.append(1.0 if text == expected else 0.0)
    return rewards
