"""List the registered model names, with what each one is.

Any of these names goes to --model of train, eval, bench, visualize and export (and to
``involution.create_model`` in Python). Example:

  involution list-models 'rednet*_cifar'
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of ``involution list-models``."""
    parser.add_argument(
        "pattern",
        nargs="?",
        default="*",
        help="shell-style pattern the names must match, e.g. 'resnet*' (default: all)",
    )


def run(args: argparse.Namespace) -> int:
    """Prints one model per line: its name and the first line of its docstring."""
    from involution.models import list_models
    from involution.models._registry import get_model_entrypoint

    names = list_models(args.pattern)
    if not names:
        print(f"involution list-models: no model name matches {args.pattern!r}", file=sys.stderr)
        return 1
    width = max(map(len, names))
    for name in names:
        doc = (get_model_entrypoint(name).__doc__ or "").strip().splitlines()
        print(f"{name:<{width}}  {doc[0] if doc else ''}".rstrip())
    return 0
