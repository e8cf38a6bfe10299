"""Studies over whole pipelines: the completer study and training-seed robustness.

  boed study completers --out runs/study            # cpu profile, effusion, R = 3 (about an hour on 2 cores)
  boed study completers --out runs/demo             # reuse a finished `boed demo`'s VAE, IPA and AVP-CNN
  boed study completers --profile quick --out runs/demo   # ... of `boed demo --quick` (the same profile)
  boed study completers --quick --out runs/study-q  # minutes, small everything
  boed study seeds --seeds 0,1,2 --out runs/seeds   # boed demo --seed K per seed, then pooled differences
  boed study seeds --seeds 0,1 --out runs/seeds-q -- --quick   # flags after -- go to every boed demo
  boed study power --out runs/demo                  # EIG-IPA, Uncond, clairvoyant, Random, full on 1 000 test images
  boed study variability --out runs/variability     # phantom presets default, realistic, hard: gain over Uncond per level
  boed study variability --reuse default=runs/demo --illness effusion --n-test 300 --out runs/variability
                                                    # the default level's row from the power study in runs/demo

completers: trains (or reuses) the VAE, IPA, IPA-R (reverse KL), an under-trained IPA (1/8 of the
steps) and the AVP-CNN, evaluates eig-ipa, eig-ipar, eig-ipa-under, eig-retrieval and uncond with R
repeats, measures every completer's completion quality on the same scan states, and writes
completers.csv, completers.md and completers.png. seeds: writes seeds.csv, seeds.md, seeds.png.
power: evaluates eig-ipa, uncond, clairvoyant, random and full on --n-test images per task with R
repeats and writes power.csv/.md/.png (EIG-IPA minus Uncond with its interval width, the room
clairvoyant minus Uncond and the share of it EIG-IPA captures). variability: per phantom
difficulty level a phantom set, the models and the power study; writes variability.csv/.md/.png.
Every stage skips when done and resumes after a kill: rerun the same command.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from boed import adaptivity, study
from boed.commands import demo
from boed.demo import PROFILES
from boed.study import DEFAULT_REPEATS, DEFAULT_STATES, STUDY_ILLNESSES
from xray.chestmnist import find_npz
from xray.cli_base import check_output, parse_device
from xray.dataset import DATA_NAMES
from xray.errors import UserError

HELP = "completer study, training-seed robustness, and where adaptivity pays (power study, variability sweep)"
DEFAULT_SEEDS = "0,1,2"
DEFAULT_PROFILE = "cpu"
DEFAULT_DEVICE = "auto"
DEFAULT_SWEEP_PHANTOM = 6000  # phantom images per level of the variability sweep (the cpu profile's scale)


DATA_HELP = ("as boed demo's: phantom, chestxray (an NIH-format --data-root) or chestmnist (default: chestxray with "
             "--data-root, else the demo's phantom set)")


def _check_data(args: argparse.Namespace, profile) -> None:
    """--data/--data-root as `boed demo` checks them, before any stage runs (one line, nothing created)."""
    if args.data == "chestxray" and args.data_root is None:
        raise UserError("--data chestxray needs --data-root DIR (a folder with Data_Entry_2017*.csv and images/)")
    if args.data == "chestmnist":
        find_npz(args.data_root, profile.image_size)  # the file is there (or fetched) before any folder is made
    elif args.data_root is not None and not args.data_root.is_dir():
        raise UserError(f"data root {args.data_root} does not exist; pass an NIH-format folder or leave --data-root out for phantom data")


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="study", required=True, metavar="{completers,seeds,power,variability}")
    c = sub.add_parser("completers", help="AUROC gain over Uncond of EIG with each completer, against completion quality",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--out", type=Path, required=True, help="run folder (a finished boed demo folder reuses its models)")
    c.add_argument("--profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE, help=f"demo profile (default: {DEFAULT_PROFILE})")
    c.add_argument("--quick", action="store_true", help="same as --profile quick, --repeats 2, 24 quality states")
    c.add_argument("--illness", nargs="+", default=list(STUDY_ILLNESSES), help=f"tasks (default: {' '.join(STUDY_ILLNESSES)})")
    c.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help=f"policy repeats R of the evaluation (default: {DEFAULT_REPEATS})")
    c.add_argument("--n-test", type=int, default=None, help="test images per illness; omitted: the profile's")
    c.add_argument("--states", type=int, default=DEFAULT_STATES, help=f"scan states of the quality measurement (default: {DEFAULT_STATES})")
    c.add_argument("--data", choices=DATA_NAMES, default=None, help=DATA_HELP)
    c.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                   help="NIH-format folder, or the folder holding chestmnist_S.npz (default: none: phantom data as in boed demo)")
    c.add_argument("--cache-dir", type=Path, default=None, help="where prepared images live (omitted: the xray default)")
    c.add_argument("--device", default=DEFAULT_DEVICE, help=f"torch device: auto, cpu, cuda or cuda:N (default: {DEFAULT_DEVICE})")
    c.add_argument("--seed", type=int, default=0, help="training and evaluation seed (default: 0)")
    s = sub.add_parser("seeds", help="boed demo per training seed, then per-seed and pooled paired differences",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"comma list of training seeds (default: {DEFAULT_SEEDS})")
    s.add_argument("--out", type=Path, required=True, help="folder holding seed-K/ per seed and the pooled tables")
    s.add_argument("demo_args", nargs=argparse.REMAINDER, help="after --: flags passed to every boed demo (e.g. -- --quick)")
    for name, text in (("power", "EIG-IPA vs Uncond with the power to resolve +0.02, the clairvoyant room and the capture"),
                       ("variability", "the power study on phantom sets of growing variability: when does adaptivity pay?")):
        q = sub.add_parser(name, help=text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        q.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="run folder (power: a finished boed demo folder reuses its models; variability: one folder per level)")
        q.add_argument("--profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE, help=f"demo profile (default: {DEFAULT_PROFILE})")
        q.add_argument("--illness", default=",".join(adaptivity.POWER_ILLNESSES), metavar="LIST",
                       help=f"comma-separated tasks (default: {','.join(adaptivity.POWER_ILLNESSES)})")
        q.add_argument("--n-test", type=int, default=adaptivity.DEFAULT_POWER_N,
                       help=f"test images per task (default: {adaptivity.DEFAULT_POWER_N})")
        q.add_argument("--repeats", type=int, default=adaptivity.DEFAULT_POWER_REPEATS,
                       help=f"policy repeats R (default: {adaptivity.DEFAULT_POWER_REPEATS})")
        q.add_argument("--cache-dir", type=Path, default=None, metavar="DIR", help="where prepared images live (default: ~/.cache/boed)")
        q.add_argument("--device", default=DEFAULT_DEVICE, help=f"torch device: auto, cpu, cuda or cuda:N (default: {DEFAULT_DEVICE})")
        q.add_argument("--seed", type=int, default=0, help="training and evaluation seed (default: 0)")
        if name == "power":
            q.add_argument("--data", choices=DATA_NAMES, default=None, help=DATA_HELP)
            q.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                           help="NIH-format folder, or the folder holding chestmnist_S.npz (default: none: phantom data as in boed demo)")
        else:
            q.add_argument("--levels", default=",".join(adaptivity.LEVELS), metavar="LIST",
                           help=f"phantom difficulty presets, in order of variability (default: {','.join(adaptivity.LEVELS)})")
            q.add_argument("--n-phantom", type=int, default=DEFAULT_SWEEP_PHANTOM,
                           help=f"phantom images per level (default: {DEFAULT_SWEEP_PHANTOM})")
            q.add_argument("--reuse", action="append", default=[], metavar="LEVEL=RUN",
                           help="take LEVEL's rows from a finished `boed study power --out RUN` instead of training it "
                                "(e.g. default=runs/demo); repeatable (default: none)")


def _check_demo_args(extra: list[str]) -> None:
    """Refuse flags `boed demo` does not know before any demo starts (one line, nothing created)."""
    parser = argparse.ArgumentParser(prog="boed demo", add_help=False)
    demo.configure(parser)
    _, unknown = parser.parse_known_args([*extra, "--seed", "0", "--out", "unused"])
    if unknown:
        raise UserError(f"`boed demo` does not take {' '.join(unknown)}; flags after -- go to every demo (see `boed demo --help`)")


def _power(args: argparse.Namespace) -> int:
    """`boed study power` and `boed study variability`: flags checked before any stage runs."""
    device = str(parse_device(args.device))
    profile = PROFILES[args.profile]
    for flag, v in (("--n-test", args.n_test), ("--repeats", args.repeats)):
        if v < 1:
            raise UserError(f"{flag} must be >= 1, got {v}")
    illnesses = tuple(study.resolve_illness(i).name for i in args.illness.split(",") if i.strip())
    check_output(args.out, "--out", "folder")
    if args.study == "power":
        _check_data(args, profile)
        study.check_demo_profile(args.out, profile.name, "boed study power")
        opts = adaptivity.PowerOptions(out=args.out, profile=profile, illnesses=illnesses, n_test=args.n_test, repeats=args.repeats,
                                       data_root=args.data_root, data=args.data, cache_dir=args.cache_dir, device=device,
                                       seed=args.seed)
        adaptivity.run_power_study(opts)
        stem = "power"
    else:
        if args.n_phantom < 100:
            raise UserError(f"--n-phantom must be >= 100 images per level, got {args.n_phantom}")
        levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
        bad = [r for r in args.reuse if r.count("=") != 1 or not all(r.split("="))]
        if bad:
            raise UserError(f"--reuse takes LEVEL=RUN (e.g. default=runs/demo), got {', '.join(bad)}")
        reuse = {lv.strip(): Path(run) for lv, run in (r.split("=") for r in args.reuse)}
        adaptivity.run_variability_sweep(levels, args.out, profile, args.n_phantom, args.n_test, args.repeats, illnesses,
                                         device, args.seed, args.cache_dir, reuse=reuse)
        stem = "variability"
    print((args.out / f"{stem}.md").read_text())
    print(f"wrote {args.out / f'{stem}.csv'}, {args.out / f'{stem}.md'}, {args.out / f'{stem}.png'}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.study in ("power", "variability"):
        return _power(args)
    if args.study == "seeds":
        seeds = study.parse_seeds(args.seeds)
        extra = [a for a in args.demo_args if a != "--"]
        if any(a in ("--seed", "--out") for a in extra):
            raise UserError("pass --seeds and --out to `boed study seeds`, not after --; the study sets each demo's --seed and --out")
        _check_demo_args(extra)
        check_output(args.out, "--out", "folder")
        rows = study.run_seed_study(seeds, args.out, extra)
        print((args.out / "seeds.md").read_text())
        print(f"wrote {args.out / 'seeds.csv'}, {args.out / 'seeds.md'}, {args.out / 'seeds.png'} ({len(rows)} rows)")
        return 0

    device = str(parse_device(args.device))  # a one-line error now, not after the training stages
    if args.quick and args.profile not in (DEFAULT_PROFILE, "quick"):
        raise UserError(f"--quick is --profile quick (and fewer repeats and states), but --profile {args.profile} was given too; "
                        "pass one of them")
    profile = PROFILES["quick" if args.quick else args.profile]
    repeats, states = (min(args.repeats, 2), min(args.states, 24)) if args.quick else (args.repeats, args.states)
    if repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    if states < 1:
        raise UserError(f"--states must be >= 1, got {args.states}")
    if args.n_test is not None:
        if args.n_test < 1:
            raise UserError(f"--n-test must be >= 1, got {args.n_test}")
        profile = dataclasses.replace(profile, n_test=args.n_test)
    illnesses = tuple(study.resolve_illness(i).name for i in args.illness)
    _check_data(args, profile)
    check_output(args.out, "--out", "folder")
    study.check_demo_profile(args.out, profile.name, "boed study completers")
    opts = study.StudyOptions(out=args.out, profile=profile, illnesses=illnesses, repeats=repeats, n_states=states,
                              data_root=args.data_root, data=args.data, cache_dir=args.cache_dir, device=device, seed=args.seed)
    study.run_completer_study(opts)
    print((args.out / "completers.md").read_text())
    print(f"wrote {args.out / 'completers.csv'}, {args.out / 'completers.md'}, {args.out / 'completers.png'}")
    return 0
