"""`boed evaluate` from its parsed flags: validate, load the models, build the policies of the
method table, run the loop (sharded, under torchrun, resumable) and write the report.

Records go to OUT/records*.jsonl as they are computed; re-running the same command resumes (after
checking that models, data and flags are the same: otherwise a one-line error; --restart moves the
old outputs aside and starts over). When every shard is complete, OUT/metrics.csv, paired.csv,
auroc.png, nll.png, paired.png (and cross_task.* with --cross-task) are written.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch.distributed as dist

from ipa_core.persist import weights_digest
from ipa_core.trainer import DAMAGED, check_finite_weights
from xray.cli_base import parse_device, parse_shard
from xray.dataset import dataset_from_args, use_models_data
from xray.errors import UserError
from xray.io import ensure_writable_dir, remove_temp_files
from xray.labels import resolve_illness
from xray.provenance import move_aside

from ..classifier import AVPClassifier
from ..geometry import ScanGeometry
from .config import EvalConfig, canonical_tasks, check_numbers, check_task_classes, select_test_indices
from .loop import evaluate
from .methods import METHODS, MODEL_FLAGS, BuildContext, build_policies, needed_models, parse_methods
from .records import batch_fingerprinted, check_shards, config_from_out, load_records, missing_records, precheck_resume
from .report import format_table, write_report

log = logging.getLogger(__name__)


def flag_attr(key: str) -> str:
    """The argparse attribute of a MODEL_FLAGS key (``ipa-under`` -> ``ipa_under``)."""
    return key.replace("-", "_")


def _dist_info(shard_flag: str | None) -> tuple[tuple[int, int], tuple[int, int], int | None]:
    """(shard, rank, local_rank): --shard (default 0/1); torchrun's RANK/WORLD_SIZE split it further."""
    shard = parse_shard(shard_flag)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return shard, (int(os.environ["RANK"]), world), int(os.environ.get("LOCAL_RANK", "0"))
    return shard, (0, 1), None


def _model_size(model) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("image_size", "resolution", "size"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    return None


STALE_TEMP_S = 600  # a temp file this old has no live writer (outputs are written whole in well under a minute)


def remove_stale_temps(out: Path, min_age_s: float = STALE_TEMP_S) -> list[Path]:
    """Remove the temp files of writes killed midway in ``out``, sparing younger ones: shards share
    the folder, and a live shard's write is recent."""
    gone = remove_temp_files(out, min_age_s)
    if gone:
        log.info("removed %d temp file(s) of killed writes in %s", len(gone), out)
    return gone


def finish(out: Path) -> int:
    """Merge the records of every shard into metrics and plots (when complete and consistent)."""
    if not out.is_dir():
        raise UserError(f"no evaluation in {out} (the folder does not exist); run `boed evaluate --out {out} ...` first")
    cfg = config_from_out(out)
    remove_stale_temps(out)
    check_shards(out, cfg)
    missing = missing_records(out, cfg)
    if missing:
        raise UserError(f"{out} lacks {missing} of {len(cfg.expected_keys())} records; finish every shard "
                        "(re-run its command) before merging")
    rows = write_report(out, load_records(out, fp=cfg.accepted_digests()), cfg.tasks, cfg.scans, cfg.n_boot,
                        cfg.bootstrap_seed, cfg.cross_task)
    print(format_table([r for r in rows if r["t"] in (0, 1, cfg.scans)]))
    print(f"wrote {out / 'metrics.csv'}, {out / 'auroc.png'}, {out / 'nll.png'}"
          + (f", {out / 'cross_task.csv'}" if cfg.cross_task and len(cfg.tasks) > 1 else ""))
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    check_numbers(scans=args.scans, repeats=args.repeats, batch_size=args.batch_size, n_samples=args.n_samples,
                  n_sequences=args.n_sequences, temperature=args.temperature, n_boot=args.n_boot, n_test=args.n_test)
    L = ScanGeometry(64).num_locations
    if args.scans > L:
        raise UserError(f"--scans {args.scans} is more than the {L} scan locations")


def run(args: argparse.Namespace) -> int:
    """``boed evaluate`` with parsed flags (see :func:`boed.commands.evaluate.configure`)."""
    out = Path(args.out)
    if args.merge:
        if args.shard is not None or args.restart:
            flag = "--shard " + args.shard if args.shard is not None else "--restart"
            raise UserError(f"--merge merges the records of every shard in --out and computes nothing, so {flag} has no "
                            f"meaning with it; run `boed evaluate --merge --out {out}` alone")
        return finish(out)
    # ---- validate everything before anything is created
    shard, rank, local_rank = _dist_info(args.shard)
    if args.restart and shard[1] > 1:
        raise UserError("--restart with --shard would let each shard move the others' records aside; "
                        f"move {out} aside once yourself (or restart without --shard), then start the shards")
    _check_numbers(args)
    device = parse_device(args.device, local_rank)
    methods = parse_methods(args.methods)
    tasks = canonical_tasks([args.illness] + ([t for t in args.cross_task.split(",") if t.strip()] if args.cross_task else []))
    needed = needed_models(methods)
    for key in needed:
        if getattr(args, flag_attr(key)) is None:
            users = [m for m in methods if key in METHODS[m].models]
            raise UserError(f"method {users[0]} needs {MODEL_FLAGS[key].flag} RUN (a trained model); pass it or drop "
                            f"{users[0]} from --methods")
    classifier = AVPClassifier.from_pretrained(args.avp, map_location=device)
    check_finite_weights(classifier, f"the AVP model in {args.avp}", DAMAGED)
    S = classifier.config.image_size
    if args.image_size is None:
        args.image_size = S
    elif args.image_size != S:
        raise UserError(f"--image-size {args.image_size} differs from the AVP model's {S} px ({args.avp}); drop the flag or use a matching model")
    models, paths = {}, {}
    for key in needed:
        mf, path = MODEL_FLAGS[key], getattr(args, flag_attr(key))
        models[key], paths[key] = mf.load(mf.flag, path, device), str(path)
        s_m = _model_size(models[key])
        if s_m is not None and s_m != S:
            raise UserError(f"the model of {mf.flag} ({path}) works at {s_m} px but the AVP-CNN ({args.avp}) at {S} px; "
                            "train all models at the same --image-size")
    use_models_data(args, {"AVP": args.avp, **{MODEL_FLAGS[key].flag.lstrip("-").upper(): paths[key] for key in needed}},
                    "boed evaluate")
    amp = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    precision = "bf16-autocast" if amp and device.type == "cuda" else "float32"
    if args.precision == "bf16" and device.type != "cuda":
        raise UserError(f"--precision bf16 needs a CUDA device, got --device {args.device} ({device}); use float32 or auto")
    digests = {"avp": weights_digest(args.avp)}
    digests.update({key: MODEL_FLAGS[key].digest(paths[key]) for key in needed})

    legacy = not args.restart and not batch_fingerprinted(out)
    if legacy:
        log.warning("%s was begun before --batch-size was recorded in the fingerprint: resuming it with --batch-size %d "
                    "(a different batch size changes probabilities only at float32 rounding)", out, args.batch_size)

    def config(indices: list[int], data: dict) -> EvalConfig:
        return EvalConfig(batch_in_fingerprint=not legacy, tasks=tasks, methods=methods, scans=args.scans, seed=args.seed, repeats=args.repeats,
                          indices=indices, batch_size=args.batch_size,
                          n_samples=args.n_samples, n_sequences=args.n_sequences, temperature=args.temperature, rng=args.rng,
                          image_size=S, device_type=device.type, precision=precision, n_boot=args.n_boot,
                          cross_task=args.cross_task is not None, data=data,
                          models=digests, paths={"avp": str(args.avp), **paths})

    if not args.restart:  # a changed flag or model is refused before the data is opened (no cache is built)
        precheck_resume(out, config([], {}))
    test_set = dataset_from_args(args, "test")
    if test_set.image_size != S:
        raise UserError(f"test images are {test_set.image_size} px, the AVP-CNN works at {S} px; prepare data with --image-size {S}")
    strata = resolve_illness(tasks[0]).target(test_set.labels) > 0.5 if args.draw == "stratified" else None  # (n,)
    indices = select_test_indices(len(test_set), args.n_test, args.seed, strata)
    check_task_classes(test_set.labels, indices, tasks)  # no AUROC without both classes: say so before any work
    need_train = any(METHODS[m].train_data for m in methods)
    train_set = dataset_from_args(args, "train") if need_train else None
    cfg = config(indices, {"test": test_set.fingerprint, "train": train_set.fingerprint if train_set is not None else None})
    ctx = BuildContext(cfg, classifier, ScanGeometry(S), device, train_set, models, paths, amp=amp)
    policies = build_policies(cfg, ctx)

    # ---- outputs
    distributed = rank[1] > 1 and dist.is_available()
    if distributed and not dist.is_initialized():
        dist.init_process_group("gloo")
    if args.restart and rank[0] == 0 and out.exists():
        moved = move_aside(out)
        print(f"--restart: moved the old {out} to {moved}")
    if distributed:
        dist.barrier()  # nobody reads --out before rank 0 has moved it aside
    ensure_writable_dir(out)
    remove_stale_temps(out)  # of an earlier, killed run
    path = evaluate(policies, classifier, test_set, cfg, out, shard, device, progress=args.progress, rank=rank)
    print(f"records: {path}")
    log.info("t = 1 choices: %d computed, %d shared between methods", ctx.first_cache.misses, ctx.first_cache.hits)

    if distributed:
        dist.barrier()
        if rank[0] != 0:
            return 0
    missing = missing_records(out, cfg)
    if missing:
        print(f"shard {shard[0]}/{shard[1]} done; {missing} records of other shards missing. When all shards have "
              f"finished, run: boed evaluate --merge --out {out}")
        return 0
    return finish(out)
