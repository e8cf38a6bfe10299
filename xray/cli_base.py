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


def parse_device(spec: str | None, local_rank: int | None = None):
    """``--device`` -> ``torch.device``; the one parser every command uses.

    ``None`` or ``"auto"``: CUDA (GPU ``local_rank``, default 0) when available, else the CPU.
    ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``: as given, after checking that it exists here.
    Anything else, or a device this machine lacks: one-line :class:`UserError`.
    """
    import torch

    from .errors import UserError

    if spec is None or str(spec).strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", (local_rank or 0) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(str(spec).strip())
    except (RuntimeError, ValueError):
        raise UserError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"--device {spec}: CUDA is not available on this machine; use --device cpu (or auto)")
        index = dev.index if dev.index is not None else (local_rank or 0) % n
        if index >= n:
            raise UserError(f"--device {spec}: this machine has {n} CUDA device(s) (0..{n - 1}); pick one of them")
        return torch.device("cuda", index)
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {spec}: MPS is not available on this machine; use --device cpu (or auto)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {spec!r}: unsupported device type {dev.type!r}; use auto, cpu, cuda or cuda:N")
    return dev
