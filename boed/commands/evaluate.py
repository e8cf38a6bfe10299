"""Evaluate scan policies: AUROC/NLL of the AVP-CNN after t = 0..T scans (paper fig. 5, 8, 9),
repeated over R policy seeds, with two-level bootstrap intervals (repeats, then test images).

Example:
  boed evaluate --illness effusion --scans 5 --methods eig,epe,random,uncond,nongreedy,full \\
      --repeats 3 --n-test 500 --out runs/eval --ipa runs/demo/ipa --avp runs/demo/avp
  # the completer study: --methods eig,uncond,ipar,retrieval,ipa-under --ipar RUN --ipa-under RUN
  # across machines: --shard 0/4 ... --shard 3/4, then `boed evaluate --merge --out runs/eval`
  # one machine, several GPUs: torchrun --nproc-per-node 4 -m boed.cli evaluate ...

Records go to OUT/records*.jsonl as they are computed; re-running the same command resumes (after
checking that models, data and flags are the same: otherwise a one-line error; --restart moves the
old outputs aside and starts over). When every shard is complete, OUT/metrics.csv, paired.csv,
auroc.png, nll.png, paired.png (and cross_task.* with --cross-task) are written.

Methods are built from the table METHOD_BUILDERS (method -> the models it needs and a builder);
models from MODEL_FLAGS (flag -> loader). Adding a method is one entry in each table plus its
spellings in boed.evaluate.METHOD_ALIASES.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from xray.cli_base import add_device_arg, parse_device, set_help
from xray.errors import UserError

HELP = "evaluate scan policies: AUROC/NLL after 0..T scans, repeated policy seeds, bootstrap CIs, plots"
log = logging.getLogger(__name__)

DEFAULT_METHODS = "eig,epe,random,uncond,nongreedy,full"
DEFAULT_IPA = "runs/demo/ipa"
DEFAULT_AVP = "runs/demo/avp"
DEFAULT_N_SAMPLES = 10
DEFAULT_N_SEQUENCES = 289
DEFAULT_BATCH = 16
DEFAULT_N_BOOT = 1000
DEFAULT_TEMPERATURE = 1.0
DEFAULT_SCANS = 5
DEFAULT_SEED = 0
PRECISIONS = ("auto", "float32", "bf16")
DEFAULT_PRECISION = "float32"  # bf16 agreed on 99.1 % of greedy choices, below the 99 % bar with its CI (benchmarks/results/precision.json)


# ----------------------------------------------------------------------------- models and methods
def _load_ipa_model(flag: str, path: str, device, objective: str | None = None):
    from ipa_core.ipa import IPA

    try:
        model = IPA.from_pretrained(path, map_location=device).eval()
    except UserError as e:
        how = "--objective reverse " if objective == "reverse" else ""
        raise UserError(f"{flag} {path}: {e} (train one with `ipa_core train --stage ipa {how}--out {path}`)") from None
    got = getattr(model.config, "objective", "forward")
    if objective is not None and got != objective:
        raise UserError(f"{flag} {path} holds an IPA trained with objective {got!r}, expected {objective!r}; "
                        f"pass a run trained with `ipa_core train --stage ipa --objective {objective}`")
    return model


def _model_digest(path: str) -> str:
    from ipa_core.persist import WEIGHTS_NAME, resolve_model_dir
    from xray.provenance import file_digest

    return file_digest(resolve_model_dir(path) / WEIGHTS_NAME)


@dataclass(frozen=True)
class ModelFlag:
    """A model a method may need: its CLI flag, default, help and loader."""

    flag: str
    default: str | None
    help: str
    load: Callable[[str, str, Any], Any]  # (flag, path, device) -> model
    digest: Callable[[str], str] = _model_digest  # path -> digest of the weights (provenance)


MODEL_FLAGS: dict[str, ModelFlag] = {
    "ipa": ModelFlag("--ipa", DEFAULT_IPA, "IPA run or model dir", lambda f, p, d: _load_ipa_model(f, p, d, "forward")),
    "ipar": ModelFlag("--ipar", None, "IPA-R run or model dir (reverse-KL IPA) for method eig-ipar",
                      lambda f, p, d: _load_ipa_model(f, p, d, "reverse")),
    "ipa-under": ModelFlag("--ipa-under", None, "an under-trained IPA run (e.g. 1/8 of the steps) for method eig-ipa-under",
                           lambda f, p, d: _load_ipa_model(f, p, d, "forward")),
    # amortised policies: loaded per scan task by their builder (a policy knows its illness and grid)
    "distilled": ModelFlag("--distilled", None, "policy run of method distilled (`boed train-policy --method distill`)",
                           lambda f, p, d: _check_policy_dir(f, p)),
    "gdfs": ModelFlag("--gdfs", None, "policy run of method gdfs (`boed train-policy --method gdfs`)",
                      lambda f, p, d: _check_policy_dir(f, p)),
}


def _check_policy_dir(flag: str, path: str) -> str:
    from boed.amortised.network import PolicyNet

    PolicyNet.from_pretrained(path)  # one-line UserError when it is not a policy run
    return str(path)


@dataclass
class BuildContext:
    """What every policy builder gets."""

    cfg: Any  # boed.evaluate.EvalConfig
    classifier: torch.nn.Module
    geometry: Any  # boed.geometry.ScanGeometry
    device: torch.device
    train_set: Any  # training split (t = 1 draws, Uncond, retrieval database), or None
    models: dict = field(default_factory=dict)  # MODEL_FLAGS key -> loaded model
    paths: dict = field(default_factory=dict)  # MODEL_FLAGS key -> path given
    amp: bool = True
    first_cache: Any = None  # boed.policies.FirstChoiceCache shared by all policies

    def dataset_sampler(self):
        from boed.samplers import DatasetSampler

        return DatasetSampler(self.train_set)

    def greedy(self, method: str, task: str, sampler, estimator: str = "eig"):
        from boed.policies import GreedyPolicy

        return GreedyPolicy(self.classifier, sampler, task, self.geometry, n_samples=self.cfg.n_samples,
                            estimator=estimator, first_sampler=self.dataset_sampler(), device=self.device,
                            name=method, amp=self.amp, first_cache=self.first_cache)

    def ipa_sampler(self, key: str):
        from boed.samplers import IPASampler

        return IPASampler(self.models[key], temperature=self.cfg.temperature, amp=self.amp)


def _greedy_ipa(key: str, estimator: str = "eig"):
    return lambda ctx, method, task: ctx.greedy(method, task, ctx.ipa_sampler(key), estimator)


def _retrieval(ctx: BuildContext, method: str, task: str):
    from baselines.samplers import RetrievalSampler

    if not hasattr(ctx, "_retrieval"):  # one database for every task
        ctx._retrieval = RetrievalSampler(ctx.train_set)
    return ctx.greedy(method, task, ctx._retrieval)


def _uncond(ctx: BuildContext, method: str, task: str):
    from baselines.policies import UncondPolicy

    return UncondPolicy(ctx.classifier, ctx.dataset_sampler(), task, ctx.geometry, n_samples=ctx.cfg.n_samples,
                        device=ctx.device, amp=ctx.amp, first_cache=ctx.first_cache)


def _nongreedy(ctx: BuildContext, method: str, task: str):
    from baselines.policies import NonGreedyUncondPolicy

    return NonGreedyUncondPolicy(ctx.classifier, ctx.dataset_sampler(), task, ctx.geometry, n_samples=ctx.cfg.n_samples,
                                 n_sequences=ctx.cfg.n_sequences, scans=ctx.cfg.scans, device=ctx.device, amp=ctx.amp,
                                 first_cache=ctx.first_cache)


def _amortised(ctx: BuildContext, method: str, task: str):
    from boed.amortised import load_policy

    return load_policy(ctx.paths[method], task, ctx.geometry, ctx.device)


def _random(ctx: BuildContext, method: str, task):
    from baselines.policies import RandomPolicy

    return RandomPolicy(ctx.geometry)


def _full(ctx: BuildContext, method: str, task):
    from baselines.policies import FullImagePolicy

    return FullImagePolicy()


@dataclass(frozen=True)
class MethodBuilder:
    """How to build a method's policy for one scan task: the models (MODEL_FLAGS keys) it needs,
    whether it needs the training split, and ``build(ctx, method, task) -> policy``."""

    models: tuple[str, ...]
    train_data: bool
    build: Callable[[BuildContext, str, Any], Any]


METHOD_BUILDERS: dict[str, MethodBuilder] = {
    "eig-ipa": MethodBuilder(("ipa",), True, _greedy_ipa("ipa", "eig")),
    "epe-ipa": MethodBuilder(("ipa",), True, _greedy_ipa("ipa", "epe")),
    "eig-ipar": MethodBuilder(("ipar",), True, _greedy_ipa("ipar", "eig")),
    "eig-ipa-under": MethodBuilder(("ipa-under",), True, _greedy_ipa("ipa-under", "eig")),
    "eig-retrieval": MethodBuilder((), True, _retrieval),
    "uncond": MethodBuilder((), True, _uncond),
    "nongreedy": MethodBuilder((), True, _nongreedy),
    "distilled": MethodBuilder(("distilled",), False, _amortised),
    "gdfs": MethodBuilder(("gdfs",), False, _amortised),
    "random": MethodBuilder((), False, _random),
    "full": MethodBuilder((), False, _full),
}


def build_policies(cfg, ctx: BuildContext) -> dict:
    """The policy of every (method, scan task) of ``cfg``, from :data:`METHOD_BUILDERS`."""
    from boed.policies import FirstChoiceCache

    if ctx.first_cache is None:
        ctx.first_cache = FirstChoiceCache()
    return {(m, t): METHOD_BUILDERS[m].build(ctx, m, t) for m, t in cfg.jobs()}


# ----------------------------------------------------------------------------- flags
def _attr(key: str) -> str:
    return key.replace("-", "_")


def configure(p: argparse.ArgumentParser) -> None:
    from xray.dataset import add_data_args

    from boed.evaluate import DEFAULT_REPEATS, PAPER_TASKS, method_names

    p.add_argument("--illness", default="effusion", help="the task whose probability the EIG targets (default: effusion)")
    p.add_argument("--scans", type=int, default=DEFAULT_SCANS, help=f"T, scans per image (default: {DEFAULT_SCANS})")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma list of {', '.join(method_names())} (short: eig, epe, ipar, retrieval, ipa-under) "
                        f"(default: {DEFAULT_METHODS})")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                   help="R policy seeds: every policy-level random choice (t = 1 draws, Uncond and non-greedy "
                        "sequences, sample streams, Random) is redrawn per repeat; intervals bootstrap repeats and "
                        f"images; R >= 1 (default: {DEFAULT_REPEATS})")
    p.add_argument("--n-test", type=int, default=None, help="test images drawn at random from the test split (default: all)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed of the test subset and of every policy's randomness (default: {DEFAULT_SEED})")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (records, metrics.csv, plots); re-run to resume")
    p.add_argument("--restart", action="store_true",
                   help="move the old contents of --out aside (OUT.old-<time>) and start over")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="evaluate only shard I of N; under torchrun each rank takes its part of the shard (default: all of it)")
    p.add_argument("--merge", action="store_true", help="only merge the records of all shards in --out into metrics and plots")
    p.add_argument("--cross-task", nargs="?", const=",".join(PAPER_TASKS), default=None, metavar="LIST",
                   help=f"also scan with each of these tasks' locations and score every task (fig. 9); off unless "
                        f"given; without a value: {', '.join(PAPER_TASKS)}")
    p.add_argument("--avp", default=DEFAULT_AVP, metavar="DIR", help=f"AVP-CNN run or model folder (default: {DEFAULT_AVP})")
    for key, mf in MODEL_FLAGS.items():
        p.add_argument(mf.flag, dest=_attr(key), metavar="DIR", default=mf.default, help=f"{mf.help} (default: {mf.default or 'none'})")
    p.add_argument("--n-samples", type=int, default=DEFAULT_N_SAMPLES,
                   help=f"N completions per EIG estimate (default: {DEFAULT_N_SAMPLES})")
    p.add_argument("--n-sequences", type=int, default=DEFAULT_N_SEQUENCES,
                   help=f"candidate scan sets per budget t of the non-greedy baseline (default: {DEFAULT_N_SEQUENCES})")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"test images per batch (default: {DEFAULT_BATCH})")
    p.add_argument("--rng", choices=("image", "batch"), default="image",
                   help="image: a generator per test image, results independent of batching; "
                        "batch: one policy call per batch, faster with batched samplers, results depend on --batch-size "
                        "(default: image)")
    p.add_argument("--n-boot", type=int, default=DEFAULT_N_BOOT,
                   help=f"bootstrap resamples for the 95%% intervals (default: {DEFAULT_N_BOOT})")
    add_device_arg(p)
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help="scoring and sampling precision: auto = bf16 autocast on CUDA, float32 on the CPU "
                        f"(default: {DEFAULT_PRECISION})")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"IPA sampling temperature (default: {DEFAULT_TEMPERATURE}, the paper's)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    add_data_args(p)
    p.set_defaults(image_size=None)  # the AVP model decides S unless --image-size is given
    set_help(p, "--image-size", "image side in pixels; must match the models (default: the AVP-CNN's size)")


def _dist_info(shard_flag: str | None) -> tuple[tuple[int, int], tuple[int, int], int | None]:
    """(shard, rank, local_rank): --shard (default 0/1); torchrun's RANK/WORLD_SIZE split it further."""
    from boed.evaluate import parse_shard

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


def finish(out: Path) -> int:
    """Merge the records of every shard into metrics and plots (when complete and consistent)."""
    from boed.evaluate import check_shards, config_from_out, load_records, missing_records
    from boed.report import format_table, write_report

    if not out.is_dir():
        raise UserError(f"no evaluation in {out} (the folder does not exist); run `boed evaluate --out {out} ...` first")
    cfg = config_from_out(out)
    check_shards(out, cfg)
    missing = missing_records(out, cfg)
    if missing:
        raise UserError(f"{out} lacks {missing} of {len(cfg.expected_keys())} records; finish every shard "
                        "(re-run its command) before merging")
    rows = write_report(out, load_records(out, fp=cfg.fingerprint_digest()), cfg.tasks, cfg.scans, cfg.n_boot,
                        cfg.bootstrap_seed, cfg.cross_task)
    print(format_table([r for r in rows if r["t"] in (0, 1, cfg.scans)]))
    print(f"wrote {out / 'metrics.csv'}, {out / 'auroc.png'}, {out / 'nll.png'}"
          + (f", {out / 'cross_task.csv'}" if cfg.cross_task and len(cfg.tasks) > 1 else ""))
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    from boed.geometry import ScanGeometry

    checks = [("--repeats", args.repeats, 1, "policy seeds"), ("--n-samples", args.n_samples, 1, "completions"),
              ("--n-sequences", args.n_sequences, 1, "candidate sets"), ("--batch-size", args.batch_size, 1, "images"),
              ("--scans", args.scans, 1, "scans"), ("--n-boot", args.n_boot, 0, "resamples")]
    for flag, v, lo, what in checks:
        if v < lo:
            raise UserError(f"{flag} must be >= {lo} ({what}), got {v}")
    if args.n_test is not None and args.n_test < 1:
        raise UserError(f"--n-test must be >= 1, got {args.n_test}")
    if not args.temperature > 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}")
    L = ScanGeometry(64).num_locations
    if args.scans > L:
        raise UserError(f"--scans {args.scans} is more than the {L} scan locations")


def main(args: argparse.Namespace) -> int:
    from xray.dataset import dataset_from_args
    from xray.io import ensure_writable_dir
    from xray.provenance import move_aside

    from boed.classifier import AVPClassifier
    from boed.evaluate import EvalConfig, canonical_tasks, evaluate, missing_records, parse_methods, select_test_indices
    from boed.geometry import ScanGeometry

    out = Path(args.out)
    if args.merge:
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
    needed = list(dict.fromkeys(k for m in methods for k in METHOD_BUILDERS[m].models))
    for key in needed:
        if getattr(args, _attr(key)) is None:
            users = [m for m in methods if key in METHOD_BUILDERS[m].models]
            raise UserError(f"method {users[0]} needs {MODEL_FLAGS[key].flag} RUN (a trained model); pass it or drop "
                            f"{users[0]} from --methods")
    classifier = AVPClassifier.from_pretrained(args.avp, map_location=device)
    S = classifier.config.image_size
    if args.image_size is None:
        args.image_size = S
    elif args.image_size != S:
        raise UserError(f"--image-size {args.image_size} differs from the AVP model's {S} px ({args.avp}); drop the flag or use a matching model")
    models, paths = {}, {}
    for key in needed:
        mf, path = MODEL_FLAGS[key], getattr(args, _attr(key))
        models[key], paths[key] = mf.load(mf.flag, path, device), str(path)
        s_m = _model_size(models[key])
        if s_m is not None and s_m != S:
            raise UserError(f"the model of {mf.flag} ({path}) works at {s_m} px but the AVP-CNN ({args.avp}) at {S} px; "
                            "train all models at the same --image-size")
    test_set = dataset_from_args(args, "test")
    if test_set.image_size != S:
        raise UserError(f"test images are {test_set.image_size} px, the AVP-CNN works at {S} px; prepare data with --image-size {S}")
    need_train = any(METHOD_BUILDERS[m].train_data for m in methods)
    train_set = dataset_from_args(args, "train") if need_train else None
    amp = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    precision = "bf16-autocast" if amp and device.type == "cuda" else "float32"
    if args.precision == "bf16" and device.type != "cuda":
        raise UserError(f"--precision bf16 needs a CUDA device, got --device {args.device} ({device}); use float32 or auto")
    digests = {"avp": _model_digest(args.avp)}
    digests.update({key: MODEL_FLAGS[key].digest(paths[key]) for key in needed})
    cfg = EvalConfig(tasks=tasks, methods=methods, scans=args.scans, seed=args.seed, repeats=args.repeats,
                     indices=select_test_indices(len(test_set), args.n_test, args.seed), batch_size=args.batch_size,
                     n_samples=args.n_samples, n_sequences=args.n_sequences, temperature=args.temperature, rng=args.rng,
                     image_size=S, device_type=device.type, precision=precision, n_boot=args.n_boot,
                     cross_task=args.cross_task is not None,
                     data={"test": test_set.fingerprint, "train": train_set.fingerprint if train_set is not None else None},
                     models=digests, paths={"avp": str(args.avp), **paths})
    ctx = BuildContext(cfg, classifier, ScanGeometry(S), device, train_set, models, paths, amp=amp)
    policies = build_policies(cfg, ctx)

    # ---- outputs
    dist = None
    if rank[1] > 1 and torch.distributed.is_available():
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
    if args.restart and rank[0] == 0 and out.exists():
        moved = move_aside(out)
        print(f"--restart: moved the old {out} to {moved}")
    if dist is not None:
        dist.barrier()  # nobody reads --out before rank 0 has moved it aside
    ensure_writable_dir(out)
    path = evaluate(policies, classifier, test_set, cfg, out, shard, device, progress=args.progress, rank=rank)
    print(f"records: {path}")
    log.info("t = 1 choices: %d computed, %d shared between methods", ctx.first_cache.misses, ctx.first_cache.hits)

    if dist is not None:
        dist.barrier()
        if rank[0] != 0:
            return 0
    missing = missing_records(out, cfg)
    if missing:
        print(f"shard {shard[0]}/{shard[1]} done; {missing} records of other shards missing. When all shards have "
              f"finished, run: boed evaluate --merge --out {out}")
        return 0
    return finish(out)
