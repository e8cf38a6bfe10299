"""Coverage study: do IPA completions cover the ground truth? (paper: LPIPS-GT, best of K = 100)

On test images, for each free-form observed-fraction bin (0-20 %, ..., 80-100 %), the best-of-K
pixel MSE between completions and the ground truth on the UNOBSERVED pixels, K = 1, 10, 100, and
the sample diversity, for IPA at t = 1, IPA at t = 0.85 and (with --ipa-r) IPA-R. A sampler that
covers the posterior gets much closer to the truth as K grows; a mode-seeking one (lower t,
IPA-R) has less diversity and gains less from K.

Writes results/coverage.csv, results/coverage.png and results/coverage.md (or --out DIR).

    python benchmarks/coverage.py --ipa runs/demo/ipa [--ipa-r runs/demo/ipa_r] --data phantom \
        [--images 16] [--ks 1,10,100] [--temps 1.0,0.85] [--device cpu] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ipa_core.coverage import bin_masks, coverage_study, ipa_sampler, write_results
from ipa_core.ipa import IPA
from xray.cli_base import MAX_TEMPERATURE
from xray.dataset import add_data_args, dataset_from_args
from xray.errors import UserError, cli_entry

RESULTS = Path(__file__).resolve().parents[1] / "results"


def parse_list(s: str, kind=float) -> list:
    try:
        return [kind(v) for v in s.split(",") if v]
    except ValueError:
        raise UserError(f"expected a comma-separated list of numbers, got {s!r}") from None


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ipa", required=True, metavar="RUN", help="IPA run (O_for)")
    p.add_argument("--ipa-r", metavar="RUN", default=None, help="IPA-R run (O_rev), optional")
    p.add_argument("--images", type=int, default=16, help="test images (default 16)")
    p.add_argument("--ks", default="1,10,100", help="K values (default 1,10,100)")
    p.add_argument("--temps", default="1.0,0.85", help="IPA temperatures (default 1.0,0.85)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--note", default="", help="extra sentence for coverage.md (how the models were trained)")
    add_data_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    ks, temps = parse_list(args.ks, int), parse_list(args.temps)
    bad = [t for t in temps if not 0 <= t <= MAX_TEMPERATURE]  # also NaN
    if bad or any(k < 1 for k in ks):
        raise UserError(f"--temps {args.temps} / --ks {args.ks}: temperatures must be finite in [0, {MAX_TEMPERATURE:g}] "
                        "and sample counts >= 1")
    device = torch.device(args.device)

    models = {}
    ipa = IPA.from_pretrained(args.ipa, map_location=device).eval()
    for t in temps:
        models[f"IPA t={t:g}"] = ipa_sampler(ipa, t)
    if args.ipa_r:
        ipa_r = IPA.from_pretrained(args.ipa_r, map_location=device).eval()
        if ipa_r.config.image_size != ipa.config.image_size:
            raise UserError(f"--ipa-r model is {ipa_r.config.image_size}px, --ipa model {ipa.config.image_size}px; pass models of one size")
        models["IPA-R t=1"] = ipa_sampler(ipa_r, 1.0)
    S = ipa.config.image_size
    if args.image_size != S:
        raise UserError(f"--image-size {args.image_size} does not match the model's image size {S}; pass --image-size {S}")
    test = dataset_from_args(args, "test")
    n = min(args.images, len(test))
    images = test.get_batch(np.arange(n))  # (n, 1, S, S)
    masks = bin_masks(n, S, torch.Generator().manual_seed(args.seed))

    rows, t0 = [], time.perf_counter()
    for name, fn in models.items():
        g = torch.Generator(device=device).manual_seed(args.seed)
        rows += coverage_study(fn, name, images, masks, ks=ks, batch_size=4, generator=g)
    secs = time.perf_counter() - t0
    notes = (f"{n} {args.data} test images at {S} px, one free-form mask per image and bin (seed {args.seed}); "
             f"{max(ks)} completions per image and method, observed pixels pasted back. Models: IPA `{args.ipa}`"
             + (f", IPA-R `{args.ipa_r}`" if args.ipa_r else "") + f". {secs:.0f} s on {device}. {args.note}")
    paths = write_results(rows, args.out, notes)
    print(Path(paths["md"]).read_text())
    print("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":
    main()
