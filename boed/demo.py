"""The demo pipeline: prepare -> VAE -> IPA -> AVP-CNN -> `boed run` figures -> `boed evaluate`.

Each stage runs one of the toolkit's own commands (the same code path a user types), in its own
folder under the run directory. A stage that finished writes ``<stage>/done.json`` (its wall time
and the command it ran); a rerun skips it, and a stage that was killed resumes through the
command's own checkpointing. Profiles size the run: ``cpu`` (S = 64, tiny models, about half an
hour on 2 cores), ``quick`` (a few minutes; used by the end-to-end test) and ``paper`` (S = 256,
the xray256 VAE, a DenseNet-121 AVP-CNN, N = 10, 5 000 test images, the paper's step counts).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import platform
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from xray.errors import UserError
from xray.io import atomic_write_json, atomic_write_text, ensure_writable_dir
from xray.labels import resolve_illness

log = logging.getLogger("boed.demo")

METHODS = ("eig", "epe", "random", "uncond", "nongreedy", "full")
STAGES = ("data", "vae", "ipa", "avp", "scans", "eval")


@dataclass(frozen=True)
class DemoProfile:
    name: str
    image_size: int
    vae_config: str
    vae_steps: int
    vae_batch: int
    ipa_steps: int
    ipa_batch: int
    avp_arch: str
    avp_steps: int
    avp_batch: int
    avp_lr: float
    n_samples: int  # N completions per EIG evaluation
    n_test: int  # test images per illness in the evaluation
    scans: int  # T
    run_images: int  # test images per illness shown with `boed run` heatmaps
    phantom_n: int | None = None  # None: the default phantom set; else a private set of this size
    phantom_size: int | None = None
    eval_batch: int = 16
    eval_procs: int = 1  # evaluation shards run side by side (one thread each) on a multi-core CPU


PROFILES: dict[str, DemoProfile] = {
    "cpu": DemoProfile("cpu", image_size=64, vae_config="tiny", vae_steps=800, vae_batch=8,
                       ipa_steps=1000, ipa_batch=16, avp_arch="tiny", avp_steps=2000, avp_batch=32, avp_lr=2e-3,
                       n_samples=10, n_test=200, scans=5, run_images=2, eval_procs=2),
    "quick": DemoProfile("quick", image_size=64, vae_config="tiny", vae_steps=60, vae_batch=16,
                         ipa_steps=40, ipa_batch=16, avp_arch="tiny", avp_steps=80, avp_batch=32, avp_lr=2e-3,
                         n_samples=4, n_test=24, scans=3, run_images=1, phantom_n=400, phantom_size=64, eval_procs=2),
    "paper": DemoProfile("paper", image_size=256, vae_config="xray256", vae_steps=1_000_000, vae_batch=8,
                         ipa_steps=180_000, ipa_batch=8, avp_arch="densenet121", avp_steps=32_000, avp_batch=32,
                         avp_lr=1e-5, n_samples=10, n_test=5000, scans=5, run_images=3, eval_batch=8),
}


@dataclass
class DemoOptions:
    out: Path
    profile: DemoProfile
    illnesses: tuple[str, ...]
    data_root: Path | None = None
    cache_dir: Path | None = None
    device: str = "cpu"
    seed: int = 0
    until: str = "eval"  # last stage to run (smoke tests stop early)


# ----------------------------------------------------------------------------------------------


def run_command(module: str, argv: Sequence[str]) -> None:
    """Run one subcommand module in-process with its own argument parser (exactly as the CLI would)."""
    mod = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog=module)
    mod.configure(parser)
    args = parser.parse_args([str(a) for a in argv])
    code = mod.main(args)
    if code:
        raise UserError(f"stage command {module} exited with status {code}")


def run_sharded(module: str, argv: Sequence[str], procs: int) -> None:
    """Run ``python -m <package>.cli <command> argv --shard i/procs`` in ``procs`` processes, one
    thread each (small networks use 2 cores better as 2 processes than as 2 threads), then merge."""
    import os
    import subprocess
    import sys

    pkg, _, cmd = module.partition(".commands.")
    base = [sys.executable, "-m", f"{pkg}.cli", cmd.replace("_", "-"), *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    children = [subprocess.Popen(base + ["--shard", f"{i}/{procs}"] + ([] if i == 0 else ["--no-progress"]), env=env)
                for i in range(procs)]
    codes = [c.wait() for c in children]
    if any(codes):
        raise UserError(f"{' '.join(base[2:5])}: shard exit codes {codes}; rerun the demo to resume the unfinished shards")
    out = list(argv)[list(argv).index("--out") + 1]
    run_command(module, ["--merge", "--out", out])


def _stage(opts: DemoOptions, name: str, cli: str, target: str | Callable, argv: list, timings: dict) -> None:
    """Run a stage (a command module with its argv, or a function of ``opts``) unless
    ``<out>/<name>/done.json`` says it finished; record its wall time."""
    done = opts.out / name / "done.json"
    line = f"{cli} " + " ".join(shlex.quote(str(a)) for a in argv)
    if done.is_file():
        timings[name] = json.loads(done.read_text())["seconds"]
        log.info("[%s] done already (%.0f s): %s", name, timings[name], line)
        return
    log.info("[%s] %s", name, line)
    t0 = time.perf_counter()
    if callable(target):
        target(opts)
    elif cli == "boed evaluate" and opts.profile.eval_procs > 1:
        run_sharded(target, argv, opts.profile.eval_procs)
    else:
        run_command(target, argv)
    seconds = time.perf_counter() - t0
    timings[name] = seconds
    atomic_write_json(done, {"seconds": seconds, "command": line})
    log.info("[%s] finished in %.0f s", name, seconds)


def _data_args(opts: DemoOptions) -> list:
    args = ["--image-size", opts.profile.image_size]
    if opts.data_root is not None:
        args += ["--data", "chestxray", "--data-root", opts.data_root]
    else:
        args += ["--data", "phantom"]
    if opts.cache_dir is not None:
        args += ["--cache-dir", opts.cache_dir]
    return args


def _train_args(opts: DemoOptions, steps: int, batch: int) -> list:
    return ["--steps", steps, "--batch-size", batch, "--device", opts.device, "--seed", opts.seed]


def _prepare_data(opts: DemoOptions) -> None:
    """Generate (phantom) and prepare the image cache once, so that later stages only read it."""
    from xray.dataset import open_dataset

    data = "chestxray" if opts.data_root is not None else "phantom"
    open_dataset(data, opts.data_root, size=opts.profile.image_size, split="all", cache_dir=opts.cache_dir)


def run_demo(opts: DemoOptions) -> dict:
    """Run the stages up to ``opts.until``; return the summary (also written to ``<out>/summary.json``)."""
    p, out = opts.profile, ensure_writable_dir(opts.out)
    timings: dict[str, float] = {}
    if opts.data_root is None and p.phantom_n is not None:  # a private small phantom set, in the NIH format
        opts.data_root = out / "phantom"
        _stage(opts, "phantom", "xray phantom", "xray.commands.phantom",
               ["--out", opts.data_root, "--n", p.phantom_n, "--size", p.phantom_size or p.image_size,
                "--seed", opts.seed, "--demo-prevalence"], timings)
    data = _data_args(opts)
    models = ["--ipa", out / "ipa", "--avp", out / "avp", "--device", opts.device]
    stages: list[tuple[str, str, str | Callable, list]] = [
        ("data", "prepare", _prepare_data, []),
        ("vae", "ipa_core train", "ipa_core.commands.train",
         ["--stage", "vae", "--config", p.vae_config, "--out", out / "vae", *data, *_train_args(opts, p.vae_steps, p.vae_batch)]),
        ("ipa", "ipa_core train", "ipa_core.commands.train",
         ["--stage", "ipa", "--vae", out / "vae", "--out", out / "ipa", *data, *_train_args(opts, p.ipa_steps, p.ipa_batch)]),
        ("avp", "boed train-avp", "boed.commands.train_avp",
         ["--arch", p.avp_arch, "--out", out / "avp", "--lr", p.avp_lr, *data, *_train_args(opts, p.avp_steps, p.avp_batch)]),
    ]
    for ill in opts.illnesses:
        slug = resolve_illness(ill).slug
        stages += [(f"scans/{slug}-{i}", "boed run", "boed.commands.run",
                    ["--illness", ill, "--scans", p.scans, "--index", i, "--n-samples", p.n_samples, "--seed", opts.seed,
                     "--out", out / "scans" / f"{slug}-{i}", *models, *data]) for i in range(p.run_images)]
        stages.append((f"eval/{slug}", "boed evaluate", "boed.commands.evaluate",
                       ["--illness", ill, "--scans", p.scans, "--methods", ",".join(METHODS), "--n-test", p.n_test,
                        "--n-samples", p.n_samples, "--seed", opts.seed, "--batch-size", p.eval_batch,
                        "--out", out / "eval" / slug, *models, *data]))
    last = STAGES.index(opts.until)
    for name, cli, target, argv in stages:
        if STAGES.index(name.split("/")[0]) <= last:
            _stage(opts, name, cli, target, argv, timings)
    timings["total"] = sum(timings.values())  # the whole demo's wall time, skipped stages included
    return summarize(opts, timings)


def summarize(opts: DemoOptions, timings: dict[str, float]) -> dict:
    """Collect every illness's metrics.csv into one table; write summary.{json,md}."""
    import pandas as pd

    def collect(name: str):
        files = [opts.out / "eval" / resolve_illness(ill).slug / name for ill in opts.illnesses]
        frames = [pd.read_csv(f, dtype={"t": str} if name == "paired.csv" else None) for f in files if f.is_file()]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    table, paired = collect("metrics.csv"), collect("paired.csv")
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    summary = {"profile": dataclasses.asdict(opts.profile), "illnesses": list(opts.illnesses), "timings_s": timings,
               "machine": machine, "metrics": table.to_dict(orient="records"), "paired": paired.to_dict(orient="records")}
    atomic_write_json(opts.out / "summary.json", summary)
    atomic_write_text(opts.out / "summary.md", render_summary(table, timings, machine, paired))
    return summary


def render_paired(paired) -> list[str]:
    """Markdown: EIG-IPA minus each method, averaged over t = 1..T, with paired 95 % CIs."""
    if not len(paired):
        return []
    avg = paired[paired["t"].astype(str).str.contains("-")]
    if not len(avg):
        return []
    span = avg["t"].iloc[0]
    lines = [f"### EIG-IPA minus each method: AUROC averaged over t = {span.replace('-', '..')}, paired on the same images", "",
             "Paired bootstrap 95 % CI (the same resampled images for both methods and every t); "
             "P = fraction of resamples in which EIG-IPA is ahead.", "",
             "| illness | method | difference [95 % CI] | P |", "|---|---|---|---|"]
    for r in avg.itertuples():
        lines.append(f"| {r.illness} | {r.baseline} | {r.diff:+.3f} [{r.diff_lo:+.3f}, {r.diff_hi:+.3f}] | {r.p_above:.2f} |")
    return lines + [""]


def render_summary(table, timings: dict[str, float], machine: str, paired=None) -> str:
    """Markdown: AUROC [95 % CI] per method and t, one block per illness, the paired differences,
    then stage wall times."""
    lines = []
    if len(table):
        for ill, g in table.groupby("illness", sort=False):
            ts = sorted(g["t"].unique())
            lines += [f"### {ill}: AUROC [95 % bootstrap CI] after t scans (n = {int(g['n'].max())})", "",
                      "| method | " + " | ".join(f"t={t}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
            for m, gm in g.groupby("method", sort=False):
                cells = {int(r.t): f"{r.auroc:.3f} [{r.auroc_lo:.3f}, {r.auroc_hi:.3f}]" for r in gm.itertuples()}
                lines.append(f"| {m} | " + " | ".join(cells.get(t, "") for t in ts) + " |")
            lines.append("")
    if paired is not None:
        lines += render_paired(paired)
    lines += ["### Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += ["", f"Machine: {machine}", ""]
    return "\n".join(lines)
