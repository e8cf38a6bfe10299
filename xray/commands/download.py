"""Download the NIH ChestX-ray14 release (12 archives, about 45 GB) into an NIH-format folder.

Parts come from the NIH's published static links (or --mirror URL_PREFIX serving
images_01.tar.gz ... images_12.tar.gz), --jobs at a time, with HTTP Range resume: a dropped or
killed download continues where it stopped. Each archive is verified (gzip and tar integrity,
member names and count) while it is unpacked into a hidden folder, which then becomes
DIR/images_0NN/images/ in one rename; a corrupt part is reported and fetched again. Rerunning skips
finished parts. The label CSV and bounding boxes come from torchxrayvision's copies unless the
mirror has them; the official split lists from the mirror, else the toolkit's split by patient.
Ends with the `xray info` summary. Then: `xray prepare --root DIR --size 64 [--present-only]`.
"""

from __future__ import annotations

import argparse

from xray.cli_base import finite_float
from xray.commands.info import summarise
from xray.download import DEFAULT_JOBS, DEFAULT_PARTS, DEFAULT_RETRIES, DEFAULT_TIMEOUT, download
from xray.errors import UserError

HELP = "download the NIH ChestX-ray14 images and metadata (resumable, verified)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="NIH-format folder to fill (new or an earlier download)")
    p.add_argument("--parts", default=DEFAULT_PARTS, metavar="SPEC",
                   help=f"which of the 12 archives, e.g. 1-3 or 1,3,5 (default: {DEFAULT_PARTS})")
    p.add_argument("--jobs", type=int, default=DEFAULT_JOBS, metavar="K", help=f"archives downloaded at once (default: {DEFAULT_JOBS})")
    p.add_argument("--mirror", default=None, metavar="URL_PREFIX",
                   help="fetch URL_PREFIX/images_NN.tar.gz (and metadata files) instead of the NIH links (default: none)")
    p.add_argument("--retries", type=int, default=DEFAULT_RETRIES, metavar="R",
                   help=f"connection attempts per archive, each resuming (default: {DEFAULT_RETRIES})")
    p.add_argument("--timeout", type=finite_float(0, lo_open=True), default=DEFAULT_TIMEOUT, metavar="SEC",
                   help=f"seconds without data before a connection counts as dropped (default: {DEFAULT_TIMEOUT})")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def main(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise UserError(f"--timeout is {args.timeout}; expected a positive number of seconds")
    report = download(args.out, parts=args.parts, jobs=args.jobs, mirror=args.mirror, retries=args.retries,
                      timeout=args.timeout, progress=args.progress)
    print("\n".join(report.lines()))
    print(summarise(report.out))
    return 0
