"""Evaluate scan policies: AUROC/NLL of the AVP-CNN after t = 0..T scans (paper fig. 5, 8, 9).

Example:
  boed evaluate --illness effusion --scans 5 --methods eig,epe,random,uncond,nongreedy,full \\
      --n-test 500 --out runs/eval --ipa runs/demo/ipa --avp runs/demo/avp
  # across machines: --shard 0/4 ... --shard 3/4, then `boed evaluate --merge --out runs/eval`
  # one machine, several GPUs: torchrun --nproc-per-node 4 -m boed.cli evaluate ...

Records go to DIR/records*.jsonl (DIR: --out) as they are computed; re-running the same command resumes. When
every shard is complete, DIR/metrics.csv, auroc.png, nll.png (and cross_task.* with --cross-task)
are written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

from xray.cli_base import add_device_arg, parse_device, set_help
from xray.errors import UserError

HELP = "evaluate scan policies: AUROC/NLL after 0..T scans, bootstrap CIs, plots"
DEFAULT_METHODS = "eig,epe,random,uncond,nongreedy,full"
log = logging.getLogger(__name__)


def configure(p: argparse.ArgumentParser) -> None:
    from xray.dataset import add_data_args

    from boed.evaluate import PAPER_TASKS

    p.add_argument("--illness", default="effusion", help="the task whose probability the EIG targets (default: effusion)")
    p.add_argument("--scans", type=int, default=5, help="T, scans per image (default: 5)")
    p.add_argument("--methods", default=DEFAULT_METHODS, metavar="LIST",
                   help="comma-separated scan policies: eig (greedy expected information gain), epe (greedy expected "
                        "posterior entropy), random, uncond (EIG from unconditional draws), nongreedy (best fixed "
                        f"sequence), full (the whole image, an upper bound) (default: {DEFAULT_METHODS})")
    p.add_argument("--n-test", type=int, default=None, help="test images drawn at random from the test split (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the test subset and of every policy's randomness (default: 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (records, metrics.csv, plots); re-run to resume")
    p.add_argument("--shard", default=None, metavar="I/N", help="evaluate only shard I of N (default: torchrun rank/world, else 0/1)")
    p.add_argument("--merge", action="store_true", help="only merge the records of all shards in --out into metrics and plots")
    p.add_argument("--cross-task", nargs="?", const=",".join(PAPER_TASKS), default=None, metavar="LIST",
                   help=f"also scan for each of these comma-separated tasks and score every task on every task's scans (paper fig. 9); the flag alone means {','.join(PAPER_TASKS)}")
    p.add_argument("--ipa", default="runs/demo/ipa", metavar="DIR", help="IPA run or model folder (default: runs/demo/ipa)")
    p.add_argument("--avp", default="runs/demo/avp", metavar="DIR", help="AVP-CNN run or model folder (default: runs/demo/avp)")
    p.add_argument("--n-samples", type=int, default=10, help="N completions per EIG estimate (default: 10)")
    p.add_argument("--n-sequences", type=int, default=289, help="candidate sequences of the non-greedy baseline (default: 289)")
    p.add_argument("--batch-size", type=int, default=16, help="test images per batch (default: 16)")
    p.add_argument("--rng", choices=("image", "batch"), default="image",
                   help="image: a random generator per test image, results independent of batching; "
                        "batch: one policy call per batch, faster with batched samplers, results depend on --batch-size (default: image)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals (default: 1000)")
    add_device_arg(p)
    p.add_argument("--temperature", type=float, default=1.0, help="IPA sampling temperature (default: 1.0, the paper's)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    add_data_args(p)
    p.set_defaults(image_size=None)  # the AVP model decides S unless --image-size is given
    set_help(p, "--image-size", "image side in pixels; must match the models (default: the AVP-CNN's size)")


def _dist_info(shard_flag: str | None) -> tuple[tuple[int, int], int | None]:
    """(shard, local_rank): --shard wins; else torchrun's RANK/WORLD_SIZE; else (0, 1)."""
    from boed.evaluate import parse_shard

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if shard_flag is not None:
        return parse_shard(shard_flag), None
    if world > 1:
        return (int(os.environ["RANK"]), world), int(os.environ.get("LOCAL_RANK", "0"))
    return (0, 1), None


def _pick_device(flag: str | None, local_rank: int | None) -> torch.device:
    return parse_device(flag, local_rank)


def build_policies(cfg, classifier, ipa, train_set, device, n_sequences: int = 289, temperature: float = 1.0) -> dict:
    """E1's policies for every (method, scan task) of ``cfg``."""
    from baselines.policies import FullImagePolicy, NonGreedyUncondPolicy, RandomPolicy, UncondPolicy

    from boed.geometry import ScanGeometry
    from boed.policies import GreedyPolicy
    from boed.samplers import DatasetSampler, IPASampler

    geometry = ScanGeometry(cfg.image_size)
    pol = {}
    for method, task in cfg.jobs():
        if method in ("eig-ipa", "epe-ipa"):
            pol[(method, task)] = GreedyPolicy(classifier, IPASampler(ipa, temperature=temperature), task, geometry,
                                               n_samples=cfg.n_samples, estimator=method.split("-")[0],
                                               first_sampler=DatasetSampler(train_set), device=device)
        elif method == "random":
            pol[(method, task)] = RandomPolicy(geometry)
        elif method == "uncond":
            pol[(method, task)] = UncondPolicy(classifier, DatasetSampler(train_set), task, geometry,
                                               n_samples=cfg.n_samples, device=device)
        elif method == "nongreedy":
            pol[(method, task)] = NonGreedyUncondPolicy(classifier, DatasetSampler(train_set), task, geometry,
                                                        n_samples=cfg.n_samples, n_sequences=n_sequences,
                                                        scans=cfg.scans, device=device)
        elif method == "full":
            pol[(method, task)] = FullImagePolicy()
    return pol


def _load_ipa(path: str, device):
    from ipa_core.ipa import IPA

    try:
        return IPA.from_pretrained(path, map_location=device).eval()
    except UserError as e:
        raise UserError(f"--ipa {path}: {e} (train one with `ipa_core train --stage ipa --out {path}`, or run `boed demo`)") from None


def _model_size(model) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("image_size", "resolution", "size"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    return None


def finish(out: Path) -> int:
    """Merge the records of every shard into metrics and plots (when complete)."""
    from boed.evaluate import CONFIG_NAME, EvalConfig, load_records, missing_records
    from boed.report import format_table, write_report

    if not (out / CONFIG_NAME).is_file():
        raise UserError(f"no evaluation in {out} (missing {CONFIG_NAME}); run `boed evaluate --out {out} ...` first")
    cfg = EvalConfig.from_dict(json.loads((out / CONFIG_NAME).read_text()))
    missing = missing_records(out, cfg)
    if missing:
        raise UserError(f"{out} lacks {missing} of {len(cfg.expected_keys())} records; finish every shard "
                        "(re-run its command) before merging")
    rows = write_report(out, load_records(out), cfg.tasks, cfg.scans, cfg.n_boot, cfg.bootstrap_seed, cfg.cross_task)
    print(format_table([r for r in rows if r["t"] in (0, 1, cfg.scans)]))
    print(f"wrote {out / 'metrics.csv'}, {out / 'auroc.png'}, {out / 'nll.png'}"
          + (f", {out / 'cross_task.csv'}" if cfg.cross_task and len(cfg.tasks) > 1 else ""))
    return 0


def main(args: argparse.Namespace) -> int:
    from xray.dataset import dataset_from_args
    from xray.io import ensure_writable_dir

    from boed.classifier import AVPClassifier
    from boed.evaluate import (EvalConfig, canonical_tasks, evaluate, missing_records, parse_methods,
                               select_test_indices, weights_digest)

    if args.merge:
        return finish(Path(args.out))
    shard, local_rank = _dist_info(args.shard)
    device = _pick_device(args.device, local_rank)
    methods = parse_methods(args.methods)
    tasks = canonical_tasks([args.illness] + ([t for t in args.cross_task.split(",") if t.strip()] if args.cross_task else []))
    if args.n_samples < 1:
        raise UserError(f"--n-samples must be >= 1, got {args.n_samples}")

    classifier = AVPClassifier.from_pretrained(args.avp, map_location=device)
    S = classifier.config.image_size
    if args.image_size is None:
        args.image_size = S
    elif args.image_size != S:
        raise UserError(f"--image-size {args.image_size} differs from the AVP model's {S} px ({args.avp}); drop the flag or use a matching model")
    ipa = None
    if {"eig-ipa", "epe-ipa"} & set(methods):
        ipa = _load_ipa(args.ipa, device)
        s_ipa = _model_size(ipa)
        if s_ipa is not None and s_ipa != S:
            raise UserError(f"the IPA model ({args.ipa}) works at {s_ipa} px but the AVP-CNN ({args.avp}) at {S} px; "
                            "train both at the same --image-size")
    test_set = dataset_from_args(args, "test")
    if test_set.image_size != S:
        raise UserError(f"test images are {test_set.image_size} px, the AVP-CNN works at {S} px; prepare data with --image-size {S}")
    train_set = dataset_from_args(args, "train") if set(methods) & {"eig-ipa", "epe-ipa", "uncond", "nongreedy"} else None

    out = ensure_writable_dir(args.out)  # only now: a refused command creates nothing
    cfg = EvalConfig(tasks=tasks, methods=methods, scans=args.scans, seed=args.seed,
                     indices=select_test_indices(len(test_set), args.n_test, args.seed), batch_size=args.batch_size,
                     n_samples=args.n_samples, rng=args.rng, image_size=S, n_boot=args.n_boot,
                     cross_task=args.cross_task is not None, avp=str(args.avp), ipa=str(args.ipa) if ipa is not None else None,
                     model_hashes={"avp": weights_digest(args.avp), **({"ipa": weights_digest(args.ipa)} if ipa is not None else {})})
    policies = build_policies(cfg, classifier, ipa, train_set, device, args.n_sequences, args.temperature)
    path = evaluate(policies, classifier, test_set, cfg, out, shard, device, progress=args.progress)
    print(f"records: {path}")

    if shard[1] > 1 and local_rank is not None and torch.distributed.is_available():
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()
        if shard[0] != 0:
            return 0
    missing = missing_records(out, cfg)
    if missing:
        print(f"shard {shard[0]}/{shard[1]} done; {missing} records of other shards missing. When all shards have "
              f"finished, run: boed evaluate --merge --out {out}")
        return 0
    return finish(out)
