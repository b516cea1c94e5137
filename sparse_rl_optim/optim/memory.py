"""What an optimizer holds in memory."""

from __future__ import annotations

from torch import Tensor
from torch.optim import Optimizer

from sparse_rl_optim.distributed import local_tensor

__all__ = ["optimizer_state_bytes"]


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` (moments, momentum buffers, step counters) held
    by this process, measured: ``sum(t.numel() * t.element_size())`` over every state tensor of every
    parameter, counting a ``DTensor`` (FSDP2 state) by its local shard."""
    return sum(
        local_tensor(value).numel() * value.element_size()
        for entry in optimizer.state.values()
        for value in entry.values()
        if isinstance(value, Tensor)
    )
