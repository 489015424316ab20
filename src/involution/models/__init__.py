"""RedNet and its convolution twins, their weights, FLOP counting and tools built on them."""

from . import rednet  # registers the models
from ._builder import create_model
from ._registry import list_models
from .flops import count_macs
from .weights import load_weights, save_weights

__all__ = ["count_macs", "create_model", "list_models", "load_weights", "rednet", "save_weights"]
