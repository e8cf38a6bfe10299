"""Console scripts as a table of subcommands, one module each.

Each command module defines ``HELP`` (one line), ``configure(parser)`` (adds its flags) and
``main(args) -> int | None``. Bad input raises :class:`xray.errors.UserError`, which the wrapper
prints as one line with exit status 2; argparse's own complaints (unknown flag, missing
argument, bad choice) are printed the same way.

Shared flag pieces live here so every command words them alike: :func:`add_device_arg` /
:data:`DEVICE_HELP` (the one ``--device``), :func:`comma_list` (every list flag is
comma-separated), :func:`finite_float` (every float flag: finite and in range, checked by the
parser), :func:`set_help` (reword a flag a shared helper added, e.g. a default that a model
decides).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

from . import __version__
from .errors import UserError, cli_entry

DEFAULT_DEVICE = "auto"
DEVICE_HELP = ("where to compute: auto (the first CUDA GPU when there is one, else the CPU; under torchrun "
               "the process's own GPU), cpu, cuda or cuda:N (default: %s)" % DEFAULT_DEVICE)
VERBOSE_HELP = "debug logging (accepted before or after the command)"
MAX_TEMPERATURE = 100.0  # IPA sampling temperatures above this only draw noise (and overflow to NaN)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <prog>: <what>; see <prog> --help``, exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        msg = " ".join(str(message).split())
        print(f"error: {self.prog}: {msg}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The commands' help layout: descriptions as written; a comma-separated list flag (metavar
    ``LIST``, which also takes space-separated words) shows as ``--flag LIST``, not ``LIST [LIST ...]``."""

    def _format_args(self, action, default_metavar):
        if action.metavar == "LIST" and action.nargs in ("+", "*"):
            return "LIST"
        return super()._format_args(action, default_metavar)


def make_main(prog: str, description: str, commands: Mapping[str, str]) -> Callable[..., int]:
    """Build a console-script ``main(argv=None)`` from ``{command name: module path}``."""

    @cli_entry
    def main(argv: list[str] | None = None) -> int | None:
        parser = build_parser(prog, description, commands)
        args, extra = parser.parse_known_args(argv)
        if extra:  # name the command whose --help lists the valid flags
            ArgumentParser(prog=f"{prog} {args.command}").error(f"unrecognized arguments: {' '.join(extra)}")
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        before = warnings.formatwarning
        if not args.verbose:  # a user reads one line per warning; -v keeps Python's file:line and source
            warnings.formatwarning = format_warning_line
        try:
            return args._main(args)
        finally:
            warnings.formatwarning = before

    main.commands = dict(commands)
    main.prog = prog
    main.build_parser = lambda: build_parser(prog, description, commands)
    return main


def format_warning_line(message, category, filename, lineno, line=None) -> str:
    """``warnings.formatwarning`` for console scripts: ``warning: <message>`` on one line (no file,
    line number or source line; ``-v`` shows them). Only the text changes: filters and
    ``catch_warnings(record=True)`` work as before."""
    return "warning: " + " ".join(str(message).split()) + "\n"


def build_parser(prog: str, description: str, commands: Mapping[str, str]) -> argparse.ArgumentParser:
    """The console script's parser: ``-v`` plus one subparser per command (also with ``-v``)."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}",
                        help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, path in commands.items():
        mod = importlib.import_module(path)
        p = sub.add_parser(name, help=mod.HELP, description=(mod.__doc__ or mod.HELP).strip(),
                           formatter_class=HelpFormatter)
        # SUPPRESS: without -v here the value given before the command (or False) stays
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        mod.configure(p)
        p.set_defaults(_main=mod.main)
    return parser


def run_command(module: str, argv: Sequence) -> None:
    """Run one command module (``configure``/``main``) in-process with its own parser, exactly as
    the console script would; a non-zero status is a UserError."""
    mod = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog=module)
    mod.configure(parser)
    code = mod.main(parser.parse_args([str(a) for a in argv]))
    if code:
        raise UserError(f"command {module} exited with status {code}")


def add_device_arg(parser, **kwargs) -> argparse.Action:
    """The one ``--device`` flag (default ``auto``); read it with :func:`parse_device`."""
    return parser.add_argument("--device", default=DEFAULT_DEVICE, metavar="DEVICE", help=DEVICE_HELP, **kwargs)


def set_help(parser: argparse.ArgumentParser, option: str, help: str, **changes) -> argparse.Action:
    """Reword the help of a flag that a shared helper added (and change e.g. its ``default``)."""
    action = parser._option_string_actions[option]
    action.help = help
    for k, v in changes.items():
        setattr(action, k, v)
        if k == "default":
            parser.set_defaults(**{action.dest: v})
    return action


def finite_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
                 none: bool = False) -> Callable[[str], float | None]:
    """An argparse ``type`` for a float flag: finite (``nan``/``inf`` refused) and within ``[lo, hi]``
    (``lo_open``/``hi_open``: the bound itself excluded; ``None``: no bound). ``none=True`` also
    accepts ``none``/``off`` as ``None``. A bad value is argparse's one-line error naming the flag,
    the value and the range, before the command runs (so before any file is made)::

        p.add_argument("--temperature", type=finite_float(0, lo_open=True), default=1.0)
    """
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    expected = "a finite number" + (" " + " and ".join(parts) if parts else "") + (", or 'none'" if none else "")

    def parse(text: str) -> float | None:
        if none and str(text).strip().lower() in ("none", "off"):
            return None
        try:
            v = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected {expected}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not finite; expected {expected}")
        if lo is not None and (v < lo or lo_open and v == lo) or hi is not None and (v > hi or hi_open and v == hi):
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected {expected}")
        return v

    parse.__name__ = "number"
    parse.expected = expected
    return parse


def check_output(path: str | os.PathLike, flag: str = "--out", kind: str = "folder",
                 suffixes: tuple[str, ...] = ()) -> Path:
    """Check, before anything is computed or made, that ``path`` can become an output ``kind``
    ("folder" or "file", with one of ``suffixes`` when given): not a file where a folder is
    wanted (or the reverse), no file among its parents, and the nearest existing folder writable.
    One-line :class:`UserError` naming ``flag`` otherwise; creates nothing. Returns the path."""
    p = Path(path).expanduser()
    for a in [p, *p.parents]:  # a symlink loop or a dangling link would fail at the first mkdir or rename
        if a.is_symlink() and not a.exists():
            raise UserError(f"{flag} {p}: {a} is a symbolic link that leads nowhere (a loop or a missing target, "
                            f"{os.readlink(a)!r}); remove the link or choose another path")
    if kind == "file":
        if p.is_dir():
            example = p / f"out{suffixes[0] if suffixes else ''}"
            raise UserError(f"{flag} {p} is a folder; expected a file path such as {example}")
        if suffixes and p.suffix.lower() not in suffixes:
            raise UserError(f"{flag} {p} ends in {p.suffix or 'no suffix'!r}; expected a {' or '.join(suffixes)} file "
                            f"(e.g. {p.with_suffix(suffixes[0])})")
    elif p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is a file; expected a folder (a new or existing one)")
    for a in ([p] if kind == "folder" else []) + [p.parent, *p.parent.parents]:
        if not a.exists():
            continue
        if not a.is_dir():
            raise UserError(f"{flag} {p}: {a} is a file, not a folder; choose a path whose parents are folders")
        if not os.access(a, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {p}: cannot write in {a} (permission denied); choose a writable place")
        break
    return p


def comma_list(values: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"a,b, c"`` (or ``["a,b", "c"]``, what ``nargs="+"`` gives) -> ``["a", "b", "c"]``."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [part.strip() for v in values for part in str(v).split(",") if part.strip()]


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``--shard I/N`` -> ``(I, N)`` with 0 <= I < N; None -> (0, 1), the whole job."""
    if spec is None:
        return 0, 1
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like I/N (e.g. 0/4), got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard {spec}: need 0 <= I < N, got I={i}, N={n}")
    return i, n


def parse_device(spec: str | None, local_rank: int | None = None):
    """``--device`` -> ``torch.device``; the one parser every command uses.

    ``None`` or ``"auto"``: CUDA (GPU ``local_rank``; default: torchrun's ``LOCAL_RANK``, else 0)
    when available, else the CPU.
    ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``: as given, after checking that it exists here.
    Anything else, or a device this machine lacks: one-line :class:`UserError`.
    """
    import torch  # here, not at the top: +2.7 s on `xray --help` (measured), which never needs torch

    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)  # torchrun's process index on this machine
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


def format_default(value) -> str:
    """How help texts write a default: ``None`` -> ``none``, booleans -> ``on``/``off``, floats with ``%g``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


# The training flags of ``ipa_core.trainer.add_train_args``: option -> (TrainConfig field, plain words).
TRAIN_FLAGS: dict[str, tuple[str, str]] = {
    "--steps": ("steps", "total optimiser steps"),
    "--batch-size": ("batch_size", "images per step per process (torchrun with K processes trains on K times as many)"),
    "--lr": ("lr", "peak learning rate (AdamW)"),
    "--warmup": ("warmup", "steps of linear learning-rate warmup"),
    "--weight-decay": ("weight_decay", "AdamW weight decay"),
    "--ema-rate": ("ema_rate", "rate of the moving average of the weights that is saved as the model, or 'none' to save the raw weights"),
    "--grad-clip": ("grad_clip", "clip the gradient norm at this value, or 'none'"),
    "--skip-threshold": ("skip_threshold", "skip an update whose gradient norm exceeds this (VD-VAE's guard against loss spikes), or 'none' to never skip"),
    "--log-every": ("log_every", "steps between rows of metrics.jsonl"),
    "--sample-every": ("sample_every", "steps between sample grids in samples/"),
    "--ckpt-every": ("ckpt_every", "steps between checkpoints (a rerun resumes from the last one)"),
    "--seed": ("seed", "random seed of the initial weights, the batches and the masks"),
    "--num-workers": ("num_workers", "data loading processes, 0 = load in the training process"),
    "--amp": ("amp", "bfloat16 mixed precision (CUDA only)"),
    "--channels-last": ("channels_last", "channels-last memory layout (faster convolutions on recent GPUs)"),
}


def describe_train_flags(parser: argparse.ArgumentParser, stages: Mapping[str, object], note: str = "") -> None:
    """Reword the training flags' help with their defaults taken from ``stages`` (``{stage name:
    TrainConfig}``), and word ``--device`` as the shared one (None = auto; read it with :func:`device_flag`).

    One stage: the parser default becomes that value, so ``--help`` shows exactly what runs. Several
    stages (``ipa_core train``): each stage's value is listed (``note`` says what they depend on)
    and the parser default stays ``None`` = "the stage's own".
    """
    for option, (field, text) in TRAIN_FLAGS.items():
        if option not in parser._option_string_actions:
            continue
        values = {stage: getattr(cfg, field) for stage, cfg in stages.items()}
        same = len(set(map(repr, values.values()))) == 1
        if field in ("amp", "channels_last") and same:  # on/off flags: None = not given = the config's
            set_help(parser, option, f"{text} (default: {format_default(bool(next(iter(values.values()))))})")
        elif len(values) == 1:
            (value,) = values.values()
            set_help(parser, option, f"{text} (default: {format_default(value)})", default=value)
        else:
            if same:
                said = format_default(next(iter(values.values())))
            else:
                said = " and ".join(f"{format_default(v)} in the {stage} stage" for stage, v in values.items())
            set_help(parser, option, f"{text} (default: {said}{note})")
    if "--device" in parser._option_string_actions:
        # the default stays None (= auto for parse_device) so that TrainConfig keeps its own until
        # the command resolves the flag with device_flag()
        set_help(parser, "--device", DEVICE_HELP, metavar="DEVICE")


def device_flag(spec: str | None) -> str:
    """``--device`` checked with :func:`parse_device` and written out (``auto`` -> ``cuda:0``/``cpu``),
    for code that takes the device as a string (``TrainConfig.device``)."""
    return str(parse_device(spec))
