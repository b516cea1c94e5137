"""Loading optimizer state without ``torch.optim``'s dtype cast.

``Optimizer.load_state_dict`` casts every floating state tensor except ``step`` to its param's dtype,
and integer ones too when the param is floating: fp32 moments of a bf16 param would come back bf16,
and int64 tile ids bf16. The optimizers here keep their state in the dtypes they chose, so they
restore it after torch's load, through load hooks (user hooks still run as usual).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["load_state_dict_keeping_dtypes"]


def load_state_dict_keeping_dtypes(
    optimizer: Optimizer,
    load: Callable[[dict[str, Any]], None],
    state_dict: dict[str, Any],
    dtype_of: Callable[[Tensor, str, Tensor], torch.dtype],
    inspect: Callable[[dict[str, Any]], None] | None = None,
    keys: tuple[str, ...] | None = None,
    place: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> None:
    """Run ``load(state_dict)`` (``Optimizer.load_state_dict``), then put back every non-``step``
    state tensor as saved, moved to its param's device, in ``dtype_of(param, key, saved_value)``.
    ``inspect`` sees the incoming dict after every user pre-hook (to warn or validate). ``keys``:
    restore only these (others keep torch's handling). ``place(value, param)`` lays a restored value
    out like its param (e.g. a full tensor as this rank's shard of an FSDP2 param)."""
    saved: dict[str, Any] = {}

    def stash(_: Optimizer, incoming: dict[str, Any]) -> None:
        # Registered last, so it sees the dict after every user pre-hook.
        saved["ids"] = [index for group in incoming["param_groups"] for index in group["params"]]
        saved["state"] = {
            index: {
                key: value
                for key, value in entry.items()
                if key != "step" and isinstance(value, Tensor) and (keys is None or key in keys)
            }
            for index, entry in incoming.get("state", {}).items()
            if isinstance(entry, dict)
        }
        if inspect is not None:
            inspect(incoming)

    def restore(_: Optimizer) -> None:
        # Registered first, so user post-hooks see the restored state.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, param in zip(saved["ids"], params, strict=True):
            for key, value in saved["state"].get(index, {}).items():
                restored = value.to(device=param.device, dtype=dtype_of(param, key, value))
                if place is not None:
                    restored = place(restored, param)
                optimizer.state[param][key] = restored.clone(memory_format=torch.contiguous_format)

    pre_hook = optimizer.register_load_state_dict_pre_hook(stash)
    post_hook = optimizer.register_load_state_dict_post_hook(restore, prepend=True)
    try:
        load(state_dict)
    finally:
        pre_hook.remove()
        post_hook.remove()
