"""Triton kernels, installed as ``sparse_rl_optim.kernels`` (never as a top-level ``kernels``
module: transformers and bitsandbytes import that name as the Hugging Face kernels hub package).

The fused step, compaction and apply kernels arrive with the Triton issue; the torch reference they
must match bit for bit is :func:`sparse_rl_optim.optim.sgd._single_tensor_rlsgd`.
"""

__all__: list[str] = []
