"""Attention: the dispatch between implementations, the kernels (XLA, blocked, cuDNN, Pallas on TPU,
the CPU FlashAttention kernel and its build) and the XLA:CPU options."""
