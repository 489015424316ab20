"""Triton backend of the involution op: ``kernels.py`` (device code) and ``launch.py`` (host)."""
