"""Triton kernels of spdy-gpu (installed under the import name `spdy_kernels`)."""
