"""Triton kernels, installed as ``sparse_rl_optim.kernels`` (never as a top-level ``kernels``
module: transformers and bitsandbytes import that name as the Hugging Face kernels hub package).

* :mod:`.bits` - Triton mirrors of the bf16 bit math of :mod:`sparse_rl_optim.bf16`;
* :mod:`.rlsgd_step` - the fused RLSGD step with per-tile gate counts (multi-tensor launches);
* :mod:`.dense_block_step` - the fused gather -> AdamW / SGD -> scatter step of the dense-block
  optimizers on their active tiles (multi-tensor launches);
* :mod:`.tiles` - count changed tiles, pack active tiles (prefix-sum slots), apply packed tiles;
* :mod:`.launch` - the Python launchers (tables, grids, checks).

Users call them through ``RLSGD(backend=...)``, ``DenseBlockAdamW``/``DenseBlockSGD(backend=...)``
and :mod:`sparse_rl_optim.tiles`. Every kernel is tested bit-exact against its torch reference
(``_single_tensor_rlsgd``, ``_single_tensor_dense_block_adamw``/``_sgd``) in Triton's interpreter.
"""

__all__: list[str] = []
