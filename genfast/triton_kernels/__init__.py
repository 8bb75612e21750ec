"""Triton kernels. Imported lazily: genfast works without triton installed."""
