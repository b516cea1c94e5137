"""Integrations with training frameworks (``sparse_rl_optim.integrations.trl``)."""
