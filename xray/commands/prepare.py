"""Decode every image of an NIH-format folder once into an S x S uint8 memory-mapped cache.

The cache goes to ROOT/prepared-S, which is where every `--data-root ROOT --image-size S` command
looks (with --cache-dir C: C/prepared/<hash of ROOT>-S, as with those commands' --cache-dir).
Resumable: rerun after a kill and it continues; rerun on an up-to-date cache and it returns at
once; rerun after the folder changed (images added or replaced, labels edited) and it brings the
cache up to date, reusing unchanged images. Missing or corrupt images are skipped and listed in
bad_images.txt (more than 1 % is an error); with --present-only, images the CSV lists but that
are not on disk (a partial download) are left out and counted instead. Every run checks the
cache's own files (sizes, labels.csv's SHA-256, a few random chunks of pixels and source files) and
repairs what is damaged; --verify checks every chunk and every source file's bytes.

A ChestMNIST folder (MedMNIST's chestmnist_S.npz, no NIH label CSV) or the .npz itself is prepared
as `--data chestmnist --data-root ROOT` reads it: ROOT/prepared-chestmnist-S (or under --cache-dir).
"""

from __future__ import annotations

import argparse

from xray.errors import UserError

HELP = "build the S x S image cache of an NIH-format folder"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, metavar="DIR", help="NIH-format folder (Data_Entry_2017*.csv, images/), or a ChestMNIST .npz or its folder")
    p.add_argument("--size", required=True, type=int, metavar="S", help="image side in pixels, a multiple of 4")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--out", metavar="DIR", default=None,
                   help="write the cache to this exact folder; --data-root commands do not look there, so prefer "
                        "the default or --cache-dir (default: none: ROOT/prepared-S)")
    g.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="as the other commands' --cache-dir: write CACHE_DIR/prepared/<hash of ROOT>-S (default: none)")
    p.add_argument("--present-only", action="store_true", default=None,
                   help="cache the listed images that are present, count the absent ones (a partial download); "
                        "without it, an existing cache keeps the mode it was prepared with")
    p.add_argument("--workers", type=int, default=None, metavar="W", help="decoding processes (default: all cores; 0 = none)")
    p.add_argument("--verify", action="store_true",
                   help="check every byte: each chunk of the cache's images against its digest and each source image "
                        "file against the SHA-256 recorded when it was cached (a file swapped with its size and mtime "
                        "kept); what differs is decoded again. Every open checks a few random ones")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def summary_line(out) -> str:
    from xray.cache import read_manifest  # here, not at the top: pandas, +0.5 s on `xray --help` (measured)

    m = read_manifest(out)
    line = f"{out}: {m['n_images']} images at {m['image_size']} px, {len(m['bad_images'])} skipped"
    if m.get("present_only"):
        listed = m.get("source", {}).get("listed", m["n_rows"])
        line += f", {m.get('n_absent', 0)} of {listed} listed images absent (--present-only)"
    if m.get("n_unlisted"):
        line += (f", {m['n_unlisted']} image files on disk not listed in {m['csv']} and left out "
                 f"(e.g. {m['unlisted_examples'][0]})")
    return line


def main(args: argparse.Namespace) -> int:
    # here, not at the top: pandas, +0.5 s on `xray --help` (measured)
    from xray.cache import cache_location, prepare
    from xray.chestmnist import holds_chestmnist
    from xray.chestmnist import prepare as prepare_chestmnist

    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers is {args.workers}; expected 0 (decode in this process) or more")
    if holds_chestmnist(args.root):
        if args.out is not None or args.present_only:
            raise UserError(f"{args.root} holds ChestMNIST: its cache goes where --data chestmnist looks; drop "
                            f"{'--out (use --cache-dir to keep it elsewhere)' if args.out is not None else '--present-only (it is one complete file)'}")
        out = prepare_chestmnist(args.root, args.size, cache_dir=args.cache_dir, progress=args.progress)
        print(summary_line(out))
        return 0
    out = args.out if args.out is not None else cache_location(args.root, args.size, args.cache_dir)
    out = prepare(args.root, args.size, out=out, workers=args.workers, progress=args.progress, present_only=args.present_only,
                  verify=args.verify)
    print(summary_line(out))
    return 0
