"""Plugins: Triton kernels for the associative-memory ops (and, on top of them, engine plugins)."""
