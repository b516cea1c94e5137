"""Parameter sets for the benchmarks: the real layer shapes of open LLMs, written as shape lists (no download).

Models (numbers from their published ``config.json``):

==============  ======  ======  =====  ========  ============  ======  ====  ==================
model           hidden  layers  heads  KV heads  intermediate  vocab   tied  parameters
==============  ======  ======  =====  ========  ============  ======  ====  ==================
qwen2.5-0.5b    896     24      14     2         4864          151936  yes   494,032,768
qwen2.5-1.5b    1536    28      12     2         8960          151936  yes   1,543,714,304
qwen2.5-7b      3584    28      28     4         18944         152064  no    7,615,616,512
==============  ======  ======  =====  ========  ============  ======  ====  ==================

Tensors, in model order: ``embed_tokens`` [vocab, hidden]; per layer ``input_layernorm`` [hidden],
``q_proj`` [heads*head_dim, hidden] + bias, ``k_proj`` and ``v_proj`` [kv_heads*head_dim, hidden] + bias
(grouped-query attention; Qwen2 has biases on q, k, v only), ``o_proj`` [hidden, heads*head_dim],
``post_attention_layernorm`` [hidden], ``gate_proj`` and ``up_proj`` [intermediate, hidden], ``down_proj``
[hidden, intermediate]; the final ``norm`` [hidden]; ``lm_head`` [vocab, hidden] when not tied.

Set names: ``<model>[-attn][-<N>layer(s)][-vocab<V>[k]]``

* ``-<N>layers``: only the first N decoder layers (default: all);
* ``-vocab<V>``: embedding (and untied lm_head) truncated to V rows (``k`` = x1024; ``vocab0``: none);
* ``-attn``: attention blocks only (input norm, q, k, v, o), no MLP.

The sets used by default (see :data:`CPU_DEFAULT_SETS`, :data:`GPU_DEFAULT_SETS`):

* ``qwen2.5-0.5b-attn-1layer-vocab0``: 1,837,952 params (~1.8M; one attention block + final norm);
* ``qwen2.5-0.5b-attn-3layers-vocab0``: 5,512,064 params (~5.5M);
* ``qwen2.5-0.5b-1layer-vocab4k``: 18,583,296 params (~19M; one full layer + a 4096-row embedding);
* ``qwen2.5-0.5b``: the whole model, 494M; ``qwen2.5-1.5b``: 1.54B (GPU);
* ``qwen2.5-7b-4layers``: 2.02B (GPU; the whole 7B needs ``--optimizers`` to pick a few: all the
  optimizers' states are held at once).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod


@dataclass(frozen=True)
class ModelConfig:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool


MODELS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": ModelConfig(896, 24, 14, 2, 4864, 151936, tied=True),
    "qwen2.5-1.5b": ModelConfig(1536, 28, 12, 2, 8960, 151936, tied=True),
    "qwen2.5-7b": ModelConfig(3584, 28, 28, 4, 18944, 152064, tied=False),
}

# Published parameter counts of the full models (checked in tests/test_bench_suite.py).
FULL_PARAMS = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512}

CPU_DEFAULT_SETS = (
    "qwen2.5-0.5b-attn-1layer-vocab0",
    "qwen2.5-0.5b-attn-3layers-vocab0",
    "qwen2.5-0.5b-1layer-vocab4k",
)
GPU_DEFAULT_SETS = (*CPU_DEFAULT_SETS, "qwen2.5-0.5b", "qwen2.5-1.5b")
QUICK_SETS = ("qwen2.5-0.5b-attn-1layer-vocab0",)

_NAME = re.compile(
    r"^(?P<model>qwen2\.5-(?:0\.5|1\.5|7)b)(?P<attn>-attn)?(?:-(?P<layers>\d+)layers?)?(?:-vocab(?P<vocab>\d+)(?P<k>k)?)?$"
)


def model_shapes(
    model: str, layers: int | None = None, vocab: int | None = None, attention_only: bool = False
) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every parameter tensor of ``model`` (first ``layers`` layers, ``vocab`` rows)."""
    config = MODELS[model]
    layers = config.layers if layers is None else layers
    vocab = config.vocab if vocab is None else vocab
    hidden, head_dim = config.hidden, config.hidden // config.heads
    q_dim, kv_dim = config.heads * head_dim, config.kv_heads * head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = []
    if vocab:
        shapes.append(("model.embed_tokens.weight", (vocab, hidden)))
    for index in range(layers):
        prefix = f"model.layers.{index}."
        shapes += [
            (prefix + "input_layernorm.weight", (hidden,)),
            (prefix + "self_attn.q_proj.weight", (q_dim, hidden)),
            (prefix + "self_attn.q_proj.bias", (q_dim,)),
            (prefix + "self_attn.k_proj.weight", (kv_dim, hidden)),
            (prefix + "self_attn.k_proj.bias", (kv_dim,)),
            (prefix + "self_attn.v_proj.weight", (kv_dim, hidden)),
            (prefix + "self_attn.v_proj.bias", (kv_dim,)),
            (prefix + "self_attn.o_proj.weight", (hidden, q_dim)),
        ]
        if not attention_only:
            shapes += [
                (prefix + "post_attention_layernorm.weight", (hidden,)),
                (prefix + "mlp.gate_proj.weight", (config.intermediate, hidden)),
                (prefix + "mlp.up_proj.weight", (config.intermediate, hidden)),
                (prefix + "mlp.down_proj.weight", (hidden, config.intermediate)),
            ]
    shapes.append(("model.norm.weight", (hidden,)))
    if vocab and not config.tied:
        shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def set_shapes(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """The shape list of a set name (see the module docstring for the grammar)."""
    match = _NAME.match(name)
    if match is None:
        raise ValueError(f"unknown parameter set {name!r}: expected <model>[-attn][-<N>layers][-vocab<V>[k]]")
    layers = int(match["layers"]) if match["layers"] else None
    vocab = int(match["vocab"]) * (1024 if match["k"] else 1) if match["vocab"] else None
    return model_shapes(match["model"], layers=layers, vocab=vocab, attention_only=bool(match["attn"]))


def count_params(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    return sum(prod(shape) for _, shape in shapes)


if __name__ == "__main__":
    for set_name in (*GPU_DEFAULT_SETS, "qwen2.5-7b-4layers", *MODELS):
        print(f"{set_name:36s} {count_params(set_shapes(set_name)):>15,d}")
