"""Run the whole pipeline on the embedded phantom data (or an NIH-format folder) and summarise.

Stages: prepare data -> train the VAE -> train IPA -> train the AVP-CNN -> `boed run` heatmaps on
a few test images -> `boed evaluate` with every method -> a summary table (printed, and written to
<out>/summary.md). Each stage skips work already done and resumes after a kill; a stage whose
inputs changed (another --data-root, --profile/--quick, --seed, --max-steps, --device ...) reruns
with every stage after it, its old outputs moved aside (<stage>.old-<time>).

Examples:
  boed demo                                   # cpu profile, phantom data, runs/demo
  boed demo --quick                           # a few minutes, small everything
  boed demo --data-root /data/nih --profile paper --device cuda --illness effusion edema
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from xray.errors import UserError
from xray.labels import resolve_illness

DEFAULT_DEVICE = "auto"
HELP = "run the whole pipeline (data, VAE, IPA, AVP-CNN, scans, evaluation) and summarise"
DEFAULT_ILLNESSES = ("effusion", "edema")


def configure(p) -> None:
    from boed.demo import PROFILES, STAGES

    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    p.add_argument("--data-root", type=Path, default=None, help="NIH-format folder (real or phantom); default: the embedded phantom set")
    p.add_argument("--cache-dir", type=Path, default=None, help="where prepared images and the default phantom set live")
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu", help="cpu (S=64, ~30 min on 2 cores), quick, or paper (S=256, GPUs)")
    p.add_argument("--quick", action="store_true", help="same as --profile quick: a few minutes, for smoke tests")
    p.add_argument("--illness", nargs="+", default=list(DEFAULT_ILLNESSES), help="tasks to run (default: effusion edema)")
    p.add_argument("--device", default=DEFAULT_DEVICE,
                   help=f"auto (CUDA when available), cpu, cuda or cuda:N; every stage uses it (default: {DEFAULT_DEVICE})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="cap every training stage at this many steps (smoke tests)")
    p.add_argument("--n-test", type=int, default=None, help="override the profile's number of test images")
    p.add_argument("--until", choices=STAGES, default="eval", help="stop after this stage (default: run everything)")
    p.add_argument("--max-batch", type=int, default=None, help="cap every training batch size (smoke tests)")
    p.add_argument("--publish", type=Path, default=None, help="copy the reference outputs (tables, figures, README) to this folder")


def main(args) -> int:
    from boed.demo import PROFILES, DemoOptions, run_demo
    from boed.demo_publish import publish

    profile = PROFILES["quick" if args.quick else args.profile]
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise UserError(f"--max-steps must be >= 1, got {args.max_steps}")
        profile = dataclasses.replace(profile, vae_steps=min(profile.vae_steps, args.max_steps),
                                      ipa_steps=min(profile.ipa_steps, args.max_steps), avp_steps=min(profile.avp_steps, args.max_steps))
    if args.max_batch is not None:
        if args.max_batch < 1:
            raise UserError(f"--max-batch must be >= 1, got {args.max_batch}")
        profile = dataclasses.replace(profile, vae_batch=min(profile.vae_batch, args.max_batch),
                                      ipa_batch=min(profile.ipa_batch, args.max_batch), avp_batch=min(profile.avp_batch, args.max_batch))
    if args.n_test is not None:
        profile = dataclasses.replace(profile, n_test=args.n_test)
    if args.data_root is not None and not args.data_root.is_dir():
        raise UserError(f"data root {args.data_root} does not exist; pass an NIH-format folder or leave --data-root out for phantom data")
    from xray.cli_base import parse_device

    device = str(parse_device(args.device))  # resolved once: the stages and their fingerprints see cpu / cuda:N
    illnesses = tuple(resolve_illness(i).name for i in args.illness)
    opts = DemoOptions(out=args.out, profile=profile, illnesses=illnesses, data_root=args.data_root,
                       cache_dir=args.cache_dir, device=device, seed=args.seed, until=args.until)
    run_demo(opts)
    print((args.out / "summary.md").read_text())
    if args.publish is not None:
        publish(args.out, args.publish)
        print(f"reference outputs copied to {args.publish}/")
    return 0
