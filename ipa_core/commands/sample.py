"""Draw IPA completions of one partially observed image and save a figure.

The figure has one row: ground truth, masked input (unobserved pixels tinted), N completions,
pixel mean and pixel variance. The image comes from a file (PNG or DICOM, resized to the model
size) or from the test split of the data set.

Examples:
    ipa_core sample --run runs/ipa --index 0 --mask patches:3 --n 8 --out grid.png
    ipa_core sample --run runs/ipa --image chest.png --mask box:8,8,32,32 --t 0.85 --out grid.png

The run folder comes from `ipa_core train` (the IPA stage): `ipa_core train ... --out runs/ipa`
writes runs/ipa/ipa (or runs/ipa itself with --stage ipa); `boed demo` writes runs/demo/ipa.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from xray.cache import resize_square
from xray.cli_base import MAX_TEMPERATURE, add_device_arg, check_output, finite_float, parse_device, set_help
from xray.dataset import add_data_args, dataset_from_args, models_data_help, use_models_data
from xray.errors import UserError
from xray.imageio import read_image

from ..ipa import IPA
from ..masks import MASK_SPEC_HELP, parse_mask_spec
from ..sampling import completion_figure, completion_titles, sample_completions, save_png
from ..trainer import DAMAGED, check_finite_weights

HELP = "draw IPA completions of a partially observed image (grid PNG)"
DEFAULT_MASK = "patches:3"
DEFAULT_N = 8
MAX_N = 256  # completions in one grid figure; more is no figure anyone can read (and a memory hazard)
DEFAULT_T = 1.0
DEFAULT_SEED = 0
MAKE_RUN = "ipa_core train --stage ipa --vae VAE_RUN --out DIR"
log = logging.getLogger(__name__)


def configure(p: argparse.ArgumentParser) -> None:


    p.add_argument("--run", required=True, metavar="DIR", help=f"IPA run folder (or its model/ folder), made by `{MAKE_RUN}` or `boed demo` (runs/demo/ipa)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", metavar="FILE", help="PNG/JPEG/DICOM x-ray; resized to the model's image size (give --image or --index)")
    src.add_argument("--index", metavar="I", type=int, help="image I of the test split of --data (give --image or --index)")
    p.add_argument("--mask", default=DEFAULT_MASK, metavar="SPEC", help=f"observed pixels: {MASK_SPEC_HELP} (default: {DEFAULT_MASK})")
    p.add_argument("--n", type=int, default=DEFAULT_N, metavar="N", help=f"number of completions, at most {MAX_N} (default: {DEFAULT_N})")
    p.add_argument("--t", type=finite_float(0, MAX_TEMPERATURE), default=DEFAULT_T, metavar="T",
                   help="sampling temperature: scales the spread of the random latent draws; below 1 gives "
                        f"smoother, more typical completions, 0 the most likely one (default: {DEFAULT_T})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed of the mask and the completions; same seed, same figure (default: {DEFAULT_SEED})")
    add_device_arg(p)
    p.add_argument("--out", required=True, metavar="FILE", help="output figure, a .png file")
    add_data_args(p)
    p.set_defaults(data=None)  # the data recorded with the model (use_models_data)
    set_help(p, "--data", models_data_help())


def load_image(path: str, size: int) -> torch.Tensor:
    """An image file as uint8 ``(1, 1, size, size)``, resized exactly as the prepared cache does."""
    return torch.from_numpy(resize_square(read_image(path), size).copy())[None, None]  # (1, 1, S, S)


def main(args: argparse.Namespace) -> int:
    if not 1 <= args.n <= MAX_N:
        raise UserError(f"--n is {args.n}; expected 1 to {MAX_N} completions (one grid figure)")
    check_output(args.out, "--out", "file", suffixes=(".png",))
    device = parse_device(args.device)
    run = Path(args.run)
    if not ((run / "config.json").is_file() or (run / "model" / "config.json").is_file()):
        what = "has no IPA model (no config.json in it or in its model/)" if run.is_dir() else "does not exist"
        raise UserError(f"--run {run} {what}; make one with `{MAKE_RUN}`, or run `boed demo` (it writes runs/demo/ipa)")
    model = IPA.from_pretrained(run, map_location=device).eval()
    check_finite_weights(model, f"the IPA model in {run}", DAMAGED)
    S, C = model.config.image_size, model.config.image_channels
    if args.image is not None:
        x = load_image(args.image, S)
        if C == 3:
            x = x.expand(1, 3, S, S).contiguous()  # (1, 3, S, S) grey as RGB
    else:

        use_models_data(args, {"IPA": run}, "ipa_core sample")
        if args.image_size != S:
            raise UserError(f"--image-size {args.image_size} does not match the model's image size {S}; pass --image-size {S}")
        ds = dataset_from_args(args, "test")
        if not 0 <= args.index < len(ds):
            raise UserError(f"--index {args.index} is outside the test split 0..{len(ds) - 1}")
        x = ds.get_batch([args.index])  # (1, 1, S, S)
    g = torch.Generator().manual_seed(args.seed)
    m = parse_mask_spec(args.mask, S, g)
    gd = torch.Generator(device=device).manual_seed(args.seed)
    samples = sample_completions(model, x.to(device), m.to(device), args.n, t=args.t, generator=gd)
    try:
        out = save_png(completion_figure(x, m, samples), args.out, titles=completion_titles(args.n), cell=S)
    except OSError as e:
        raise UserError(f"cannot write --out {args.out}: {e.strerror or e}; choose a writable .png path") from None
    print(f"wrote {out} ({args.n} completions, mask {args.mask}, observed {float(m.mean()):.0%}, t={args.t})")
    return 0
