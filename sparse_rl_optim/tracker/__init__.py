"""Which weights an optimizer step changed, exactly, and why not: :class:`PrecisionGateTracker`."""

from sparse_rl_optim.tracker.module_kinds import MODULE_KINDS, layer_index, module_kind
from sparse_rl_optim.tracker.tracker import PrecisionGateTracker, unwrap_optimizer

__all__ = ["MODULE_KINDS", "PrecisionGateTracker", "layer_index", "module_kind", "unwrap_optimizer"]
