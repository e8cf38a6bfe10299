"""The demo pipeline: prepare -> VAE -> IPA -> AVP-CNN -> `boed run` figures -> `boed evaluate`.

Each stage runs one of the toolkit's own commands (the same code path a user types), in its own
folder under the run directory. A stage that finished writes ``<stage>/done.json`` (its wall time
and the command it ran); a rerun skips it, and a stage that was killed resumes through the
command's own checkpointing. ``done.json`` also holds the stage's *fingerprint* (its command's
result-changing arguments, the data fingerprint, the fingerprints of the stages it depends on):
when it differs (another ``--data-root``, profile, seed, step cap, device ...) the stage's old
folder is moved aside (``<name>.old-<time>``) and the stage reruns, and so does every stage after
it, whose fingerprints include this one's. A stage's fingerprint also holds the digests of the
models it reads (``digest.json`` of ``vae/model``, ``ipa/model``, ...): a model trained on in place
makes every stage that reads it rerun.

**Kills at any instant.** A stage killed after its output became complete but before its
``done.json`` (the phantom folder is renamed into place whole) is *adopted* when the started marker
``.stages/<stage>.json`` holds the same fingerprint; temp folders of a killed phantom run are
removed. ``boed evaluate`` shards are tied to the demo (``PR_SET_PDEATHSIG`` on Linux: a killed demo
takes its shards with it), and their process ids are recorded so a rerun waits for any still alive.
``summary.json`` (and so ``--publish``) holds only the stages whose ``done.json`` carries this run's
fingerprint: a partial run (``--until``) or another seed never reports older results.

Profiles size the run: ``cpu`` (S = 64, tiny models, about half an
hour on 2 cores), ``quick`` (a few minutes; used by the end-to-end test) and ``paper`` (S = 256,
the xray256 VAE, a DenseNet-121 AVP-CNN, N = 10, 5 000 test images, the paper's step counts).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from ipa_core.persist import model_digest, resolve_model_dir
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
    # `boed train-avp` training masks; None = the command's own default (paper appendix I.4)
    avp_p_full: float | None = None  # --p-full
    avp_p_freeform: float | None = None  # --p-freeform
    avp_patch_layout: str | None = None  # --patch-layout
    avp_input_norm: str | None = None  # --input-norm (None: the command's own, none)
    checkpointing: bool = False  # activation checkpointing of the VAE/IPA blocks (`ipa_core train --checkpointing`)


PROFILES: dict[str, DemoProfile] = {
    # cpu AVP recipe chosen by benchmarks/bench_classifier.py (issue 24, benchmarks/results/classifier.md): fully
    # observed images and scan-grid patch unions, 2x the steps, the input standardised by the training pixels'
    # mean/std: best mean AUROC after 1..5 scans over the phantom presets, three training seeds each
    "cpu": DemoProfile("cpu", image_size=64, vae_config="tiny", vae_steps=800, vae_batch=8,
                       ipa_steps=1000, ipa_batch=16, avp_arch="tiny", avp_steps=4000, avp_batch=32, avp_lr=2e-3,
                       avp_p_full=0.2, avp_p_freeform=0.0, avp_patch_layout="scan", avp_input_norm="dataset",
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
    data: str | None = None  # --data (e.g. "chestmnist"); None: chestxray with data_root, else phantom
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


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGKILL when the demo dies (even by SIGKILL); elsewhere nothing."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def spawn_tied(cmd: Sequence[str], env: dict | None = None) -> subprocess.Popen:
    """``Popen`` of a child that dies with this process (Linux) and in its process group (Ctrl-C reaches it)."""
    return subprocess.Popen(list(cmd), env=env, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)


def _alive(pid: int, marker: str) -> bool:
    """True when ``pid`` runs and its command line holds ``marker`` (not a reused pid)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True  # no /proc: trust the pid


def wait_for_orphans(pid_file: Path, marker: str, poll: float = 0.5, timeout: float | None = None) -> list[int]:
    """Wait until the processes listed in ``pid_file`` (a killed earlier run's shards) are gone; returns those waited for."""
    pids = [int(p) for p in ((_read_json(pid_file) or {}).get("pids") or [])]
    live = [p for p in pids if _alive(p, marker)]
    if live:
        log.warning("waiting for %d shard process(es) of an earlier, killed demo still running: pids %s", len(live), live)
    t0 = time.monotonic()
    while live:
        if timeout is not None and time.monotonic() - t0 > timeout:
            raise UserError(f"shard processes {live} of an earlier demo are still running; wait for them or end them, then rerun")
        time.sleep(poll)
        live = [p for p in live if _alive(p, marker)]
    return [p for p in pids if p not in live]


def run_sharded(module: str, argv: Sequence[str], procs: int) -> None:
    """Run ``python -m <package>.cli <command> argv --shard i/procs`` in ``procs`` processes, one
    thread each (small networks use 2 cores better as 2 processes than as 2 threads), then merge.

    The shards die with this process (:func:`spawn_tied`); their pids go to ``.<out name>.pids.json``
    beside ``--out``, and a rerun first waits for any shard of a killed earlier run that is still
    alive (where the kernel does not end them: other platforms).
    """
    pkg, _, cmd = module.partition(".commands.")
    base = [sys.executable, "-m", f"{pkg}.cli", cmd.replace("_", "-"), *map(str, argv)]
    out = str(list(argv)[list(argv).index("--out") + 1])
    pid_file = Path(out).parent / f".{Path(out).name}.pids.json"
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    wait_for_orphans(pid_file, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    children = [spawn_tied(base + ["--shard", f"{i}/{procs}"] + ([] if i == 0 else ["--no-progress"]), env=env)
                for i in range(procs)]
    atomic_write_json(pid_file, {"pids": [c.pid for c in children], "command": " ".join(base[2:5])})
    try:
        codes = [c.wait() for c in children]
    except BaseException:  # Ctrl-C, an exception: never leave shards behind
        for c in children:
            c.kill()
        for c in children:
            c.wait()
        raise
    if any(codes):
        raise UserError(f"{' '.join(base[2:5])}: shard exit codes {codes}; rerun the demo to resume the unfinished shards")
    pid_file.unlink(missing_ok=True)
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


def stage_fingerprint(opts: DemoOptions, st: Stage, upstream: dict[str, str], result: Any = None,
                      models: dict[str, str] | None = None) -> str:
    """A digest of the stage's command and result-changing arguments, the fingerprints of the
    stages it depends on, the digests of the upstream stages' models it reads (``models``:
    ``{stage: model digest}``) and (data stage) the data fingerprint."""
    used = {u: models[u] for u in st.upstream if models and u in models}
    return digest({"command": st.cli, "argv": _fingerprint_argv(opts, st.argv),
                   "upstream": {u: upstream[u] for u in st.upstream if u in upstream}, "result": result,
                   **({"models": used} if used else {})})


# Flags whose larger value a stage's command adds to its existing output instead of starting over:
# `boed evaluate` keeps the records of fewer --repeats (boed.evaluation.config.GROWS).
GROWING_FLAGS = {"boed evaluate": ("--repeats",)}


def grows_in_place(opts: DemoOptions, st: Stage, old_command: str | None, old_fp: str | None,
                   upstream: dict[str, str], result: Any = None, models: dict[str, str] | None = None) -> bool:
    """True when the stage's output, made by ``old_command`` with fingerprint ``old_fp``, differs
    from this run only by smaller values of :data:`GROWING_FLAGS`: the command then extends it
    (proved by recomputing the fingerprint with the old values, so nothing else changed)."""
    flags = GROWING_FLAGS.get(st.cli, ())
    if not flags or not old_command or not old_fp:
        return False
    old, argv = shlex.split(old_command)[len(st.cli.split()):], list(st.argv)
    for flag in flags:
        texts = [str(a) for a in argv]
        if flag not in texts[:-1] or flag not in old[:-1]:
            return False
        i = texts.index(flag) + 1
        try:
            before, now = int(old[old.index(flag) + 1]), int(texts[i])
        except ValueError:
            return False
        if before > now:
            return False
        argv[i] = before
    return stage_fingerprint(opts, dataclasses.replace(st, argv=argv), upstream, result, models) == old_fp


def stage_output(st: Stage) -> Path | None:
    """The folder a stage's command writes (its ``--out``), if it has one."""
    argv = [str(a) for a in st.argv]
    return Path(argv[argv.index("--out") + 1]) if "--out" in argv[:-1] else None


def stage_model_digest(st: Stage) -> str | None:
    """The digest of the model a stage produced (its ``--out`` holds ``model/`` or is one), else None."""
    out = stage_output(st)
    if out is None or st.name in ("data", "phantom") or st.cli in ("boed run", "boed evaluate"):
        return None
    try:
        return model_digest(resolve_model_dir(out))
    except UserError:
        return None


def _complete_output(st: Stage, folder: Path) -> bool:
    """True when a stage's output is complete without its ``done.json`` (a kill after the output's
    last rename): only the phantom set, which is renamed into place whole."""
    return (st.name == "phantom" and any(folder.glob("Data_Entry_2017*.csv")) and (folder / "test_list.txt").is_file()
            and (folder / "images").is_dir())


def _remove_temps(folder: Path) -> None:
    """Temp folders and files a killed command left beside ``folder`` (``.<name>.partial-*``, ``.<name>.*.tmp``)."""
    for p in folder.parent.glob(f".{folder.name}.*"):
        if p.is_dir() and ".partial-" in p.name:
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _stage(opts: DemoOptions, st: Stage, fingerprints: dict[str, str], timings: dict,
           models: dict[str, str] | None = None, legacy: dict[str, str] | None = None) -> None:
    """Run a stage unless ``<out>/<name>/done.json`` holds its current fingerprint. A stage
    folder made with another fingerprint (finished or not) is moved aside first, never mixed; a
    complete output of this fingerprint without ``done.json`` is adopted.

    ``legacy``: the fingerprints as computed before they held model digests; a stage recorded
    with its legacy fingerprint (by an older boed) is accepted with a warning, not rerun.
    """
    folder, line = opts.out / st.name, f"{st.cli} " + " ".join(shlex.quote(str(a)) for a in st.argv)
    result = None
    if callable(st.target) and st.name == "data":  # cheap once prepared; its result is the data fingerprint
        t0 = time.perf_counter()
        result = st.target(opts)
        prepare_seconds = time.perf_counter() - t0
    identity = None if result is None else {"fingerprint": result.get("fingerprint"), "images": result.get("images")}
    fp = stage_fingerprint(opts, st, fingerprints, identity, models)  # what the data are, not where they were found
    fingerprints[st.name] = fp
    done = _read_json(folder / "done.json")
    if legacy is not None:
        legacy[st.name] = stage_fingerprint(opts, st, legacy, identity)
        if (done is not None and done.get("fingerprint") == legacy[st.name] != fp and not done.get("model_digests")):
            log.warning("[%s] finished by an older boed, whose stage fingerprints held no model digests: assuming the "
                        "models it read are unchanged (delete %s to rerun it)", st.name, folder / "done.json")
            done = {**done, "fingerprint": fp, "model_digests": True}
            atomic_write_json(folder / "done.json", done)
    if done is not None and done.get("fingerprint") == fp:
        timings[st.name] = done["seconds"]
        log.info("[%s] done already (%.0f s): %s", st.name, timings[st.name], line)
        return
    started = opts.out / ".stages" / f"{st.name.replace('/', '--')}.json"
    old_run = done or _read_json(started) or {}
    old_fp = old_run.get("fingerprint")
    if folder.exists() and old_fp != fp and grows_in_place(opts, st, old_run.get("command"), old_fp, fingerprints,
                                                           identity, models):
        log.info("[%s] extending its output in place (only %s grew): %s", st.name,
                 ", ".join(GROWING_FLAGS[st.cli]), old_run.get("command"))
    elif folder.exists() and old_fp != fp:
        moved = move_aside(folder)
        log.warning("[%s] its inputs changed since it ran: old outputs moved to %s", st.name, moved)
    elif done is None and old_fp == fp and _complete_output(st, folder):
        log.warning("[%s] adopting the complete output of a run killed before it recorded done.json", st.name)
        timings[st.name] = 0.0
        atomic_write_json(folder / "done.json", {"seconds": 0.0, "command": line, "fingerprint": fp, "result": None, "adopted": True})
        return
    elif st.name == "phantom" and folder.exists():  # incomplete (and so never renamed into place): start over
        move_aside(folder)
    _remove_temps(folder)
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
    atomic_write_json(folder / "done.json", {"seconds": seconds, "command": line, "fingerprint": fp, "result": result,
                                             "model_digests": True})
    log.info("[%s] finished in %.0f s", st.name, seconds)


# ----------------------------------------------------------------------------------------------
# the stages: each one's arguments in one place


def _data_args(opts: DemoOptions) -> list:
    args = ["--image-size", opts.profile.image_size, "--data", _data_name(opts)]
    if opts.data_root is not None:
        args += ["--data-root", opts.data_root]
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


def _data_name(opts: DemoOptions) -> str:
    return opts.data or ("chestxray" if opts.data_root is not None else "phantom")


def describe_data(opts: DemoOptions) -> dict:
    """Prepare the image cache once (later stages only read it) and say what the data are:
    kind (phantom or NIH-format folder), where, how many images per split, the data fingerprint."""
    data = _data_name(opts)
    kw = dict(size=opts.profile.image_size, cache_dir=opts.cache_dir, present_only=opts.present_only or None)
    ds = open_dataset(data, opts.data_root, split="all", **kw)
    splits = {}
    for split in ("train", "test"):
        try:
            splits[split] = len(open_dataset(data, opts.data_root, split=split, max_images=opts.max_images, **kw))
        except UserError:
            splits[split] = 0
    generated = opts.data_root is not None and Path(opts.data_root).resolve() == (opts.out / "phantom").resolve()
    kind = "chestmnist" if data == "chestmnist" else "phantom" if opts.data_root is None or generated else "nih"
    source = ("MedMNIST's ChestMNIST file in " + str(Path(opts.data_root).resolve() if opts.data_root else "medmnist's folder")
              if data == "chestmnist" else
              "the default phantom set (generated on first use into the cache folder)" if opts.data_root is None else
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
                  "--out", opts.out / "avp", "--lr", p.avp_lr, *_avp_recipe_args(p), *_data_args(opts),
                  *_train_args(opts, p.avp_steps, p.avp_batch), *_smoke_args(opts, samples=False)], upstream=("data",))


def _avp_recipe_args(p: DemoProfile) -> list:
    """The profile's training-mask and input-normalisation flags; none when it keeps the command's
    defaults (so the stage's command and fingerprint stay those of a profile without them)."""
    flags = (("--p-full", p.avp_p_full), ("--p-freeform", p.avp_p_freeform), ("--patch-layout", p.avp_patch_layout),
             ("--input-norm", p.avp_input_norm))
    return [a for flag, v in flags if v is not None for a in (flag, v)]


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


def run_stages(opts: DemoOptions, stages: Sequence[Stage]) -> tuple[dict[str, str], dict[str, float]]:
    """Run (or adopt) ``stages`` in order, each fingerprinted with the digests of the models it
    reads; the one loop of the demo and of every study built on its stages. Returns
    ``(fingerprints, timings)``, keyed by stage name."""
    fingerprints: dict[str, str] = {}
    timings: dict[str, float] = {}
    models: dict[str, str] = {}
    legacy: dict[str, str] = {}
    for st in stages:
        _stage(opts, st, fingerprints, timings, models, legacy)
        d = stage_model_digest(st)
        if d is not None:
            models[st.name] = d
    return fingerprints, timings


def plan(opts: DemoOptions) -> list[Stage]:
    """Every stage of the run, in order (``phantom`` only for a profile with a private phantom set)."""
    p = opts.profile
    stages = [phantom_stage(opts)] if opts.data_root is None and opts.data in (None, "phantom") and p.phantom_n is not None else []
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
    last = STAGES.index(opts.until)
    fingerprints, timings = run_stages(opts, [st for st in plan(opts) if st.name.split("/")[0] == "phantom"
                                              or STAGES.index(st.name.split("/")[0]) <= last])
    timings["total"] = sum(timings.values())  # the whole demo's wall time, skipped stages included
    current = current_stages(opts, fingerprints)
    data = (_read_json(opts.out / "data" / "done.json") or {}).get("result") if "data" in current else None
    return summarize(opts, timings, data=data, fingerprints=fingerprints, current=current)


def current_stages(opts: DemoOptions, fingerprints: dict[str, str]) -> list[str]:
    """The stages of this run whose ``done.json`` holds this run's fingerprint (what the summary may report)."""
    return [name for name, fp in fingerprints.items()
            if (_read_json(opts.out / name / "done.json") or {}).get("fingerprint") == fp]


def summarize(opts: DemoOptions, timings: dict[str, float], data: dict | None = None, fingerprints: dict | None = None,
              current: Sequence[str] | None = None) -> dict:
    """Collect every illness's metrics.csv into one table; write summary.{json,md}.

    ``current``: the stages finished with this run's fingerprint (:func:`current_stages`); only
    their results are collected (None: every illness's, for a summary rebuilt by hand).
    """
    def collect(name: str):
        slugs = [resolve_illness(ill).slug for ill in opts.illnesses]
        files = [opts.out / "eval" / slug / name for slug in slugs if current is None or f"eval/{slug}" in current]
        frames = [pd.read_csv(f, dtype={"t": str} if name == "paired.csv" else None) for f in files if f.is_file()]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    table, paired = collect("metrics.csv"), collect("paired.csv")
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    summary = {"profile": dataclasses.asdict(opts.profile), "illnesses": list(opts.illnesses), "timings_s": timings,
               "data": data, "seed": opts.seed, "device": opts.device, "stages": fingerprints or {},
               "current_stages": None if current is None else list(current),
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
