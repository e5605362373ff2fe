"""Attention and selection kernels: FlexAttention (masks and compiled calls), dense attention,
flexwalk's Triton kernels (prefill, decode, selection, residual summaries) and FlashAttention 4."""
