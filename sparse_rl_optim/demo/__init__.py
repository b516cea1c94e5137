"""The offline GRPO demo: ``python -m sparse_rl_optim.demo``."""
