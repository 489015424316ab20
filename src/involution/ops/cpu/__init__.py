"""CPU backend of the involution op: ``kernels.cpp`` (built by ``build.py``) and ``launch.py`` (host)."""
