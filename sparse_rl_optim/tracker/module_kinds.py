"""Group parameter names by module kind and layer, for per-kind gate statistics."""

from __future__ import annotations

import re

__all__ = ["MODULE_KINDS", "layer_index", "module_kind"]

#: Kinds in plotting order. Matched on the parameter name, first match wins (MLP before
#: ``attn_o`` because GPT-2 style models call both output projections ``c_proj``).
MODULE_KINDS = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp", "embed", "norm", "lm_head", "other")

_KIND_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("lm_head", re.compile(r"(^|\.)(lm_head|output_layer|embed_out)(\.|$)")),
    ("norm", re.compile(r"(norm|ln_\w+|ln\d*|layernorm)(\.|$)", re.IGNORECASE)),
    ("attn_q", re.compile(r"(^|\.)(q_proj|query|wq|q)(\.|$)")),
    ("attn_k", re.compile(r"(^|\.)(k_proj|key|wk|k)(\.|$)")),
    ("attn_v", re.compile(r"(^|\.)(v_proj|value|wv|v)(\.|$)")),
    ("attn_q", re.compile(r"(^|\.)(qkv_proj|query_key_value|c_attn|Wqkv)(\.|$)")),
    ("mlp", re.compile(r"(^|\.)(mlp|feed_forward|ffn|gate_proj|up_proj|down_proj|fc\d|w\d|experts)(\.|$)")),
    ("attn_o", re.compile(r"(^|\.)(o_proj|out_proj|wo|dense|c_proj)(\.|$)")),
    ("embed", re.compile(r"(embed|wte|wpe|embeddings)", re.IGNORECASE)),
)
_LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def module_kind(name: str) -> str:
    """The kind of a parameter from its name, one of :data:`MODULE_KINDS`.

    ``model.layers.3.self_attn.q_proj.weight`` -> ``"attn_q"``; fused ``qkv`` projections count as
    ``attn_q``; anything unmatched is ``"other"``.
    """
    for kind, pattern in _KIND_PATTERNS:
        if pattern.search(name):
            return kind
    return "other"


def layer_index(name: str) -> int | None:
    """The transformer layer index in a parameter name (``...layers.3...`` -> 3), or None."""
    match = _LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None
