"""Entry point of the ``involution`` console script and of ``python -m involution``.

Every public module of this package (a name not starting with "_") is a subcommand named after
it (``list_models`` is ``list-models``). Such a module has a docstring (its first line is the
subcommand's help), an ``add_arguments(parser)`` function and a ``run(args) -> int`` function
returning the exit code. ``-v`` is accepted before or after the subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

import involution
from involution import cli
from involution.cli._options import add_verbose_argument


def _subcommands() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(cli.__path__) if not m.name.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="involution",
        description="Involution (Li et al., CVPR 2021): demo, training, evaluation and tools.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {involution.__version__}")
    add_verbose_argument(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _subcommands():
        module = importlib.import_module(f"involution.cli.{name}")
        doc = (module.__doc__ or name).strip()
        p = sub.add_parser(
            name.replace("_", "-"),
            help=doc.splitlines()[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_verbose_argument(p)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
