"""Draw IPA completions of one partially observed image and save a figure.

The figure has one row: ground truth, masked input (unobserved pixels tinted), N completions,
pixel mean and pixel variance. The image comes from a file (PNG or DICOM, resized to the model
size) or from the test split of the data set.

Examples:
    ipa_core sample --run runs/ipa --index 0 --mask patches:3 --n 8 --out grid.png
    ipa_core sample --run runs/ipa --image chest.png --mask box:8,8,32,32 --t 0.85 --out grid.png
"""

from __future__ import annotations

import argparse
import logging

import torch

from xray.errors import UserError

HELP = "draw IPA completions of a partially observed image (grid PNG)"
log = logging.getLogger(__name__)


def configure(p: argparse.ArgumentParser) -> None:
    from xray.dataset import add_data_args

    from ..masks import MASK_SPEC_HELP

    p.add_argument("--run", required=True, metavar="DIR", help="IPA run folder (or its model/ folder) from `ipa_core train --stage ipa`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", metavar="FILE", help="PNG/JPEG/DICOM x-ray; resized to the model's image size")
    src.add_argument("--index", metavar="I", type=int, help="index into the test split of --data")
    p.add_argument("--mask", default="patches:3", metavar="SPEC", help=f"observed pixels: {MASK_SPEC_HELP} (default: patches:3)")
    p.add_argument("--n", type=int, default=8, help="number of completions (default: 8)")
    p.add_argument("--t", type=float, default=1.0, help="sampling temperature, multiplies c's sigma (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed for the mask and the samples (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--out", required=True, metavar="PNG", help="output figure")
    add_data_args(p)


def load_image(path: str, size: int) -> torch.Tensor:
    """An image file as uint8 ``(1, 1, size, size)``, resized exactly as the prepared cache does."""
    from xray.cache import resize_square
    from xray.imageio import read_image

    return torch.from_numpy(resize_square(read_image(path), size).copy())[None, None]  # (1, 1, S, S)


def main(args: argparse.Namespace) -> int:
    from ..ipa import IPA
    from ..masks import parse_mask_spec
    from ..sampling import completion_figure, sample_completions, save_png

    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.t < 0:
        raise UserError(f"--t must be >= 0, got {args.t}")
    device = torch.device(args.device)
    model = IPA.from_pretrained(args.run, map_location=device).eval()
    S, C = model.config.image_size, model.config.image_channels
    if args.image is not None:
        x = load_image(args.image, S)
        if C == 3:
            x = x.expand(1, 3, S, S).contiguous()  # (1, 3, S, S) grey as RGB
    else:
        from xray.dataset import dataset_from_args

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
    out = save_png(completion_figure(x, m, samples), args.out)
    print(f"wrote {out} ({args.n} completions, mask {args.mask}, observed {float(m.mean()):.0%}, t={args.t})")
    return 0
