"""RedNet and its convolution twins, their weights, FLOP counting and tools built on them."""

from . import rednet  # registers the models
from ._builder import create_model
from ._registry import list_models
from .convert import load_official_checkpoint
from .flops import count_macs
from .fpn import FPN
from .involutionize import InvolutionizeReport, involutionize
from .weights import load_weights, save_weights

__all__ = [
    "FPN",
    "InvolutionizeReport",
    "count_macs",
    "create_model",
    "involutionize",
    "list_models",
    "load_official_checkpoint",
    "load_weights",
    "rednet",
    "save_weights",
]
