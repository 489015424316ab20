"""involution: fast, memory-light involution for PyTorch (Li et al., CVPR 2021)."""

from . import functional
from .functional import (
    fused_involution1d,
    fused_involution2d,
    fused_involution3d,
    involution1d,
    involution2d,
    involution3d,
)
from .models import create_model, list_models
from .nn import Involution, Involution1d, Involution2d, Involution3d, convert_official_state_dict

__all__ = [
    "Involution",
    "Involution1d",
    "Involution2d",
    "Involution3d",
    "convert_official_state_dict",
    "create_model",
    "functional",
    "fused_involution1d",
    "fused_involution2d",
    "fused_involution3d",
    "involution1d",
    "involution2d",
    "involution3d",
    "list_models",
]
__version__ = "0.1.0"
