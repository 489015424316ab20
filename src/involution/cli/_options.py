"""Command-line options shared by the tool commands (bench, visualize, export).

Model selection (``--model``, ``--weights``, ``--model-arg``), the device, and the one way these
commands turn an expected failure (bad input) into a message and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import ast
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Exceptions that mean "bad input" (a wrong name, path, shape or value) rather than a bug.
EXPECTED_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, OSError, RuntimeError)


def fail(command: str, error: BaseException) -> int:
    """Prints ``error`` as ``involution <command>: error: ...`` on stderr; returns exit code 2."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f"involution {command}: error: {message}", file=sys.stderr)
    return 2


def add_verbose_argument(
    parser: argparse.ArgumentParser, default: object = argparse.SUPPRESS
) -> None:
    """``-v/--verbose``, on the main parser (``default=False``) and on each subcommand's.

    A subcommand's flag defaults to SUPPRESS, so that it sets ``args.verbose`` only when given
    and never resets a ``-v`` given before the subcommand.
    """
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="log debug messages, and show a traceback on errors",
    )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default=default_device(),
        help="cpu or cuda[:N] (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch (default: PyTorch's choice)",
    )


def setup_device(args: argparse.Namespace) -> torch.device:
    """Checks ``--device`` and applies ``--threads``.

    Raises:
        ValueError: an unknown device, CUDA asked for but absent, or threads < 1.
    """
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"--device ({args.device!r}) must be cpu or cuda[:N]") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device ({args.device!r}) must be cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device ({args.device!r}) needs CUDA, which is not available here")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads ({args.threads}) must be >= 1")
        torch.set_num_threads(args.threads)
    return device


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``["base_width=16", "num_classes=10"]`` -> ``{"base_width": 16, "num_classes": 10}``.

    Values are read as Python literals (ints, floats, booleans, tuples); anything else stays a
    string.

    Raises:
        ValueError: an item without "=".
    """
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-arg ({item!r}) must be KEY=VALUE, e.g. base_width=16")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="registered model name, e.g. rednet26 (`involution list-models` lists them); "
        "optional with --weights, whose file names its model",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        help="weights file written by involution.models.save_weights; loaded strictly",
    )
    parser.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument of the model builder, e.g. base_width=16 or num_classes=10 "
        "(repeatable)",
    )


def build_model(args: argparse.Namespace) -> nn.Module:
    """The model named by ``--model``/``--weights``/``--model-arg``, in eval mode.

    A weights file saved with its model config (``involution.models.save_weights``) names and
    rebuilds its own model (classes, width, involutionized layers); ``--model``, if given, must
    name the same model, and ``--model-arg`` overrides builder arguments of the file's config.
    Other weights files load into ``--model``.

    Raises:
        ValueError: neither --model nor --weights, an unknown model name, or weights that do
            not match the model.
        FileNotFoundError: a missing weights file.
    """
    from involution.models import create_model, load_weights
    from involution.models.weights import read_weights

    kwargs = parse_model_args(args.model_arg)
    if args.model is None and args.weights is None:
        raise ValueError("give --model NAME, or --weights PATH of a saved model")
    if args.weights is not None and not args.weights.is_file():
        raise FileNotFoundError(f"--weights ({args.weights}) is not a file")
    config = None if args.weights is None else read_weights(args.weights)[1]
    if config is None:
        if args.model is None:
            raise ValueError(
                f"--weights ({args.weights}) does not name its model (no model config in the "
                "file); give --model NAME"
            )
        pretrained = None if args.weights is None else str(args.weights)
        return create_model(args.model, pretrained=pretrained, **kwargs).eval()
    if args.model is not None and config["name"] != args.model:
        raise ValueError(
            f"--weights ({args.weights}) holds a {config['name']} model, not --model {args.model}"
        )
    if not kwargs:
        return load_weights(args.weights).eval()
    built: dict[str, Any] = {k: config[k] for k in ("num_classes", "in_chans") if k in config}
    built.update(config.get("kwargs", {}), **kwargs)
    return create_model(config["name"], pretrained=args.weights, **built).eval()


def input_channels(model: nn.Module) -> int:
    """Channels of the images ``model`` takes: those of its first 2D convolution."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError(f"model {type(model).__name__} has no Conv2d to take images")
    return first.in_channels
