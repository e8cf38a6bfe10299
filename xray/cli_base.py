"""Console scripts as a table of subcommands, one module each.

Each command module defines ``HELP`` (one line), ``configure(parser)`` (adds its flags) and
``main(args) -> int | None``. Bad input raises :class:`xray.errors.UserError`, which the wrapper
prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from typing import Callable, Mapping

from .errors import cli_entry


def make_main(prog: str, description: str, commands: Mapping[str, str]) -> Callable[..., int]:
    """Build a console-script ``main(argv=None)`` from ``{command name: module path}``."""

    @cli_entry
    def main(argv: list[str] | None = None) -> int | None:
        parser = argparse.ArgumentParser(prog=prog, description=description)
        parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        for name, path in commands.items():
            mod = importlib.import_module(path)
            p = sub.add_parser(name, help=mod.HELP, description=(mod.__doc__ or mod.HELP).strip(),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            mod.configure(p)
            p.set_defaults(_main=mod.main)
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return args._main(args)

    return main
