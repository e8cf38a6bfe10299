"""Studies built from the demo's stages: does the completer matter, and do the claims survive retraining?

**Completer study** (:func:`run_completer_study`, ``boed study completers``). The paper's thesis:
a mass-covering completer (IPA, forward KL) chooses better scans than a mode-seeking (IPA-R,
reverse KL), a poorly trained, a retrieval or an unconditional one. Stages, each in its own folder
under the run directory and skipped when its ``done.json`` exists (the demo's machinery,
:func:`boed.demo._stage`; a killed stage resumes through its command's own checkpoints):

    data -> vae -> ipa -> ipar (--objective reverse) -> ipa-under (1/8 of the IPA steps) -> avp
    -> study-eval/<illness> (``boed evaluate`` with eig-ipa, eig-ipar, eig-ipa-under, eig-retrieval,
       uncond; R repeats) -> quality (completion quality of every completer) -> the table and figure

The folder layout is the demo's, so ``--out`` pointing at a finished ``boed demo`` run reuses its
VAE, IPA and AVP-CNN. Completion quality is measured on *random scan states*: each of
``n_states`` test images with 1..T patches of the scan grid observed (uniform count, distinct
uniform locations), the same states and the same seeds for every completer. Random rather than
the states EIG-IPA reaches, because those depend on the completer under test and would favour
IPA; these are the same kind of states (unions of grid patches) that every policy conditions on.

The table (``completers.csv``/``.md``) and figure (``completers.png``) put, per completer, the
AUROC gain over Uncond averaged over t = 2..T with its repeated, paired 95 % CI (read from the
evaluation's ``paired.csv``) beside its best-of-K MSE on unobserved pixels and its diversity.

**Seed study** (:func:`run_seed_study`, ``boed study seeds``): ``boed demo --seed K --out
OUT/seed-K`` for every K (VAE, IPA, AVP-CNN retrained), then the headline paired differences
(EIG-IPA minus Uncond, Random, non-greedy; per t and over t = 2..T) per seed and pooled. A
difference *holds across seeds* only when every seed's 95 % interval excludes 0 on the same side.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from matplotlib.figure import Figure

from ipa_core.coverage import QualityRow, completion_quality
from ipa_core.ipa import IPA
from xray.cli_base import parse_device
from xray.dataset import dataset_images, open_dataset
from xray.errors import UserError
from xray.io import atomic_path, atomic_write_json, atomic_write_text, ensure_writable_dir
from xray.labels import resolve_illness

from . import demo
from .baselines.samplers import RetrievalSampler
from .evaluation.config import CONFIG_NAME
from .evaluation.records import load_records
from .evaluation.report import paired_rows
from .geometry import ScanGeometry
from .samplers import DatasetSampler, IPASampler

log = logging.getLogger("boed.study")

COMPLETERS = ("eig-ipa", "eig-ipar", "eig-ipa-under", "eig-retrieval")  # EIG with each completer
STUDY_METHODS = COMPLETERS + ("uncond",)
QUALITY_NAMES = COMPLETERS + ("uncond",)  # uncond's completer: unconditional dataset draws
UNDER_FRACTION = 8  # the under-trained IPA gets 1/8 of the IPA steps
DEFAULT_REPEATS = 3
DEFAULT_STATES = 200  # test states of the completion-quality measurement
QUALITY_K = 10  # best-of-K and the completions per state
HEADLINE_BASELINES = ("uncond", "random", "nongreedy")
STUDY_ILLNESSES = ("effusion",)


# ----------------------------------------------------------------------------------------------
# reading paired differences


def mean_span(labels: Sequence[str], scans: int | None = None) -> str | None:
    """The averaged-t label of a paired table: ``"2-T"`` when present, else any ``"a-b"`` label."""
    spans = [str(t) for t in dict.fromkeys(labels) if "-" in str(t)]
    pref = [s for s in spans if s.startswith("2-")]
    return (pref or spans or [None])[0]


def _sd(row) -> float:
    """The between-repeat spread of a paired row (``diff_sd_repeats``), NaN when the table has none."""
    v = row.get("diff_sd_repeats", float("nan"))
    return float(v) if v == v else float("nan")


def gain_over(paired, method: str, baseline: str, illness: str, t: str) -> dict | None:
    """``AUROC(method) - AUROC(baseline)`` at ``t`` from a paired table (a DataFrame with the
    columns of ``boed.evaluation.report.PAIRED_COLUMNS``); a row ``baseline minus method`` is negated.
    None when the table holds neither."""
    p = paired[(paired["illness"] == illness) & (paired["t"].astype(str) == str(t))]
    row = p[(p["method"] == method) & (p["baseline"] == baseline)]
    if len(row):
        r = row.iloc[0]
        return {"diff": float(r["diff"]), "lo": float(r["diff_lo"]), "hi": float(r["diff_hi"]), "sd_repeats": _sd(r)}
    row = p[(p["method"] == baseline) & (p["baseline"] == method)]
    if len(row):
        r = row.iloc[0]
        return {"diff": -float(r["diff"]), "lo": -float(r["diff_hi"]), "hi": -float(r["diff_lo"]), "sd_repeats": _sd(r)}
    return None


def read_paired(path: Path):
    if not path.is_file():
        raise UserError(f"{path} is missing; finish the evaluation (rerun the study to resume) before the table")
    return pd.read_csv(path, dtype={"t": str})


def _paired_from_records(eval_dir: Path, illness: str, method: str):
    """Paired rows ``method`` minus every other method from the evaluation's records (when
    ``paired.csv`` compares only EIG-IPA with the others)."""
    cfg = json.loads((eval_dir / CONFIG_NAME).read_text())
    kw = {"n_boot": cfg.get("n_boot", 1000), "seed": cfg.get("bootstrap_seed", 0)}  # the same bootstrap as paired.csv
    rows = paired_rows(load_records(eval_dir), [illness], int(cfg["scans"]), method=method, **kw)
    return pd.DataFrame(rows).assign(t=lambda d: d["t"].astype(str))


# ----------------------------------------------------------------------------------------------
# the completer table and figure


def completer_table(paired, quality, illness: str, eval_dir: Path | None = None) -> list[dict]:
    """One row per completer: gain over Uncond (mean over t = 2..T, paired CI) and completion quality.

    ``paired``: the evaluation's paired table; ``quality``: rows of ``quality.csv`` (DataFrame with
    ``completer, best_mse, ...``). Rows the paired table lacks are computed from ``eval_dir``'s
    records when given.
    """
    span = mean_span(paired["t"].astype(str).tolist())
    if span is None:
        raise UserError("the paired table has no averaged row (t = 'a-b'); rerun `boed evaluate --merge` with the current code")
    q = quality.set_index("completer")
    rows = []
    for m in COMPLETERS:
        g = gain_over(paired, m, "uncond", illness, span)
        if g is None and eval_dir is not None and (eval_dir / "eval_config.json").is_file():
            g = gain_over(_paired_from_records(eval_dir, illness, m), m, "uncond", illness, span)
        row = {"illness": illness, "completer": m, "t": span}
        row.update({f"gain{'' if k == 'diff' else '_' + k}": (g or {}).get(k, float("nan")) for k in ("diff", "lo", "hi", "sd_repeats")})
        for col in ("best_mse", "best_mse_se", "mean_mse", "pairwise", "pairwise_se", "pixel_std", "n_images"):
            row[col] = float(q.loc[m, col]) if m in q.index and col in q.columns else float("nan")
        rows.append(row)
    if "uncond" in q.index:  # the reference completer: gain 0 by definition
        row = {"illness": illness, "completer": "uncond", "t": span, "gain": 0.0, "gain_lo": 0.0, "gain_hi": 0.0, "gain_sd_repeats": 0.0}
        row.update({col: float(q.loc["uncond", col]) for col in ("best_mse", "best_mse_se", "mean_mse", "pairwise", "pairwise_se",
                                                                  "pixel_std", "n_images") if col in q.columns})
        rows.append(row)
    return rows


TABLE_COLUMNS = ("illness", "completer", "t", "gain", "gain_lo", "gain_hi", "gain_sd_repeats", "best_mse", "best_mse_se",
                 "mean_mse", "pairwise", "pairwise_se", "pixel_std", "n_images")


def _csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(v):
        return f"{v:.6g}" if isinstance(v, float) else str(v)

    return "\n".join([",".join(columns)] + [",".join(cell(r.get(c, "")) for c in columns) for r in rows]) + "\n"


def render_completer_md(rows: Sequence[dict], k: int = QUALITY_K, notes: str = "") -> str:
    lines = ["# Completer study: does the completion model matter?", ""]
    if notes:
        lines += [notes.strip(), ""]
    for ill in dict.fromkeys(r["illness"] for r in rows):
        rs = [r for r in rows if r["illness"] == ill]
        span = rs[0]["t"].replace("-", "..")
        lines += [f"## {ill}: AUROC gain over Uncond (mean over t = {span}) and completion quality", "",
                  f"| completer | gain [95 % CI] | best-of-{k} MSE | mean MSE | diversity (pairwise RMS) |", "|---|---|---|---|---|"]
        for r in rs:
            gain = ("reference" if r["completer"] == "uncond" else
                    "n/a" if math.isnan(r["gain"]) else f"{r['gain']:+.3f} [{r['gain_lo']:+.3f}, {r['gain_hi']:+.3f}]")
            lines.append(f"| {r['completer']} | {gain} | {r['best_mse']:.4f} +- {r['best_mse_se']:.4f} | {r['mean_mse']:.4f} | "
                         f"{r['pairwise']:.4f} |")
        lines.append("")
        verdicts = []
        for r in rs:
            if r["completer"] == "uncond" or math.isnan(r["gain"]):
                continue
            side = "above" if r["gain_lo"] > 0 else "below" if r["gain_hi"] < 0 else None
            verdicts.append(f"{r['completer']}: " + (f"interval {side} 0" if side else "interval contains 0 (no difference shown)"))
        lines += ["Gain intervals: " + "; ".join(verdicts) + ".", ""]
    return "\n".join(lines)


def plot_completers(rows: Sequence[dict], path: Path) -> Path:
    """Gain over Uncond (with CI) against best-of-K MSE and against diversity, one row of panels per illness."""
    ills = list(dict.fromkeys(r["illness"] for r in rows))
    fig = Figure(figsize=(9, 3.6 * len(ills)))  # no pyplot: no global backend or figure registry
    axes = fig.subplots(len(ills), 2, squeeze=False)
    for ax_row, ill in zip(axes, ills):
        rs = [r for r in rows if r["illness"] == ill and not math.isnan(r["gain"])]
        for ax, col, label in ((ax_row[0], "best_mse", f"best-of-{QUALITY_K} MSE on unobserved pixels (lower = better coverage)"),
                               (ax_row[1], "pairwise", "diversity: mean pairwise RMS distance")):
            for i, r in enumerate(rs):
                ax.errorbar([r[col]], [r["gain"]], yerr=[[r["gain"] - r["gain_lo"]], [r["gain_hi"] - r["gain"]]],
                            marker="o", capsize=3, color=f"C{i}", label=r["completer"])
                ax.annotate(r["completer"], (r[col], r["gain"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.axhline(0, color="gray", lw=0.8, ls="--")
            ax.set_xlabel(label, fontsize=8)
            ax.set_ylabel(f"AUROC gain over Uncond, t = {rs[0]['t'].replace('-', '..') if rs else ''}", fontsize=8)
            ax.set_title(ill, fontsize=9)
        ax_row[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def publish_completers(out: Path, illnesses: Sequence[str], notes: str = "") -> list[dict]:
    """Read ``study-eval/<slug>/paired.csv`` and ``quality.csv``; write completers.{csv,md,png}."""
    qpath = out / "quality" / "quality.csv"
    if not qpath.is_file():
        raise UserError(f"{qpath} is missing; rerun the study to finish the quality stage")
    quality = pd.read_csv(qpath)
    rows = []
    for ill in illnesses:
        d = out / "study-eval" / resolve_illness(ill).slug
        rows += completer_table(read_paired(d / "paired.csv"), quality, resolve_illness(ill).name, eval_dir=d)
    write_completer_outputs(rows, out, notes)
    return rows


def write_completer_outputs(rows: Sequence[dict], out: Path, notes: str = "") -> dict[str, Path]:
    paths = {"csv": out / "completers.csv", "md": out / "completers.md", "png": out / "completers.png"}
    atomic_write_text(paths["csv"], _csv(rows, TABLE_COLUMNS))
    atomic_write_text(paths["md"], render_completer_md(rows, notes=notes))
    plot_completers(rows, paths["png"])
    return paths


# ----------------------------------------------------------------------------------------------
# completion quality stage


def scan_state_masks(n: int, geometry, scans: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 1, S, S)``: each a union of 1..``scans`` distinct grid patches (uniform count and locations)."""
    counts = torch.randint(1, scans + 1, (n,), generator=generator)  # (n,)
    order = torch.rand(n, geometry.num_locations, generator=generator).argsort(1)  # (n, L) random distinct locations
    return geometry.masks([order[i, :int(c)].tolist() for i, c in enumerate(counts)])  # (n, 1, S, S)


def completers_for(ipa_runs: dict[str, Path], train_set, device, temperature: float = 1.0) -> dict:
    """``{name: SampleFn}`` for :data:`QUALITY_NAMES`: IPA models by run folder, retrieval and dataset draws."""
    out = {}
    for name, run in ipa_runs.items():
        model = IPA.from_pretrained(run, map_location=device).eval()
        out[name] = IPASampler(model, temperature=temperature).sample
    out["eig-retrieval"] = RetrievalSampler(train_set).sample
    out["uncond"] = DatasetSampler(train_set).sample

    def on(fn):
        return lambda x_obs, m, n, g: fn(x_obs.to(device), m.to(device), n, g).cpu()

    return {k: on(out[k]) for k in QUALITY_NAMES if k in out}


def measure_quality(test_set, train_set, ipa_runs: dict[str, Path], geometry, scans: int, n_states: int, seed: int,
                    device, out_csv: Path, progress: bool = True) -> list:
    """Completion quality of every completer on ``n_states`` random scan states of test images -> ``out_csv``."""
    g = torch.Generator().manual_seed(seed)
    n = min(n_states, len(test_set))
    idx = torch.randperm(len(test_set), generator=g)[:n]
    images = dataset_images(test_set, idx)  # (n, C, S, S)
    masks = scan_state_masks(n, geometry, scans, g)  # (n, 1, S, S)
    rows = completion_quality(completers_for(ipa_runs, train_set, device), images, masks, n_samples=QUALITY_K,
                              seed=seed, progress=progress)
    fields = [f.name for f in dataclasses.fields(QualityRow)]
    atomic_write_text(out_csv, _csv([dataclasses.asdict(r) for r in rows], fields))
    return rows


# ----------------------------------------------------------------------------------------------
# orchestration


@dataclass
class PipelineOptions:
    """What every study shares with the demo it builds on: the run folder, profile, tasks, data, device, seed."""

    out: Path
    profile: object  # boed.demo.DemoProfile
    illnesses: tuple[str, ...] = ()
    data_root: Path | None = None
    cache_dir: Path | None = None
    device: str = "cpu"
    seed: int = 0
    data: str | None = None  # --data (as boed demo's); None: chestxray with data_root, else phantom

    def demo_options(self) -> demo.DemoOptions:
        return demo.DemoOptions(out=self.out, profile=self.profile, illnesses=self.illnesses, data_root=self.data_root,
                                data=self.data, cache_dir=self.cache_dir, device=self.device, seed=self.seed)


def check_demo_profile(out: Path, profile_name: str, command: str) -> None:
    """Refuse, before anything runs, a study whose ``out`` holds a ``boed demo`` run of another
    profile: the study would move its stages aside and train every model again at this profile
    (the cpu profile: about an hour on 2 cores) instead of reusing them."""
    summary = out / "summary.json"
    try:
        made = json.loads(summary.read_text()).get("profile", {}).get("name")
    except (OSError, ValueError, AttributeError):
        return
    if made and made != profile_name:
        raise UserError(f"--out {out} holds a `boed demo` run of profile {made}, this study runs profile {profile_name} "
                        f"and would retrain every model; pass --profile {made} to reuse them (`{command} --profile {made} "
                        f"--out {out}`), or another --out")


@dataclass
class StudyOptions(PipelineOptions):
    illnesses: tuple[str, ...] = tuple(resolve_illness(i).name for i in STUDY_ILLNESSES)
    repeats: int = DEFAULT_REPEATS
    n_states: int = DEFAULT_STATES


def study_stages(opts: StudyOptions, dopts: demo.DemoOptions) -> list[demo.Stage]:
    """Every stage of the completer study, in order: the demo's own data, VAE, IPA and AVP-CNN
    stages (so a demo run folder is reused), then IPA-R, the under-trained IPA, the evaluations,
    the quality measurement and the table."""
    p, out = opts.profile, opts.out
    data = demo._data_args(dopts)
    train = demo._train_args
    under = max(1, p.ipa_steps // UNDER_FRACTION)
    # the demo's own stages (fingerprinted, so a demo run folder is reused)
    stages = [demo.phantom_stage(dopts)] if dopts.data_root is not None and opts.data_root is None else []
    stages += [demo.data_stage(dopts), demo.vae_stage(dopts), demo.ipa_stage(dopts), demo.avp_stage(dopts)]
    avp = stages.pop()  # IPA-R and the under-trained IPA right after IPA, the AVP-CNN after them (as in the demo order)
    stages += [
        demo.Stage("ipar", "ipa_core train", "ipa_core.commands.train",
                   ["--stage", "ipa", "--objective", "reverse", "--vae", out / "vae", "--out", out / "ipar", *data,
                    *train(dopts, p.ipa_steps, p.ipa_batch)], ("data", "vae")),
        demo.Stage("ipa-under", "ipa_core train", "ipa_core.commands.train",
                   ["--stage", "ipa", "--vae", out / "vae", "--out", out / "ipa-under", *data, *train(dopts, under, p.ipa_batch)],
                   ("data", "vae")),
        avp,
    ]
    models = ["--ipa", out / "ipa", "--ipar", out / "ipar", "--ipa-under", out / "ipa-under", "--avp", out / "avp",
              "--device", opts.device]
    evals = []
    for ill in opts.illnesses:
        slug = resolve_illness(ill).slug
        evals.append(f"study-eval/{slug}")
        stages.append(demo.Stage(evals[-1], "boed evaluate", "boed.commands.evaluate",
                                 ["--illness", ill, "--scans", p.scans, "--methods", ",".join(STUDY_METHODS), "--n-test", p.n_test,
                                  "--n-samples", p.n_samples, "--repeats", opts.repeats, "--seed", opts.seed,
                                  "--batch-size", p.eval_batch, "--out", out / "study-eval" / slug, *models, *data],
                                 ("data", "ipa", "ipar", "ipa-under", "avp")))
    stages.append(demo.Stage("quality", "completion quality", _quality_stage(opts),
                             ["--states", opts.n_states, "--scans", p.scans, "--k", QUALITY_K, "--seed", opts.seed],
                             ("data", "ipa", "ipar", "ipa-under")))
    stages.append(demo.Stage("table", "publish", _table_stage(opts), [], ("quality", *evals)))
    return stages


def _quality_stage(opts: StudyOptions):
    def run(dopts) -> None:
        data = demo._data_name(dopts)  # noqa: SLF001 - the demo's one rule for --data
        kw = dict(size=opts.profile.image_size, cache_dir=opts.cache_dir)
        test = open_dataset(data, dopts.data_root, split="test", **kw)
        train = open_dataset(data, dopts.data_root, split="train", **kw)
        runs = {"eig-ipa": opts.out / "ipa", "eig-ipar": opts.out / "ipar", "eig-ipa-under": opts.out / "ipa-under"}
        measure_quality(test, train, runs, ScanGeometry(opts.profile.image_size), opts.profile.scans, opts.n_states,
                        opts.seed, parse_device(opts.device), ensure_writable_dir(opts.out / "quality") / "quality.csv")

    return run


def _table_stage(opts: StudyOptions):
    def run(dopts) -> None:
        p = opts.profile
        notes = (f"Profile {p.name} (S = {p.image_size}, N = {p.n_samples}, T = {p.scans}, {p.n_test} test images, "
                 f"R = {opts.repeats} repeats); under-trained IPA: {max(1, p.ipa_steps // UNDER_FRACTION)} of {p.ipa_steps} steps. "
                 f"Completion quality on {opts.n_states} random scan states (1..{p.scans} grid patches), the same states and "
                 f"seeds for every completer, best of {QUALITY_K} completions. Stage wall times: study.json.")
        publish_completers(opts.out, opts.illnesses, notes)

    return run


def run_completer_study(opts: StudyOptions) -> dict:
    """Run (or resume) every stage, the table (completers.{csv,md,png}) last; return the summary
    (also written to ``<out>/study.json`` with every stage's wall time)."""
    if opts.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {opts.repeats}")
    opts.out = ensure_writable_dir(opts.out)
    dopts = opts.demo_options()
    p = opts.profile
    if opts.data_root is None and p.phantom_n is not None:  # the demo's private small phantom set
        dopts.data_root = opts.out / "phantom"
    _, timings = demo.run_stages(dopts, study_stages(opts, dopts))
    timings["total"] = sum(timings.values())  # stages done by an earlier run count with their recorded time
    rows = pd.read_csv(opts.out / "completers.csv", dtype={"t": str}).to_dict(orient="records")
    summary = {"profile": dataclasses.asdict(p), "repeats": opts.repeats, "n_states": opts.n_states,
               "illnesses": list(opts.illnesses), "timings_s": timings, "rows": rows}
    atomic_write_json(opts.out / "study.json", summary)
    return summary


# ----------------------------------------------------------------------------------------------
# training-seed robustness


def seed_rows(paired_by_seed: dict[int, "object"], method: str = "eig-ipa",
              baselines: Sequence[str] = HEADLINE_BASELINES) -> list[dict]:
    """Per (illness, baseline, t): every seed's difference and CI, the pooled mean over seeds with a
    between-seed t interval, and whether the claim holds across seeds.

    ``paired_by_seed[K]`` is seed K's paired table (a DataFrame, all illnesses). ``holds`` is
    ``"+"``/``"-"`` when every seed's 95 % interval excludes 0 on that side, else ``"no"``; a seed
    without the row makes it ``"no"`` too. The pooled interval is ``mean +- t_{K-1} sd / sqrt(K)``
    over the per-seed differences (seeds as random draws of the training run; within-seed noise is
    part of their spread).
    """
    from scipy import stats  # +2.3 s on `boed --help` at the top (measured); only the seed study needs it

    seeds = sorted(paired_by_seed)
    keys: dict[tuple, None] = {}
    for k in seeds:
        p = paired_by_seed[k]
        for r in p[p["method"] == method].itertuples():
            if r.baseline in baselines:
                keys[(r.illness, r.baseline, str(r.t))] = None
    rows = []
    for ill, base, t in keys:
        row: dict = {"illness": ill, "baseline": base, "t": t}
        diffs, sides = [], []
        for k in seeds:
            g = gain_over(paired_by_seed[k], method, base, ill, t)
            row[f"seed{k}"], row[f"seed{k}_lo"], row[f"seed{k}_hi"] = (g["diff"], g["lo"], g["hi"]) if g else (float("nan"),) * 3
            if g:
                diffs.append(g["diff"])
                sides.append("+" if g["lo"] > 0 else "-" if g["hi"] < 0 else "0")
            else:
                sides.append("missing")
        K = len(diffs)
        mean = sum(diffs) / K if K else float("nan")
        sd = (sum((d - mean) ** 2 for d in diffs) / (K - 1)) ** 0.5 if K > 1 else float("nan")
        half = float(stats.t.ppf(0.975, K - 1)) * sd / K ** 0.5 if K > 1 else float("nan")
        row.update({"pooled": mean, "pooled_lo": mean - half, "pooled_hi": mean + half, "between_seed_sd": sd, "n_seeds": K,
                    "holds": sides[0] if sides and sides[0] in "+-" and len(set(sides)) == 1 else "no"})
        rows.append(row)
    order = {b: i for i, b in enumerate(baselines)}
    return sorted(rows, key=lambda r: (r["illness"], order[r["baseline"]], ("-" in r["t"], r["t"])))


def render_seed_md(rows: Sequence[dict], seeds: Sequence[int], wall_s: float | None = None) -> str:
    lines = ["# Training-seed robustness: EIG-IPA minus each baseline, per seed and pooled", "",
             f"Seeds {', '.join(map(str, seeds))}: each a full `boed demo --seed K` (VAE, IPA, AVP-CNN retrained). "
             "Per seed: difference [paired 95 % CI]; pooled: mean over seeds [between-seed t interval]. "
             "A claim holds across seeds (+ or -) only when every seed's interval excludes 0 on the same side."
             + (f" Wall time {wall_s / 60:.0f} min." if wall_s else ""), ""]
    head = "| illness | baseline | t | " + " | ".join(f"seed {k}" for k in seeds) + " | pooled | holds |"
    lines += [head, "|---|---|---|" + "---|" * (len(seeds) + 2)]
    for r in rows:
        cells = [f"{r[f'seed{k}']:+.3f} [{r[f'seed{k}_lo']:+.3f}, {r[f'seed{k}_hi']:+.3f}]" if not math.isnan(r[f"seed{k}"]) else "n/a"
                 for k in seeds]
        pooled = f"{r['pooled']:+.3f} [{r['pooled_lo']:+.3f}, {r['pooled_hi']:+.3f}]" if not math.isnan(r["pooled_lo"]) else f"{r['pooled']:+.3f}"
        lines.append(f"| {r['illness']} | {r['baseline']} | {r['t']} | " + " | ".join(cells) + f" | {pooled} | {r['holds']} |")
    held = [r for r in rows if "-" in r["t"] and r["holds"] != "no"]
    lines += ["", "Averaged over t: " + ("; ".join(f"{r['illness']} vs {r['baseline']}: holds ({r['holds']})" for r in held)
                                        if held else "no difference holds across seeds") + ".", ""]
    return "\n".join(lines)


def plot_seeds(rows: Sequence[dict], seeds: Sequence[int], path: Path) -> Path:
    """Per (illness, baseline): every seed's difference per t with its CI, and the pooled mean."""
    panels = list(dict.fromkeys((r["illness"], r["baseline"]) for r in rows))
    fig = Figure(figsize=(3.4 * max(1, len(panels)), 3.2))  # no pyplot: no global backend or figure registry
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)
    for ax, (ill, base) in zip(axes[0], panels):
        rs = [r for r in rows if (r["illness"], r["baseline"]) == (ill, base)]
        labels = [r["t"] for r in rs]
        for j, k in enumerate(seeds):
            xs = [i + (j - (len(seeds) - 1) / 2) * 0.12 for i in range(len(rs))]
            ys = [r[f"seed{k}"] for r in rs]
            err = [[max(0.0, r[f"seed{k}"] - r[f"seed{k}_lo"]) for r in rs], [max(0.0, r[f"seed{k}_hi"] - r[f"seed{k}"]) for r in rs]]
            ax.errorbar(xs, ys, yerr=err, fmt="o", ms=3, capsize=2, color=f"C{j}", label=f"seed {k}")
        ax.plot(range(len(rs)), [r["pooled"] for r in rs], "k_", ms=14, mew=2, label="pooled")
        ax.axhline(0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(rs)), [l.replace("-", "..") for l in labels], fontsize=7)
        ax.set_xlabel("t")
        ax.set_title(f"{ill}: EIG-IPA - {base}", fontsize=8)
    axes[0][0].set_ylabel("AUROC difference")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


SEED_COLUMNS_FIXED = ("illness", "baseline", "t")
SEED_COLUMNS_TAIL = ("pooled", "pooled_lo", "pooled_hi", "between_seed_sd", "n_seeds", "holds")


def publish_seeds(out: Path, seeds: Sequence[int], wall_s: float | None = None) -> list[dict]:
    """Pool ``OUT/seed-K/eval/*/paired.csv`` into seeds.{csv,md,png}."""
    tables = {}
    for k in seeds:
        files = sorted((out / f"seed-{k}" / "eval").glob("*/paired.csv"))
        if not files:
            raise UserError(f"no paired.csv under {out / f'seed-{k}' / 'eval'}; rerun the seed study to finish seed {k}")
        tables[k] = pd.concat([pd.read_csv(f, dtype={"t": str}) for f in files], ignore_index=True)
    rows = seed_rows(tables)
    if wall_s is None:  # the demos' own totals (stages done earlier count with their recorded time)
        totals = [json.loads(p.read_text())["timings_s"]["total"] for k in seeds if (p := out / f"seed-{k}" / "summary.json").is_file()]
        wall_s = sum(totals) if totals else None
    cols = [*SEED_COLUMNS_FIXED, *(f"seed{k}{s}" for k in seeds for s in ("", "_lo", "_hi")), *SEED_COLUMNS_TAIL]
    atomic_write_text(out / "seeds.csv", _csv(rows, cols))
    atomic_write_text(out / "seeds.md", render_seed_md(rows, seeds, wall_s))
    plot_seeds(rows, seeds, out / "seeds.png")
    return rows


def parse_seeds(spec: str) -> list[int]:
    try:
        seeds = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be a comma list of integers like 0,1,2, got {spec!r}") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds needs at least 2 distinct seeds (e.g. 0,1,2), got {spec!r}")
    return seeds


def run_seed_study(seeds: Sequence[int], out: Path, demo_argv: Sequence[str] = ()) -> list[dict]:
    """``boed demo --seed K --out OUT/seed-K *demo_argv`` for every K (each resumes), then :func:`publish_seeds`."""
    ensure_writable_dir(out)
    for k in seeds:
        log.info("[seed %d] boed demo --seed %d --out %s %s", k, k, out / f"seed-{k}", " ".join(map(str, demo_argv)))
        demo.run_command("boed.commands.demo", ["--seed", k, "--out", out / f"seed-{k}", *demo_argv])
    return publish_seeds(out, seeds)
