"""Train an amortised scan policy: one network forward per decision instead of greedy EIG-IPA's
N completions and L x N classifier passes.

Methods:
  distill  greedy EIG-IPA (--ipa, --avp) scans --teacher-images training images; its EIG map over all
           candidates at every state t = 1..T-1 (plus --off-policy random off-trajectory states per
           image) is stored in OUT/teacher/ shards; a policy network is then trained with
           KL(softmax(EIG / tau) || pi). Reports validation top-1 agreement with the greedy argmax
           and the mean EIG regret (OUT/eval.json).
  gdfs     the GDFS peer (Covert et al., ICML 2023): a policy network trained jointly with the
           AVP-CNN (--avp, fine-tuned; --gdfs-predictor frozen keeps it fixed) through a Concrete
           relaxation with an annealed temperature; no generative model. Reports the AUROC of its
           predictor after t = 1..T scans (OUT/eval.json).

Examples:
  boed train-policy --method distill --ipa runs/demo/ipa --avp runs/demo/avp --illness effusion --out runs/demo/policy-distill
  boed train-policy --method gdfs --avp runs/demo/avp --illness effusion --out runs/demo/policy-gdfs
  # teacher data across machines: --shard 0/4 ... --shard 3/4, then the same command without --shard trains

The training flags default to the distill settings; with --method gdfs the defaults are 600 steps,
batch 24, lr 0.001. Re-running the same command resumes (teacher shards and training checkpoints).
The policy (OUT/model/) is used by `boed run --policy OUT` and as methods distilled / gdfs of
`boed evaluate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from boed.amortised.gdfs import PREDICTOR_MODES, GDFSConfig
from boed.amortised.network import ARCHS, METHODS, PolicyConfig
from boed.amortised.teacher import TeacherConfig
from boed.amortised.train import distill_defaults, gdfs_defaults, train_distilled, train_gdfs
from boed.classifier import AVPClassifier
from boed.geometry import ScanGeometry
from ipa_core.ipa import IPA
from ipa_core.trainer import add_train_args, train_config_from_args
from xray.cli_base import DEVICE_HELP, MAX_TEMPERATURE, finite_float, parse_device, parse_shard, set_help
from xray.dataset import add_data_args, dataset_from_args, models_data_help, use_models_data
from xray.errors import UserError
from xray.io import atomic_write_json
from xray.labels import resolve_illness

HELP = "train an amortised scan policy (distilled EIG-IPA, or the GDFS peer)"
DEFAULT_IPA = "runs/demo/ipa"
DEFAULT_AVP = "runs/demo/avp"


def configure(p: argparse.ArgumentParser) -> None:
    t, g, pc = TeacherConfig(), GDFSConfig(), PolicyConfig()
    p.add_argument("--method", required=True, help=f"which policy: {' or '.join(METHODS)}")
    p.add_argument("--illness", default="effusion", help="the task the policy scans for (default: effusion)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (teacher/, checkpoints/, model/, eval.json); re-run to resume")
    p.add_argument("--ipa", default=DEFAULT_IPA, help=f"distill: the teacher's IPA run or model dir (default: {DEFAULT_IPA})")
    p.add_argument("--avp", default=DEFAULT_AVP, help=f"AVP-CNN run or model dir (default: {DEFAULT_AVP})")
    p.add_argument("--scans", type=int, default=t.scans, help=f"T, scans per image the policy is trained for (default: {t.scans})")
    p.add_argument("--arch", default=pc.arch, help=f"policy network: {' or '.join(ARCHS)} (default: {pc.arch})")
    p.add_argument("--width", type=int, default=pc.width, help=f"small arch only: stem channels (default: {pc.width})")
    d = p.add_argument_group("distill")
    d.add_argument("--teacher-images", type=int, default=t.n_images, help=f"training images the teacher scans (default: {t.n_images})")
    d.add_argument("--off-policy", type=int, default=t.off_policy,
                   help=f"extra off-trajectory states per image: greedy prefix then random scans (default: {t.off_policy})")
    d.add_argument("--n-samples", type=int, default=t.n_samples, help=f"N completions per teacher EIG estimate (default: {t.n_samples})")
    d.add_argument("--temperature", type=finite_float(0, MAX_TEMPERATURE, lo_open=True), default=t.temperature, help=f"IPA sampling temperature (default: {t.temperature})")
    d.add_argument("--shard-size", type=int, default=t.shard_size, help=f"images per teacher shard file (default: {t.shard_size})")
    d.add_argument("--val-shards", type=int, default=t.val_shards, help=f"teacher shards held out for validation (default: {t.val_shards})")
    d.add_argument("--tau", type=finite_float(0, lo_open=True), default=None, help="target temperature in nats (default: none: --tau-scale x the median over teacher states of max minus mean EIG)")
    d.add_argument("--tau-scale", type=finite_float(0, lo_open=True), default=0.25, help="auto tau as a fraction of the typical EIG spread (default: 0.25)")
    d.add_argument("--shard", default=None, metavar="I/N", help="generate only teacher shards k with k %% N == I, then stop (default: none: all shards, or torchrun's rank/world)")
    gg = p.add_argument_group("gdfs")
    gg.add_argument("--gdfs-predictor", default=g.predictor, help=f"finetune (the paper: joint training) or frozen (default: {g.predictor})")
    gg.add_argument("--temp-start", type=finite_float(0, lo_open=True), default=g.temp_start, help=f"first Concrete temperature (default: {g.temp_start})")
    gg.add_argument("--temp-end", type=finite_float(0, lo_open=True), default=g.temp_end, help=f"last Concrete temperature (default: {g.temp_end})")
    gg.add_argument("--temp-stages", type=int, default=g.temp_stages, help=f"geometric temperature levels (default: {g.temp_stages})")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    add_data_args(p)
    p.set_defaults(image_size=None, data=None)  # the AVP model decides S; the data: the models' record (use_models_data)
    set_help(p, "--data", models_data_help())
    add_train_args(p, distill_defaults(), note=" with --method distill")
    set_help(p, "--device", DEVICE_HELP)  # None: auto, resolved with parse_device
    set_help(p, "--image-size", "image side in pixels; must match the models (default: the AVP-CNN's size)")


def _load_models(args, method: str, device):
    """``(avp, ipa or None)``, one-line errors for missing models and mismatched sizes."""
    ipa = None
    if method == "distill":
        try:
            ipa = IPA.from_pretrained(args.ipa, map_location=device).eval()
        except UserError as e:
            raise UserError(f"--ipa {args.ipa}: {e} (the teacher needs an IPA model: train one with "
                            f"`ipa_core train --stage ipa`, or run `boed demo`)") from None
    avp = AVPClassifier.from_pretrained(args.avp, map_location=device)
    S = avp.config.image_size
    if ipa is not None:
        s_ipa = getattr(getattr(ipa, "config", None), "image_size", None) or getattr(getattr(getattr(ipa, "vae", None), "config", None), "image_size", None)
        if isinstance(s_ipa, int) and s_ipa != S:
            raise UserError(f"the IPA model ({args.ipa}) works at {s_ipa} px but the AVP-CNN ({args.avp}) at {S} px; "
                            "train both at the same --image-size")
    if args.image_size is None:
        args.image_size = S
    elif args.image_size != S:
        raise UserError(f"--image-size {args.image_size} differs from the AVP-CNN's {S} px ({args.avp}); drop the flag or use a matching model")
    return avp, ipa


def main(args: argparse.Namespace) -> int:
    # validate everything before anything is written
    method = args.method.strip().lower()
    if method not in METHODS:
        raise UserError(f"unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.arch not in ARCHS:
        raise UserError(f"unknown --arch {args.arch!r}; choose one of {', '.join(ARCHS)}")
    if args.gdfs_predictor not in PREDICTOR_MODES:
        raise UserError(f"unknown --gdfs-predictor {args.gdfs_predictor!r}; choose one of {', '.join(PREDICTOR_MODES)}")
    illness = resolve_illness(args.illness)
    if args.tau is not None and args.tau <= 0 or args.tau_scale <= 0:
        raise UserError(f"--tau and --tau-scale must be > 0, got {args.tau} and {args.tau_scale}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; pass a folder path")
    torchrun = args.shard is None and "WORLD_SIZE" in os.environ
    # no --shard: each torchrun worker takes its own shard of the teacher data (RANK of WORLD_SIZE)
    shard = (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))) if args.shard is None \
        else parse_shard(args.shard)
    device = parse_device(args.device, shard[0] if torchrun else None)
    tcfg = train_config_from_args(args, distill_defaults() if method == "distill" else gdfs_defaults())
    teacher_cfg = TeacherConfig(illness=illness.name, scans=args.scans, n_images=args.teacher_images, off_policy=args.off_policy,
                                n_samples=args.n_samples, shard_size=args.shard_size, val_shards=args.val_shards,
                                temperature=args.temperature, seed=tcfg.seed) if method == "distill" else None
    if teacher_cfg is not None:
        teacher_cfg.check_split()
    gdfs_cfg = GDFSConfig(scans=args.scans, temp_start=args.temp_start, temp_end=args.temp_end, temp_stages=args.temp_stages,
                          predictor=args.gdfs_predictor) if method == "gdfs" else None
    if args.scans < 1:
        raise UserError(f"--scans must be >= 1, got {args.scans}")
    avp, ipa = _load_models(args, method, device)
    use_models_data(args, {"AVP": args.avp, **({"IPA": args.ipa} if method == "distill" else {})}, "boed train-policy")

    if args.scans > ScanGeometry(avp.config.image_size).num_locations:
        raise UserError(f"--scans {args.scans} exceeds the {ScanGeometry(avp.config.image_size).num_locations} grid locations")
    train_set = dataset_from_args(args, "train")
    if train_set.image_size != avp.config.image_size:
        raise UserError(f"training images are {train_set.image_size} px, the AVP-CNN works at {avp.config.image_size} px; "
                        f"prepare data with --image-size {avp.config.image_size}")
    if teacher_cfg is not None and teacher_cfg.n_images > len(train_set):
        raise UserError(f"--teacher-images {teacher_cfg.n_images} exceeds the {len(train_set)} training images; use at most {len(train_set)}")

    if method == "distill":
        res = train_distilled(out, ipa, avp, args.ipa, args.avp, train_set, teacher_cfg, tcfg, args.arch, args.width,
                              args.tau, args.tau_scale, device, shard, torchrun, args.progress)
        if res is None or shard[0] != 0:
            return 0
        print(f"distilled policy: validation top-1 agreement with greedy EIG-IPA {res.get('top1_agreement', float('nan')):.3f}, "
              f"mean EIG regret {res.get('eig_regret', float('nan')):.4g} nats "
              f"({100 * res.get('eig_regret_rel', float('nan')):.1f} % of the teacher's EIG) on {int(res.get('n_states', 0))} states; "
              f"tau {res['tau']:.3g} nats")
    else:
        test_set = dataset_from_args(args, "test")
        res = train_gdfs(out, avp, args.avp, train_set, test_set, illness.name, gdfs_cfg, tcfg, args.arch, args.width,
                         device, args.progress)
        if shard[0] != 0:
            return 0
        aurocs = " ".join(f"t={k[7:]}: {v:.3f}" for k, v in res.items() if k.startswith("auroc_t"))
        print(f"GDFS policy: AUROC of its predictor on {int(res.get('n_images', 0))} test images after hard selections: {aurocs}")
    atomic_write_json(out / "report.json", {"method": method, "illness": illness.name,
                                            "train_config": dataclasses.asdict(tcfg), **res})
    print(f"policy: {out / 'model'}   report: {out / 'report.json'}")
    return 0
