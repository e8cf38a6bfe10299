"""Run the whole pipeline on phantom data (or an NIH-format folder) and summarise.

Without --data-root the synthetic phantom set is generated on first use into the cache folder
(~/.cache/boed) and reused afterwards.

Stages: prepare data -> train the VAE -> train IPA -> train the AVP-CNN -> `boed run` heatmaps on
a few test images -> `boed evaluate` with every method -> a summary table (printed, and written to
<out>/summary.md). Each stage skips work already done and resumes after a kill; a stage whose
inputs changed (another --data-root, --profile/--quick, --seed, --max-steps, --device ...) reruns
with every stage after it, its old outputs moved aside (<stage>.old-<time>).

Examples:
  boed demo                                   # cpu profile, phantom data, runs/demo
  boed demo --quick                           # a few minutes, small everything
  boed demo --data-root /data/nih --profile paper --device cuda --illness effusion,edema

`make demo` runs `boed demo --out runs/demo --publish results`: it rewrites the tracked results/
folder (tables, figures, README) from the new run; `git diff results/` shows what changed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from boed.demo import DemoOptions, PROFILES, STAGES, run_demo
from boed.demo_publish import publish
from xray.chestmnist import find_npz
from xray.cli_base import add_device_arg, check_output, comma_list, device_flag
from xray.dataset import DATA_NAMES
from xray.errors import UserError
from xray.labels import resolve_illness

HELP = "run the whole pipeline (data, VAE, IPA, AVP-CNN, scans, evaluation) and summarise"
DEFAULT_ILLNESSES = ("effusion", "edema")
SMOKE_EVAL_IMAGES = 1  # with --max-steps: test images of each training stage's end-of-run metrics
SMOKE_SAMPLE_N = 1  # with --max-steps: images per row of the VAE/IPA sample grids
CPU_DEMO_MINUTES = 20  # cpu profile on 2 idle CPU cores: 18.4 min measured in session 5 (about 36 min on the 1.7x slower CPUs of sessions 3-4)


def configure(p) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR", help="run folder (default: runs/demo)")
    p.add_argument("--data", choices=DATA_NAMES, default=None,
                   help="phantom, chestxray (an NIH-format folder) or chestmnist (MedMNIST's chestmnist_S.npz: the NIH "
                        "images in one small file) (default: chestxray with --data-root, else phantom)")
    p.add_argument("--data-root", type=Path, default=None, metavar="DIR", help="NIH-format folder, real or phantom, or the folder holding chestmnist_S.npz (default: none: the default phantom set, generated on first use into the cache folder; with --data chestmnist, medmnist's ~/.medmnist)")
    p.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="where prepared images and the default phantom set live (default: ~/.cache/boed)")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None, help=f"cpu: {PROFILES['cpu'].image_size} px images, about {CPU_DEMO_MINUTES} min on 2 CPU cores; quick: a few minutes, for smoke tests; "
                        f"paper: the paper's {PROFILES['paper'].image_size} px setup ({PROFILES['paper'].vae_steps:,} VAE steps), for GPUs (default: the cpu profile, quick with --quick)")
    p.add_argument("--quick", action="store_true", help="same as --profile quick: a few minutes, for smoke tests")
    p.add_argument("--illness", nargs="+", default=list(DEFAULT_ILLNESSES), metavar="LIST",
                   help=f"comma-separated tasks to run (default: {','.join(DEFAULT_ILLNESSES)})")
    add_device_arg(p)
    p.add_argument("--seed", type=int, default=0, help="random seed of every stage; same seed, same results (default: 0)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="cap every training stage at this many steps, for smoke tests; the stages' end-of-run metrics "
                        "and sample grids shrink with it (see --eval-images, --sample-n) (default: none: the profile's)")
    p.add_argument("--eval-images", type=int, default=None, metavar="N",
                   help="test images for the end-of-run metrics of every training stage (VAE, IPA, AVP-CNN); "
                        "at 256 px each costs about one to two model passes per image and mask set "
                        f"(default: the commands' own; {SMOKE_EVAL_IMAGES} with --max-steps)")
    p.add_argument("--sample-n", type=int, default=None, metavar="N",
                   help="images per row of the VAE and IPA sample grids (`ipa_core train --sample-n`), 0 = no grids "
                        f"(default: the command's own; {SMOKE_SAMPLE_N} with --max-steps)")
    p.add_argument("--n-test", type=int, default=None, help=f"test images per illness in the evaluation (default: the profile's: {PROFILES['cpu'].n_test} for cpu)")
    p.add_argument("--until", choices=STAGES, default="eval", help="stop after this stage (default: eval, i.e. run everything)")
    p.add_argument("--max-batch", type=int, default=None, help="cap every training batch size, for smoke tests (default: none: the profile's)")
    p.add_argument("--publish", type=Path, default=None, metavar="DIR",
                   help="copy the reference outputs (tables, figures, README.md) to this folder, replacing what is "
                        "there; `make demo` publishes to the tracked results/ (default: none)")
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="cap each split at N images, whole patients first, for a CPU run on real data (default: none: all)")
    p.add_argument("--present-only", action="store_true",
                   help="use the listed images that are present (a partial NIH download) (default: off)")
    p.add_argument("--avp-init-weights", type=Path, default=None, metavar="FILE",
                   help="local copy of the pretrained weights the paper profile's AVP-CNN starts from, for machines "
                        "without internet (default: none: downloaded through torchvision)")
    p.add_argument("--with-policies", action="store_true",
                   help="also train the amortised policies (distilled EIG-IPA and GDFS) per illness and evaluate them "
                        "as methods distilled and gdfs; adds about 17 min per illness on the cpu profile (default: off)")


def main(args) -> int:
    if args.quick and args.profile not in (None, "quick"):
        raise UserError(f"--quick is --profile quick, but --profile {args.profile} was given too; pass one of them")
    profile = PROFILES["quick" if args.quick else args.profile or "cpu"]
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise UserError(f"--max-steps must be >= 1, got {args.max_steps}")
        profile = dataclasses.replace(profile, vae_steps=min(profile.vae_steps, args.max_steps),
                                      ipa_steps=min(profile.ipa_steps, args.max_steps), avp_steps=min(profile.avp_steps, args.max_steps))
    eval_images, sample_n = args.eval_images, args.sample_n
    for flag, v, low in (("--eval-images", eval_images, 1), ("--sample-n", sample_n, 0)):
        if v is not None and v < low:
            raise UserError(f"{flag} must be >= {low}, got {v}")
    if args.max_steps is not None:  # a smoke check: a step or two per stage should not wait on hours of metrics
        eval_images = SMOKE_EVAL_IMAGES if eval_images is None else eval_images
        sample_n = SMOKE_SAMPLE_N if sample_n is None else sample_n
    if args.max_batch is not None:
        if args.max_batch < 1:
            raise UserError(f"--max-batch must be >= 1, got {args.max_batch}")
        profile = dataclasses.replace(profile, vae_batch=min(profile.vae_batch, args.max_batch),
                                      ipa_batch=min(profile.ipa_batch, args.max_batch), avp_batch=min(profile.avp_batch, args.max_batch))
    if args.n_test is not None:
        profile = dataclasses.replace(profile, n_test=args.n_test)
    if args.data == "chestxray" and args.data_root is None:
        raise UserError("--data chestxray needs --data-root DIR (a folder with Data_Entry_2017*.csv and images/)")
    if args.data == "chestmnist":
        if args.present_only:
            raise UserError("--present-only is for a partial NIH download; ChestMNIST is one complete file, leave it out")
        find_npz(args.data_root, profile.image_size)  # the file is there (or fetched) before any folder is made
    elif args.data_root is not None and not args.data_root.is_dir():
        raise UserError(f"data root {args.data_root} does not exist; pass an NIH-format folder or leave --data-root out for phantom data")
    if args.publish is not None:
        check_output(args.publish, "--publish", "folder")
    illnesses = tuple(resolve_illness(i).name for i in comma_list(args.illness))
    device = device_flag(args.device)
    opts = DemoOptions(out=args.out, profile=profile, illnesses=illnesses, data_root=args.data_root, data=args.data,
                       cache_dir=args.cache_dir, device=device, seed=args.seed, until=args.until,
                       max_images=args.max_images, present_only=args.present_only,
                       avp_init_weights=args.avp_init_weights, with_policies=args.with_policies,
                       eval_images=eval_images, sample_n=sample_n)
    run_demo(opts)
    print((args.out / "summary.md").read_text())
    if args.publish is not None:
        publish(args.out, args.publish)
        print(f"reference outputs copied to {args.publish}/")
    return 0
