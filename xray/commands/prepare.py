"""Decode every image of an NIH-format folder once into an S x S uint8 memory-mapped cache.

Resumable: rerun after a kill and it continues; rerun on a finished cache and it returns at once.
Missing or corrupt images are skipped and listed in bad_images.txt (more than 1 % is an error).
"""

from __future__ import annotations

import argparse

HELP = "build the S x S image cache of an NIH-format folder"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, metavar="DIR", help="NIH-format folder (Data_Entry_2017*.csv, images/)")
    p.add_argument("--size", required=True, type=int, metavar="S", help="image side in pixels, a multiple of 4")
    p.add_argument("--out", metavar="DIR", default=None, help="cache folder (default: ROOT/prepared-S)")
    p.add_argument("--workers", type=int, default=None, metavar="W", help="decoding processes (default: all cores; 0 = none)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def main(args: argparse.Namespace) -> int:
    from xray.cache import prepare, read_manifest

    out = prepare(args.root, args.size, out=args.out, workers=args.workers, progress=args.progress)
    m = read_manifest(out)
    print(f"{out}: {m['n_images']} images at {m['image_size']} px, {len(m['bad_images'])} skipped")
    return 0
