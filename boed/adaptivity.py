"""Where adaptive scanning pays (issue 21): the power study and the variability sweep.

**Power study** (:func:`run_power_study`, ``boed study power``). On a run folder (a finished
``boed demo`` folder reuses its data, VAE, IPA and AVP-CNN stages), ``boed evaluate`` scores
EIG-IPA, Uncond, the clairvoyant reference (greedy on the true image,
:class:`boed.baselines.policies.ClairvoyantPolicy`), Random and the full image on ``n_test``
test images per task with R policy repeats and common random numbers. ``power.{csv,md,png}``
then say, per task, over t = 2..T (t = 1 is shared by EIG-IPA and Uncond):

- the paired difference EIG-IPA minus Uncond with its two-level 95 % interval and the interval's
  half-width (the study's aim: at most :data:`TARGET_HALF_WIDTH`, enough to resolve the paper's
  +0.02);
- the *room*, clairvoyant minus Uncond: what greedy EIG with a perfect completer gains;
- the *capture*, (EIG-IPA - Uncond) / (clairvoyant - Uncond): the share of the room IPA recovers;
- EIG-IPA minus Random and minus the full image, for scale.

**Variability sweep** (:func:`run_variability_sweep`, ``boed study variability``). For each
phantom difficulty preset (:data:`xray.phantom.difficulty.PRESETS`: how much films vary in pose,
anatomy, finding size, position and laterality), a phantom set of that preset, the demo's
training stages on it and the power study's evaluation; ``variability.{csv,md,png}``: x = level,
y = gain over Uncond of EIG-IPA and of the clairvoyant reference with intervals, Random and the
full image for scale. The presets are test beds chosen before any policy was run on them
(see :mod:`xray.phantom.difficulty`); never tune them to a result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from xray.errors import UserError
from xray.io import atomic_path, atomic_write_json, atomic_write_text, ensure_writable_dir
from xray.labels import resolve_illness

from . import demo
from .evaluation.records import load_records
from .evaluation.report import capture_rows, mean_label, paired_rows
from .study import PipelineOptions

log = logging.getLogger("boed.adaptivity")

POWER_METHODS = ("eig-ipa", "uncond", "clairvoyant", "random", "full")
DEFAULT_POWER_N = 1000  # test images per task
# policy repeats: the interval of EIG-IPA - Uncond is dominated by the spread between repeats (measured: R = 3 gave
# +-0.015 on Effusion at 1 000 images, R = 7 gave +-0.009; an image-only bootstrap is +-0.006), so R, not n, sets it
DEFAULT_POWER_REPEATS = 7
TARGET_HALF_WIDTH = 0.012  # of the paired interval of EIG-IPA minus Uncond over t = 2..T
POWER_ILLNESSES = ("effusion", "edema")
LEVELS = ("default", "realistic", "hard")  # the sweep's order: how much the films vary
POWER_COLUMNS = ["level", "illness", "t", "n", "positives", "repeats", "gain_uncond", "gain_uncond_lo", "gain_uncond_hi",
                 "half_width", "gain_uncond_sd_repeats", "room", "room_lo", "room_hi", "capture", "capture_lo", "capture_hi",
                 "clairvoyant_minus_uncond", "eig_minus_random", "eig_minus_random_lo", "eig_minus_random_hi",
                 "eig_minus_full", "eig_minus_full_lo", "eig_minus_full_hi"]


# ----------------------------------------------------------------------------------------------
# the table


def power_row(records: Sequence[dict], illness: str, scans: int, n_boot: int = 1000, seed: int = 0,
              level: str = "") -> dict:
    """One row of ``power.csv`` from the records of one task's evaluation (all five methods)."""
    ill = resolve_illness(illness)
    span = mean_label(scans)
    paired = {r["baseline"]: r for r in paired_rows(records, [ill.name], scans, n_boot=n_boot, seed=seed)
              if r["t"] == span}
    missing = [m for m in ("uncond", "clairvoyant") if m not in paired]
    if missing:
        raise UserError(f"the {ill.name} records hold no {', '.join(missing)} (the power study needs "
                        f"{', '.join(POWER_METHODS)}); rerun its evaluation")
    cap = capture_rows(records, [ill.name], scans, n_boot=n_boot, seed=seed)[0]
    u = paired["uncond"]
    labels = {r["index"]: r["labels"] for r in records if r["method"] == "eig-ipa"}
    positives = int(sum(ill.target(np.asarray(v, dtype=np.float32)) for v in labels.values()))
    row = {"level": level, "illness": ill.name, "t": span, "n": u["n"], "positives": positives, "repeats": u["repeats"],
           "gain_uncond": u["diff"], "gain_uncond_lo": u["diff_lo"], "gain_uncond_hi": u["diff_hi"],
           "half_width": (u["diff_hi"] - u["diff_lo"]) / 2, "gain_uncond_sd_repeats": u["diff_sd_repeats"], "room": cap["room"], "room_lo": cap["room_lo"],
           "room_hi": cap["room_hi"], "capture": cap["capture"], "capture_lo": cap["capture_lo"],
           "capture_hi": cap["capture_hi"], "clairvoyant_minus_uncond": cap["room"]}
    for base, key in (("random", "eig_minus_random"), ("full", "eig_minus_full")):
        r = paired.get(base, {})
        row[key], row[f"{key}_lo"], row[f"{key}_hi"] = (r.get(k, float("nan")) for k in ("diff", "diff_lo", "diff_hi"))
    return row


def _fmt(v: float, lo: float, hi: float) -> str:
    return f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def render_power_md(rows: Sequence[dict], notes: str = "") -> str:
    """The markdown table of ``power.csv`` (one line per level and task)."""
    out = ["| level | illness | n (positives) | R | EIG-IPA - Uncond | half-width | sd over repeats | room: clairvoyant - Uncond "
           "| capture | EIG-IPA - Random | EIG-IPA - full |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['level'] or '-'} | {r['illness']} | {r['n']} ({r['positives']}) | {r['repeats']} "
                   f"| {_fmt(r['gain_uncond'], r['gain_uncond_lo'], r['gain_uncond_hi'])} | {r['half_width']:.3f} "
                   f"| {r.get('gain_uncond_sd_repeats', float('nan')):.3f} "
                   f"| {_fmt(r['room'], r['room_lo'], r['room_hi'])} "
                   f"| {r['capture']:.2f} [{r['capture_lo']:.2f}, {r['capture_hi']:.2f}] "
                   f"| {_fmt(r['eig_minus_random'], r['eig_minus_random_lo'], r['eig_minus_random_hi'])} "
                   f"| {_fmt(r['eig_minus_full'], r['eig_minus_full_lo'], r['eig_minus_full_hi'])} |")
    aim = (f"AUROC averaged over t = {rows[0]['t'] if rows else '2-T'}; paired two-level 95 % intervals (policy repeats, "
           f"then test images). Aim: half-width of EIG-IPA - Uncond at most {TARGET_HALF_WIDTH}. Capture = (EIG-IPA - "
           "Uncond) / (clairvoyant - Uncond), meaningful only where the room's interval excludes 0. `sd over repeats`: "
           "the spread of EIG-IPA - Uncond between policy repeats (its IPA draws); with it the interval narrows as "
           "1/sqrt(R), not with more test images.")
    return "\n".join(out) + "\n\n" + aim + ("\n\n" + notes if notes else "") + "\n"


def plot_power(rows: Sequence[dict], path: str | Path, x: str = "level") -> Path:
    """Gain over Uncond of EIG-IPA and of the clairvoyant (room), with intervals, per level (or task);
    EIG-IPA minus Random and minus the full image (negated: full minus EIG-IPA) for scale."""
    fig = Figure(figsize=(7.5, 3.6))
    illnesses = list(dict.fromkeys(r["illness"] for r in rows))
    axes = [fig.add_subplot(1, len(illnesses) or 1, k + 1) for k in range(len(illnesses) or 1)]
    for ax, ill in zip(axes, illnesses):
        sub = [r for r in rows if r["illness"] == ill]
        xs = np.arange(len(sub))
        for dx, (key, lo, hi, label, style) in enumerate((
                ("gain_uncond", "gain_uncond_lo", "gain_uncond_hi", "EIG-IPA - Uncond", "o-"),
                ("room", "room_lo", "room_hi", "clairvoyant - Uncond (room)", "s--"))):
            v = np.array([r[key] for r in sub])
            err = np.array([[r[key] - r[lo] for r in sub], [r[hi] - r[key] for r in sub]])
            ax.errorbar(xs + 0.08 * (dx - 0.5), v, yerr=err, fmt=style, capsize=3, label=label)
        ax.plot(xs, [r["eig_minus_random"] for r in sub], "x:", color="C5", label="EIG-IPA - Random")
        ax.plot(xs, [-r["eig_minus_full"] for r in sub], "+-.", color="k", label="full image - EIG-IPA")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xlim(-0.5, len(sub) - 0.5)
        ax.set_xticks(xs, [r[x] or "-" for r in sub])
        ax.set_title(ill, fontsize=9)
        ax.set_ylabel(f"AUROC difference, t = {sub[0]['t']}" if sub else "AUROC difference")
        ax.set_xlabel("phantom variability" if x == "level" else x)
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)


def write_power_outputs(rows: Sequence[dict], out: Path, stem: str, notes: str = "") -> dict[str, Path]:
    """``<stem>.csv``, ``<stem>.md`` and ``<stem>.png`` in ``out``."""
    csv = ",".join(POWER_COLUMNS) + "\n" + "".join(
        ",".join(f"{r.get(c, math.nan):.6g}" if isinstance(r.get(c, math.nan), float) else str(r[c]) for c in POWER_COLUMNS) + "\n" for r in rows)
    paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    atomic_write_text(paths["csv"], csv)
    atomic_write_text(paths["md"], render_power_md(rows, notes))
    plot_power(rows, paths["png"], x="level" if any(r["level"] for r in rows) else "illness")
    return paths


# ----------------------------------------------------------------------------------------------
# orchestration


@dataclass
class PowerOptions(PipelineOptions):
    illnesses: tuple[str, ...] = POWER_ILLNESSES
    n_test: int = DEFAULT_POWER_N
    repeats: int = DEFAULT_POWER_REPEATS
    level: str = ""  # the phantom difficulty preset (variability sweep), "" otherwise


def power_stages(opts: PowerOptions, dopts: demo.DemoOptions) -> list[demo.Stage]:
    """The demo's training stages (a demo run folder is reused), then one evaluation per task."""
    p = opts.profile
    stages = [demo.phantom_stage(dopts)] if dopts.data_root is not None and opts.data_root is None else []
    stages += [demo.data_stage(dopts), demo.vae_stage(dopts), demo.ipa_stage(dopts), demo.avp_stage(dopts)]
    for ill in opts.illnesses:
        slug = resolve_illness(ill).slug
        stages.append(demo.Stage(f"power-eval/{slug}", "boed evaluate", "boed.commands.evaluate",
                                 ["--illness", ill, "--scans", p.scans, "--methods", ",".join(POWER_METHODS),
                                  "--n-test", opts.n_test, "--repeats", opts.repeats, "--n-samples", p.n_samples,
                                  "--seed", opts.seed, "--batch-size", p.eval_batch, "--out", opts.out / "power-eval" / slug,
                                  *demo._model_args(dopts), *demo._data_args(dopts)],
                                 upstream=("data", "ipa", "avp")))
    return stages


def run_power_study(opts: PowerOptions, publish: bool = True) -> list[dict]:
    """Run (or resume) every stage, then ``power.{csv,md,png}`` in ``opts.out``; returns the rows."""
    if opts.repeats < 1 or opts.n_test < 1:
        raise UserError(f"--repeats and --n-test must be >= 1, got {opts.repeats} and {opts.n_test}")
    opts.out = ensure_writable_dir(opts.out)
    dopts = opts.demo_options()
    if opts.data_root is None and opts.profile.phantom_n is not None:  # the demo's private small phantom set
        dopts.data_root = opts.out / "phantom"
    _, timings = demo.run_stages(dopts, power_stages(opts, dopts))
    rows = [power_row(load_records(opts.out / "power-eval" / resolve_illness(ill).slug), ill, opts.profile.scans,
                      level=opts.level) for ill in opts.illnesses]
    atomic_write_json(opts.out / "power.json", {"profile": dataclasses.asdict(opts.profile), "n_test": opts.n_test,
                                                "repeats": opts.repeats, "timings_s": timings, "rows": rows})
    if publish:
        notes = (f"Profile {opts.profile.name} (S = {opts.profile.image_size}, N = {opts.profile.n_samples}, "
                 f"T = {opts.profile.scans}), {opts.n_test} test images per task, R = {opts.repeats}. "
                 f"Stage wall times: power.json.")
        write_power_outputs(rows, opts.out, "power", notes)
    return rows


def reused_rows(run: Path, level: str, illnesses: Sequence[str]) -> list[dict]:
    """``level``'s rows from a finished power study in ``run`` (its ``power.json``), one per task."""
    path = Path(run) / "power.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"--reuse {level}={run}: cannot read {path} ({type(e).__name__}); run `boed study power --out {run}` "
                        "first, or drop --reuse") from None
    if not isinstance(data, dict):
        raise UserError(f"--reuse {level}={run}: {path} holds no power study summary (a JSON object); rerun the power study")
    need = [c for c in POWER_COLUMNS if c not in ("level", "gain_uncond_sd_repeats")]  # the latter is newer than some summaries
    rows = {r["illness"]: r for r in data.get("rows", []) if isinstance(r, dict) and all(c in r for c in need)}
    names = [resolve_illness(i).name for i in illnesses]
    missing = [n for n in names if n not in rows]
    if missing:
        raise UserError(f"{run / 'power.json'} holds no {', '.join(missing)} row; rerun `boed study power --out {run} "
                        f"--illness {','.join(names)}` or drop --reuse {level}={run}")
    return [{**rows[n], "level": level} for n in names]


def run_variability_sweep(levels: Sequence[str], out: Path, profile, n_phantom: int, n_test: int,
                          repeats: int = DEFAULT_POWER_REPEATS, illnesses: Sequence[str] = POWER_ILLNESSES,
                          device: str = "cpu", seed: int = 0, cache_dir: Path | None = None,
                          reuse: Mapping[str, Path] | None = None) -> list[dict]:
    """For each level: ``xray phantom --difficulty LEVEL`` into ``OUT/LEVEL/phantom`` (a demo stage), then
    the power study on it in ``OUT/LEVEL``; ``variability.{csv,md,png}`` in ``out``. ``reuse``:
    ``{level: RUN}`` takes a level's rows from a finished ``boed study power --out RUN`` instead
    (e.g. the default level from the power study on the default phantom; the table states it)."""
    reuse = dict(reuse or {})
    unknown = [lv for lv in [*levels, *reuse] if lv not in LEVELS]
    if unknown or len(levels) < 2:
        raise UserError(f"--levels must name at least 2 of {', '.join(LEVELS)}, got {', '.join(levels) or 'none'}"
                        + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    stray = [lv for lv in reuse if lv not in levels]
    if stray:
        raise UserError(f"--reuse names level {', '.join(stray)}, which --levels ({', '.join(levels)}) does not; add it or drop it")
    reused = {lv: reused_rows(run, lv, illnesses) for lv, run in reuse.items()}  # checked before anything is made
    out = ensure_writable_dir(out)
    rows = []
    for level in levels:
        if level in reused:
            rows += reused[level]
            continue
        opts = PowerOptions(out=out / level, profile=profile, illnesses=tuple(illnesses), n_test=n_test, repeats=repeats,
                            data_root=out / level / "phantom", cache_dir=cache_dir, device=device, seed=seed, level=level)
        ensure_writable_dir(opts.out)
        phantom = demo.Stage("phantom", "xray phantom", "xray.commands.phantom",
                             ["--out", opts.data_root, "--n", n_phantom, "--size", profile.image_size, "--seed", seed,
                              "--demo-prevalence", "--difficulty", level])
        demo._stage(opts.demo_options(), phantom, {}, {})  # fingerprinted: a rerun adopts or redoes it, never mixes
        rows += run_power_study(opts, publish=False)
    notes = (f"Profile {profile.name}; per level a phantom set of {n_phantom} images (seed {seed}), VAE, IPA and AVP-CNN "
             f"trained on it, {n_test} test images per task, R = {repeats}."
             + "".join(f" Level {lv}: the rows of the power study in {run} (its own data and n, in the table)."
                       for lv, run in reuse.items()))
    write_power_outputs(rows, out, "variability", notes)
    return rows
