"""Generate a synthetic chest x-ray set in the exact NIH on-disk format (CSV, images/, split lists).

The result works everywhere a real NIH folder does: `xray prepare --root DIR --size S`.
"""

from __future__ import annotations

import argparse

from xray import phantom
from xray.cli_base import check_output
from xray.errors import UserError

HELP = "generate a synthetic NIH-format phantom set"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--n", required=True, type=int, metavar="N", help="number of images")
    p.add_argument("--size", required=True, type=int, metavar="S", help="image side in pixels, a multiple of 4 (e.g. 64, 128, 256)")
    p.add_argument("--seed", required=True, type=int, metavar="K", help="random seed; the same seed gives the same set")
    p.add_argument("--workers", type=int, default=None, metavar="W", help="processes (default: all cores)")
    shares = ", ".join(f"{k.lower()} {v:.0%}" for k, v in phantom.DEMO_PREVALENCE.items()).replace("%", "%%")
    p.add_argument("--demo-prevalence", action="store_true",
                   help=f"set the share of images with these findings ({shares}) so that small sets have enough "
                        "positives, instead of NIH's own frequencies (default: off)")
    p.add_argument("--difficulty", choices=tuple(phantom.PRESETS), default=phantom.DEFAULT_DIFFICULTY,
                   help="how hard the films are: realistic = the pose spread of real lung masks, subtler findings, "
                        "look-alike normal variants, more grain; hard = beyond that in every direction "
                        f"(see xray/phantom/difficulty.py); default = the default phantom (default: {phantom.DEFAULT_DIFFICULTY})")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def main(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise UserError(f"--n is {args.n}; expected at least 1 image")
    if args.size < 4 or args.size % 4:
        raise UserError(f"--size is {args.size}; expected a positive multiple of 4 (e.g. 64, 128, 256)")
    check_output(args.out, "--out", "folder")
    prevalence = phantom.DEMO_PREVALENCE if args.demo_prevalence else None
    out = phantom.generate(args.out, n=args.n, size=args.size, seed=args.seed, workers=args.workers,
                           prevalence=prevalence, progress=args.progress, difficulty=args.difficulty)
    print(f"{out}: {args.n} phantom images at {args.size} px (seed {args.seed}, difficulty {args.difficulty})")
    return 0
