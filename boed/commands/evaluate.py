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

Methods come from the one method table, boed.evaluation.methods.METHODS (names, spellings, the
models each needs, its builder); this module only declares the flags (the run is
boed.evaluation.run).
"""

from __future__ import annotations

import argparse

from xray.cli_base import MAX_TEMPERATURE, add_device_arg, finite_float, set_help
from xray.dataset import add_data_args, models_data_help

from boed.evaluation.config import DEFAULT_DRAW, DEFAULT_REPEATS, DRAWS, PAPER_TASKS
from boed.evaluation.methods import METHODS, MODEL_FLAGS, method_names
from boed.evaluation.run import flag_attr, run

HELP = "evaluate scan policies: AUROC/NLL after 0..T scans, repeated policy seeds, bootstrap CIs, plots"

DEFAULT_METHODS = "eig,epe,random,uncond,nongreedy,full"
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


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--illness", default="effusion", help="the task whose probability the EIG targets (default: effusion)")
    p.add_argument("--scans", type=int, default=DEFAULT_SCANS, help=f"T, scans per image (default: {DEFAULT_SCANS})")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma list of {', '.join(method_names())} (short: {', '.join(a for m in METHODS.values() for a in m.aliases)}) "
                        f"(default: {DEFAULT_METHODS})")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                   help="R policy seeds: every policy-level random choice (t = 1 draws, Uncond and non-greedy "
                        "sequences, sample streams, Random) is redrawn per repeat; intervals bootstrap repeats and "
                        f"images; R >= 1 (default: {DEFAULT_REPEATS})")
    p.add_argument("--n-test", type=int, default=None, help="test images drawn at random from the test split (default: all)")
    p.add_argument("--draw", choices=DRAWS, default=DEFAULT_DRAW,
                   help="how --n-test images are drawn: uniform (the published results), or stratified by the "
                        "--illness label, keeping the split's prevalence and at least one image of each class "
                        f"(default: {DEFAULT_DRAW})")
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
        p.add_argument(mf.flag, dest=flag_attr(key), metavar="DIR", default=mf.default, help=f"{mf.help} (default: {mf.default or 'none'})")
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
    p.add_argument("--temperature", type=finite_float(0, MAX_TEMPERATURE, lo_open=True), default=DEFAULT_TEMPERATURE,
                   help=f"IPA sampling temperature (default: {DEFAULT_TEMPERATURE}, the paper's)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    add_data_args(p)
    p.set_defaults(image_size=None, data=None)  # the AVP model decides S; the data: the models' record (use_models_data)
    set_help(p, "--data", models_data_help())
    set_help(p, "--image-size", "image side in pixels; must match the models (default: the AVP-CNN's size)")


def main(args: argparse.Namespace) -> int:
    return run(args)
