"""The demo's verifiable task, built offline: integer addition with an exact-match reward.

Everything is made locally (no hub access): a character-level tokenizer from ``tokenizers``, a tiny
Llama from a config, a prompt dataset, and a reward function with the signature TRL expects.
"""

from __future__ import annotations

import random
from typing import Any

import torch

__all__ = [
    "PROMPT_FORMAT",
    "addition_reward",
    "build_tiny_llama",
    "build_tokenizer",
    "make_prompts",
]

PROMPT_FORMAT = "{a}+{b}="
_CHARACTERS = list("0123456789+=")
_SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


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
    tokenizer: Any, *, hidden_size: int = 64, layers: int = 2, dtype: torch.dtype = torch.float32
) -> Any:
    """A small ``LlamaForCausalLM`` from a config (random init, seeded by the caller)."""
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
    )
    model = LlamaForCausalLM(config)
    return model.to(dtype)


def make_prompts(count: int, *, max_operand: int, seed: int) -> list[dict[str, str]]:
    """``count`` rows ``{"prompt": "a+b=", "answer": "a+b"}`` with operands in ``[0, max_operand]``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"prompt": PROMPT_FORMAT.format(a=a, b=b), "answer": str(a + b)})
    return rows


def addition_reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """Exact-match reward: 1.0 if the completion, stripped of spaces and the end token, is the sum."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        text = completion.replace(_SPECIAL["eos"], "").replace(_SPECIAL["pad"], "").replace(" ", "").strip()
        rewards.append(1.0 if text == expected else 0.0)
    return rewards
