"""Copy a finished demo run's reference outputs into a folder (``results/`` in the repository).

Writes ``metrics.csv`` and ``paired.csv`` (every illness), ``auroc.png``, ``nll.png`` and
``paired.png`` (one panel per illness), one
heatmap figure per illness (only the illnesses of the run, as its ``summary.json`` lists them), the last VAE and IPA sample grids, and ``README.md`` with the table,
the figures, what data the run used (phantom or NIH-format folder, how many images), each stage's
wall time and the machine it ran on.
"""

from __future__ import annotations

import csv
import json
import shlex
import shutil
from pathlib import Path

from xray.errors import UserError
from xray.io import atomic_path, atomic_write_text
from xray.labels import resolve_illness

from .evaluation.report import CSV_COLUMNS, PAIRED_COLUMNS, plot_curves, plot_paired, to_csv


def _latest(folder: Path, pattern: str) -> Path | None:
    files = sorted(folder.glob(pattern))
    return files[-1] if files else None


def _copy(src: Path | None, dst: Path) -> str | None:
    if src is None or not src.is_file():
        return None
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst.name


def _value(key: str, text: str):
    """A CSV cell as written by :func:`boed.evaluation.report.to_csv`: counts and t as int (t may be a span
    like "1-5"), names as str, the rest float."""
    if key in ("method", "baseline", "illness") or (key == "t" and not text.isdigit()):
        return text
    return int(text) if key in ("t", "n", "repeats") else float(text)


def _read_rows(run: Path, slugs: list[str], name: str, columns) -> list[dict]:
    """Rows of ``eval/<slug>/<name>`` for the illnesses of this run (not every folder under eval/:
    earlier runs' illnesses and moved-aside outputs stay out)."""
    rows = []
    for slug in slugs:
        f = run / "eval" / slug / name
        if not f.is_file():
            continue
        with open(f, newline="") as fh:
            rows += [{k: _value(k, r[k]) for k in columns} for r in csv.DictReader(fh)]
    return rows


def data_sentence(data: dict | None) -> str:
    """What the run's data were, from the demo's data stage (``summary.json["data"]``)."""
    if not data:
        return "Data: not recorded (a run made before the demo recorded its data)."
    counts = f"{data['images']} images ({data.get('train', 0)} train, {data.get('test', 0)} test) at {data['image_size']} px"
    if data["kind"] == "phantom":
        return f"Data: {data['source']}, {counts}: synthetic phantoms, not real patients."
    return f"Data: real chest x-rays from {data['source']}, {counts}."


def publish(run: str | Path, dest: str | Path) -> Path:
    run, dest = Path(run), Path(dest)
    summary_file = run / "summary.json"
    if not summary_file.is_file():
        raise UserError(f"{summary_file} does not exist; run `boed demo --out {shlex.quote(str(run))}` first")
    summary = json.loads(summary_file.read_text())
    slugs = [resolve_illness(i).slug for i in summary.get("illnesses", [])]
    current = summary.get("current_stages")  # None: a summary from before it was recorded
    if current is not None:  # only results of this run's settings, never an older run's left in the folder
        slugs = [s for s in slugs if f"eval/{s}" in current]
        if not slugs:
            raise UserError(f"{summary_file} holds no evaluation made with the last run's settings (it stopped before "
                            f"the eval stage, or its settings differ); run `boed demo --out {run}` to the end, then publish")
    dest.mkdir(parents=True, exist_ok=True)
    rows = _read_rows(run, slugs, "metrics.csv", CSV_COLUMNS)
    atomic_write_text(dest / "metrics.csv", to_csv(rows, CSV_COLUMNS))
    paired = _read_rows(run, slugs, "paired.csv", PAIRED_COLUMNS)
    figures = []
    if rows:
        plot_curves(rows, "auroc", dest / "auroc.png")
        plot_curves(rows, "nll", dest / "nll.png")
        figures += [("AUROC after t scans (paper fig. 5, left)", "auroc.png"), ("NLL after t scans (paper fig. 8)", "nll.png")]
    if paired:
        atomic_write_text(dest / "paired.csv", to_csv(paired, PAIRED_COLUMNS))
        plot_paired(paired, dest / "paired.png")
        figures.append(("EIG-IPA minus each method on the same images, paired 95 % bands", "paired.png"))
    for scan_dir in [run / "scans" / f"{slug}-0" for slug in slugs if (run / "scans" / f"{slug}-0").is_dir()
                     and (current is None or f"scans/{slug}-0" in current)]:
        # scan 2 is the first choice that depends on this image (scan 1 uses dataset draws)
        step = scan_dir / "step_2.png" if (scan_dir / "step_2.png").is_file() else _latest(scan_dir, "step_*.png")
        name = _copy(step, dest / f"heatmap-{scan_dir.name[:-2]}.png")
        if name:
            figures.append((f"EIG heatmap and per-sample information gains, scan 2 ({scan_dir.name[:-2]})", name))
        name = _copy(scan_dir / "summary.png", dest / f"scans-{scan_dir.name[:-2]}.png")
        if name:
            figures.append((f"Chosen scans and classifier probability ({scan_dir.name[:-2]})", name))
    for stage, title in (("vae", "VAE samples"), ("ipa", "IPA completions")):
        name = _copy(_latest(run / stage / "samples", "*.png"), dest / f"{stage}-samples.png")
        if name:
            figures.append((title, name))
    md = ["# Reference outputs of `make demo`", "",
          f"Profile `{summary['profile']['name']}`: S = {summary['profile']['image_size']}, "
          f"N = {summary['profile']['n_samples']} completions, T = {summary['profile']['scans']} scans, "
          f"{summary['profile']['n_test']} test images per illness. {data_sentence(summary.get('data'))} "
          "Written by `make demo`; do not edit by hand. "
          "A stage that was already done (e.g. `data` when the phantom set is cached) shows the time "
          "of the run that did it, or about 0 s when its output predates the demo.", "",
          (run / "summary.md").read_text(), ""]
    for title, name in figures:
        md += [f"## {title}", "", f"![{title}]({name})", ""]
    md += [FILES_SECTION]
    atomic_write_text(dest / "README.md", "\n".join(md))
    return dest


FILES_SECTION = """## Files in this folder

Written by `make demo` (`boed demo --out runs/demo --publish results`), which replaces them on every run:

| file | what |
|---|---|
| `README.md` | this page: the tables above (from `runs/demo/summary.md`) and the figures below them |
| `metrics.csv` | one row per method, illness and t = 0..T: AUROC with its two-level bootstrap 95 % interval (`auroc_lo`, `auroc_hi`; policy seeds, then test images), `auroc_sd_repeats` (spread between policy seeds), the classifier's NLL with its interval, `n` test images and `repeats` |
| `paired.csv` | EIG-IPA minus each other method (`baseline`) per illness, per t and averaged over t = 2..T (`t` = `2-T`), on the same images and seeds: difference, paired two-level bootstrap 95 % interval, `diff_sd_repeats`, `p_above` (fraction of resamples with EIG-IPA ahead) |
| `auroc.png`, `nll.png` | AUROC and NLL against t for every method (paper fig. 5 left and fig. 8) |
| `paired.png` | the differences of `paired.csv` with their bands |
| `heatmap-<illness>.png` | the second scan of one test image: observations, EIG over the 17 x 17 grid with the chosen cell, completions and their information gains (`boed run`) |
| `scans-<illness>.png` | all scans chosen for that image and the classifier's probability after each |
| `vae-samples.png`, `ipa-samples.png` | the last sample grids of the VAE and IPA training runs |

Written by other tools (not touched by `make demo`):

| file | what | made by |
|---|---|---|
| `coverage.csv`, `coverage.md`, `coverage.png` | do IPA completions cover the truth: best-of-K pixel MSE on the unobserved pixels (K = 1, 10, 100) and sample diversity per observed-fraction bin, for IPA at t = 1 and 0.85 and IPA-R; `coverage.md` says which models and images | `python benchmarks/coverage.py --ipa DIR [--ipa-r DIR]` |
| `phantom_contact_sheet.png` | a few phantom images per label, with the NIH-derived boxes drawn: what the synthetic findings look like | `xray.phantom.contact_sheet(ROOT, "results/phantom_contact_sheet.png")` on a phantom set |
| `policies.md`, `policies-*.csv`, `policies-*.png` | the amortised policies (distilled EIG-IPA, GDFS) on the demo's models, evaluated beside EIG-IPA, Uncond and Random with the same protocol; `policies.md` says how they were made and what they show | `boed train-policy`, `boed evaluate --methods eig,uncond,random,distilled,gdfs` (or `make demo-policies`) |
| `completers.*` (`make study`), `seeds.*` (`make study-seeds`) | the completer study and the training-seed study, when they have been run | `boed study completers`, `boed study seeds` |
"""
