"""The demo pipeline: prepare -> VAE -> IPA -> AVP-CNN -> `boed run` figures -> `boed evaluate`.

Each stage runs one of the toolkit's own commands (the same code path a user types), in its own
folder under the run directory. A stage that finished writes ``<stage>/done.json`` (its wall time
and the command it ran); a rerun skips it, and a stage that was killed resumes through the
command's own checkpointing. ``done.json`` also holds the stage's *fingerprint* (its command's
result-changing arguments, the data fingerprint, the fingerprints of the stages it depends on):
when it differs (another ``--data-root``, profile, seed, step cap, device ...) the stage's old
folder is moved aside (``<name>.old-<time>``) and the stage reruns, and so does every stage after
it, whose fingerprints include this one's. Profiles size the run: ``cpu`` (S = 64, tiny models, about half an
hour on 2 cores), ``quick`` (a few minutes; used by the end-to-end test) and ``paper`` (S = 256,
the xray256 VAE, a DenseNet-121 AVP-CNN, N = 10, 5 000 test images, the paper's step counts).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import json
import logging
import platform
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from xray.cli_base import run_command
from xray.dataset import open_dataset
from xray.errors import UserError
from xray.io import atomic_write_json, atomic_write_text, ensure_writable_dir
from xray.labels import resolve_illness
from xray.provenance import digest, move_aside

from .amortised.demo import policy_dir
from .amortised.demo import policy_stages as policy_entries

log = logging.getLogger("boed.demo")

METHODS = ("eig", "epe", "random", "uncond", "nongreedy", "full")
STAGES = ("data", "vae", "ipa", "avp", "policy", "scans", "eval")


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
    repeats: int = 3  # policy seeds of the evaluation (`boed evaluate --repeats`)
    avp_init: str = "scratch"  # `boed train-avp --init`: scratch or imagenet (paper appendix I.4)
    checkpointing: bool = False  # activation checkpointing of the VAE/IPA blocks (`ipa_core train --checkpointing`)


PROFILES: dict[str, DemoProfile] = {
    "cpu": DemoProfile("cpu", image_size=64, vae_config="tiny", vae_steps=800, vae_batch=8,
                       ipa_steps=1000, ipa_batch=16, avp_arch="tiny", avp_steps=2000, avp_batch=32, avp_lr=2e-3,
                       n_samples=10, n_test=100, scans=5, run_images=2, eval_procs=2, repeats=3),
    "quick": DemoProfile("quick", image_size=64, vae_config="tiny", vae_steps=60, vae_batch=16,
                         ipa_steps=40, ipa_batch=16, avp_arch="tiny", avp_steps=80, avp_batch=32, avp_lr=2e-3,
                         n_samples=4, n_test=24, scans=3, run_images=1, phantom_n=400, phantom_size=64, eval_procs=2,
                         repeats=2),
    "paper": DemoProfile("paper", image_size=256, vae_config="xray256", vae_steps=1_000_000, vae_batch=8,
                         ipa_steps=180_000, ipa_batch=8, avp_arch="densenet121", avp_steps=32_000, avp_batch=32,
                         avp_lr=1e-5, avp_init="imagenet", checkpointing=True, n_samples=10, n_test=5000, scans=5, run_images=3, eval_batch=8),
}


@dataclass
class DemoOptions:
    out: Path
    profile: DemoProfile
    illnesses: tuple[str, ...]
    data_root: Path | None = None
    cache_dir: Path | None = None
    device: str = "cpu"  # a resolved device (``xray.cli_base.parse_device``), passed to every stage
    seed: int = 0
    until: str = "eval"  # last stage to run (smoke tests stop early)
    max_images: int | None = None  # cap each split (whole patients first), for a CPU run on real data
    present_only: bool = False  # use the listed images that are present (a partial NIH download)
    avp_init_weights: Path | None = None  # a local copy of the pretrained AVP backbone's weights (offline)
    with_policies: bool = False  # also train the amortised policies (distilled EIG-IPA, GDFS) and evaluate them
    eval_images: int | None = None  # `--eval-images` of every training stage (None: the commands' own)
    sample_n: int | None = None  # `ipa_core train --sample-n` (None: the command's own)


@dataclass
class Stage:
    """One step of the pipeline: a command module run with ``argv`` (or a function of the options
    returning a JSON-able result), in the folder ``<out>/<name>``, after the stages ``upstream``."""

    name: str
    cli: str  # how a user would type it (log and done.json)
    target: str | Callable
    argv: list
    upstream: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------
# running commands


def run_sharded(module: str, argv: Sequence[str], procs: int) -> None:
    """Run ``python -m <package>.cli <command> argv --shard i/procs`` in ``procs`` processes, one
    thread each (small networks use 2 cores better as 2 processes than as 2 threads), then merge."""
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


# ----------------------------------------------------------------------------------------------
# fingerprints: a stage reruns when what it depends on changed, and so does everything after it


def _fingerprint_argv(opts: DemoOptions, argv: Sequence) -> list[str]:
    """``argv`` as the fingerprint sees it: paths inside the run folder relative to it (a moved
    run folder stays valid), ``--cache-dir`` left out (where prepared images live is not what they
    are: the data fingerprint covers that)."""
    out, items, skip = str(Path(opts.out).resolve()), [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--cache-dir":
            skip = True
            continue
        s = str(Path(a).resolve()) if isinstance(a, Path) else str(a)
        items.append("<out>" + s[len(out):] if isinstance(a, Path) and (s == out or s.startswith(out + "/")) else s)
    return items


def stage_fingerprint(opts: DemoOptions, st: Stage, upstream: dict[str, str], result: Any = None) -> str:
    """A digest of the stage's command and result-changing arguments, the fingerprints of the
    stages it depends on and (data stage) the data fingerprint."""
    return digest({"command": st.cli, "argv": _fingerprint_argv(opts, st.argv),
                   "upstream": {u: upstream[u] for u in st.upstream if u in upstream}, "result": result})


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _stage(opts: DemoOptions, st: Stage, fingerprints: dict[str, str], timings: dict) -> None:
    """Run a stage unless ``<out>/<name>/done.json`` holds its current fingerprint. A stage
    folder made with another fingerprint (finished or not) is moved aside first, never mixed."""
    folder, line = opts.out / st.name, f"{st.cli} " + " ".join(shlex.quote(str(a)) for a in st.argv)
    result = None
    if callable(st.target) and st.name == "data":  # cheap once prepared; its result is the data fingerprint
        t0 = time.perf_counter()
        result = st.target(opts)
        prepare_seconds = time.perf_counter() - t0
    identity = None if result is None else {"fingerprint": result.get("fingerprint"), "images": result.get("images")}
    fp = stage_fingerprint(opts, st, fingerprints, identity)  # what the data are, not where they were found
    fingerprints[st.name] = fp
    done = _read_json(folder / "done.json")
    if done is not None and done.get("fingerprint") == fp:
        timings[st.name] = done["seconds"]
        log.info("[%s] done already (%.0f s): %s", st.name, timings[st.name], line)
        return
    started = opts.out / ".stages" / f"{st.name.replace('/', '--')}.json"
    old_fp = (done or _read_json(started) or {}).get("fingerprint")
    if folder.exists() and old_fp != fp:
        moved = move_aside(folder)
        log.warning("[%s] its inputs changed since it ran: old outputs moved to %s", st.name, moved)
    atomic_write_json(started, {"fingerprint": fp, "command": line})
    log.info("[%s] %s", st.name, line)
    t0 = time.perf_counter()
    if st.name == "data":
        seconds = prepare_seconds
    else:
        if callable(st.target):
            result = st.target(opts)
        elif st.cli == "boed evaluate" and opts.profile.eval_procs > 1:
            run_sharded(st.target, st.argv, opts.profile.eval_procs)
        else:
            run_command(st.target, st.argv)
        seconds = time.perf_counter() - t0
    timings[st.name] = seconds
    atomic_write_json(folder / "done.json", {"seconds": seconds, "command": line, "fingerprint": fp, "result": result})
    log.info("[%s] finished in %.0f s", st.name, seconds)


# ----------------------------------------------------------------------------------------------
# the stages: each one's arguments in one place


def _data_args(opts: DemoOptions) -> list:
    args = ["--image-size", opts.profile.image_size]
    if opts.data_root is not None:
        args += ["--data", "chestxray", "--data-root", opts.data_root]
    else:
        args += ["--data", "phantom"]
    if opts.cache_dir is not None:
        args += ["--cache-dir", opts.cache_dir]
    if opts.max_images is not None:
        args += ["--max-images", opts.max_images]
    if opts.present_only:
        args += ["--present-only"]
    return args


def _train_args(opts: DemoOptions, steps: int, batch: int) -> list:
    return ["--steps", steps, "--batch-size", batch, "--device", opts.device, "--seed", opts.seed]


def _ckpt_args(opts: DemoOptions) -> list:
    return ["--checkpointing"] if opts.profile.checkpointing else []


def _smoke_args(opts: DemoOptions, samples: bool = True) -> list:
    """``--eval-images``/``--sample-n`` when the demo was given them (smoke checks); nothing
    otherwise, so the stages of a default run keep their commands (and fingerprints)."""
    args = [] if opts.eval_images is None else ["--eval-images", opts.eval_images]
    return args + ([] if opts.sample_n is None or not samples else ["--sample-n", opts.sample_n])


def _model_args(opts: DemoOptions) -> list:
    return ["--ipa", opts.out / "ipa", "--avp", opts.out / "avp", "--device", opts.device]


def describe_data(opts: DemoOptions) -> dict:
    """Prepare the image cache once (later stages only read it) and say what the data are:
    kind (phantom or NIH-format folder), where, how many images per split, the data fingerprint."""
    data = "chestxray" if opts.data_root is not None else "phantom"
    kw = dict(size=opts.profile.image_size, cache_dir=opts.cache_dir, present_only=opts.present_only or None)
    ds = open_dataset(data, opts.data_root, split="all", **kw)
    splits = {}
    for split in ("train", "test"):
        try:
            splits[split] = len(open_dataset(data, opts.data_root, split=split, max_images=opts.max_images, **kw))
        except UserError:
            splits[split] = 0
    generated = opts.data_root is not None and Path(opts.data_root).resolve() == (opts.out / "phantom").resolve()
    kind = "phantom" if opts.data_root is None or generated else "nih"
    source = ("the default phantom set (generated on first use into the cache folder)" if opts.data_root is None else
              "a phantom set generated by the demo" if generated else
              f"the NIH ChestX-ray14-format folder {Path(opts.data_root).resolve()}")
    return {"kind": kind, "source": source, "root": None if opts.data_root is None else str(Path(opts.data_root).resolve()),
            "images": len(ds), **splits, "image_size": opts.profile.image_size, "fingerprint": getattr(ds, "fingerprint", None)}


def phantom_stage(opts: DemoOptions) -> Stage:
    p = opts.profile
    return Stage("phantom", "xray phantom", "xray.commands.phantom",
                 ["--out", opts.out / "phantom", "--n", p.phantom_n, "--size", p.phantom_size or p.image_size,
                  "--seed", opts.seed, "--demo-prevalence"])


def data_stage(opts: DemoOptions) -> Stage:
    return Stage("data", "prepare", describe_data, _data_args(opts), upstream=("phantom",))


def vae_stage(opts: DemoOptions) -> Stage:
    p = opts.profile
    return Stage("vae", "ipa_core train", "ipa_core.commands.train",
                 ["--stage", "vae", "--config", p.vae_config, "--out", opts.out / "vae", *_data_args(opts), *_ckpt_args(opts),
                  *_train_args(opts, p.vae_steps, p.vae_batch), *_smoke_args(opts)], upstream=("data",))


def ipa_stage(opts: DemoOptions) -> Stage:
    p = opts.profile
    return Stage("ipa", "ipa_core train", "ipa_core.commands.train",
                 ["--stage", "ipa", "--vae", opts.out / "vae", "--out", opts.out / "ipa", *_data_args(opts), *_ckpt_args(opts),
                  *_train_args(opts, p.ipa_steps, p.ipa_batch), *_smoke_args(opts)], upstream=("data", "vae"))


def avp_stage(opts: DemoOptions) -> Stage:
    p = opts.profile
    return Stage("avp", "boed train-avp", "boed.commands.train_avp",
                 ["--arch", p.avp_arch, "--init", p.avp_init,
                  *(["--init-weights", opts.avp_init_weights] if opts.avp_init_weights and p.avp_init != "scratch" else []),
                  "--out", opts.out / "avp", "--lr", p.avp_lr, *_data_args(opts),
                  *_train_args(opts, p.avp_steps, p.avp_batch), *_smoke_args(opts, samples=False)], upstream=("data",))


def scan_stage(opts: DemoOptions, illness: str, index: int) -> Stage:
    p, slug = opts.profile, resolve_illness(illness).slug
    return Stage(f"scans/{slug}-{index}", "boed run", "boed.commands.run",
                 ["--illness", illness, "--scans", p.scans, "--index", index, "--n-samples", p.n_samples, "--seed", opts.seed,
                  "--out", opts.out / "scans" / f"{slug}-{index}", *_model_args(opts), *_data_args(opts)],
                 upstream=("data", "ipa", "avp"))


def eval_stage(opts: DemoOptions, illness: str) -> Stage:
    p, slug = opts.profile, resolve_illness(illness).slug
    return Stage(f"eval/{slug}", "boed evaluate", "boed.commands.evaluate",
                 ["--illness", illness, "--scans", p.scans, "--methods", ",".join(METHODS + _policy_methods(opts)), "--n-test", p.n_test,
                  "--repeats", p.repeats, "--n-samples", p.n_samples, "--seed", opts.seed, "--batch-size", p.eval_batch,
                  "--out", opts.out / "eval" / slug, *_model_args(opts), *_data_args(opts), *_policy_args(opts, illness)],
                 upstream=("data", "ipa", "avp", *(f"policy/{slug}-{m}" for m in POLICY_METHODS if opts.with_policies)))


POLICY_METHODS = ("distill", "gdfs")  # `boed train-policy --method`; evaluated as methods distilled and gdfs


def _policy_methods(opts: DemoOptions) -> tuple[str, ...]:
    return ("distilled", "gdfs") if opts.with_policies else ()


def _policy_args(opts: DemoOptions, illness: str) -> list:
    if not opts.with_policies:
        return []
    return ["--distilled", policy_dir(opts.out, illness, "distill"), "--gdfs", policy_dir(opts.out, illness, "gdfs")]


def policy_stages(opts: DemoOptions) -> list[Stage]:
    """`boed train-policy` for both amortised policies and every illness (``--with-policies``)."""
    p = opts.profile
    return [Stage(name, cli, module, argv, upstream=("data", "ipa", "avp"))
            for name, cli, module, argv in policy_entries(opts.out, opts.illnesses, p.name, p.scans, p.n_samples,
                                                   _data_args(opts), str(opts.device), opts.seed)]


def plan(opts: DemoOptions) -> list[Stage]:
    """Every stage of the run, in order (``phantom`` only for a profile with a private phantom set)."""
    p = opts.profile
    stages = [phantom_stage(opts)] if opts.data_root is None and p.phantom_n is not None else []
    if stages:  # the private phantom set is the data root of every later stage
        opts.data_root = opts.out / "phantom"
    stages += [data_stage(opts), vae_stage(opts), ipa_stage(opts), avp_stage(opts)]
    if opts.with_policies:
        stages += policy_stages(opts)
    for ill in opts.illnesses:
        stages += [scan_stage(opts, ill, i) for i in range(p.run_images)]
        stages.append(eval_stage(opts, ill))
    return stages


def run_demo(opts: DemoOptions) -> dict:
    """Run the stages up to ``opts.until``; return the summary (also written to ``<out>/summary.json``)."""
    opts.out = ensure_writable_dir(opts.out)
    timings: dict[str, float] = {}
    fingerprints: dict[str, str] = {}
    last = STAGES.index(opts.until)
    for st in plan(opts):
        kind = st.name.split("/")[0]
        if kind == "phantom" or STAGES.index(kind) <= last:
            _stage(opts, st, fingerprints, timings)
    timings["total"] = sum(timings.values())  # the whole demo's wall time, skipped stages included
    data = (_read_json(opts.out / "data" / "done.json") or {}).get("result")
    return summarize(opts, timings, data=data, fingerprints=fingerprints)


def summarize(opts: DemoOptions, timings: dict[str, float], data: dict | None = None, fingerprints: dict | None = None) -> dict:
    """Collect every illness's metrics.csv into one table; write summary.{json,md}."""
    import pandas as pd

    def collect(name: str):
        files = [opts.out / "eval" / resolve_illness(ill).slug / name for ill in opts.illnesses]
        frames = [pd.read_csv(f, dtype={"t": str} if name == "paired.csv" else None) for f in files if f.is_file()]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    table, paired = collect("metrics.csv"), collect("paired.csv")
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    summary = {"profile": dataclasses.asdict(opts.profile), "illnesses": list(opts.illnesses), "timings_s": timings,
               "data": data, "seed": opts.seed, "device": opts.device, "stages": fingerprints or {},
               "machine": machine, "metrics": table.to_dict(orient="records"), "paired": paired.to_dict(orient="records")}
    atomic_write_json(opts.out / "summary.json", summary)
    atomic_write_text(opts.out / "summary.md", render_summary(table, timings, machine, paired))
    return summary


def render_paired(paired) -> list[str]:
    """Markdown: EIG-IPA minus each method, averaged over t = 2..T, with paired 95 % CIs."""
    if not len(paired):
        return []
    avg = paired[paired["t"].astype(str).str.contains("-")]
    if not len(avg):
        return []
    span = avg["t"].iloc[0]
    lines = [f"### EIG-IPA minus each method: AUROC averaged over t = {span.replace('-', '..')}, paired on the same images", "",
             "Paired two-level bootstrap 95 % CI (resample the policy seeds, then the test images; the same "
             "resamples for both methods and every t); P = fraction of resamples in which EIG-IPA is ahead; "
             "sd = spread of the difference between policy seeds.", "",
             "| illness | method | difference [95 % CI] | P | sd over seeds |", "|---|---|---|---|---|"]
    for r in avg.itertuples():
        sd = getattr(r, "diff_sd_repeats", float("nan"))
        lines.append(f"| {r.illness} | {r.baseline} | {r.diff:+.3f} [{r.diff_lo:+.3f}, {r.diff_hi:+.3f}] | {r.p_above:.2f} | {sd:.3f} |")
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
