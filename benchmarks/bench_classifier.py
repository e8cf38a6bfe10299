"""The AVP-CNN measured: training recipes x phantom difficulty presets (issue 24), and throughput.

``recipes`` (the default mode): for each phantom preset (``xray phantom --difficulty``) a set of
``--n`` images at 64 px with the demo prevalences is generated once (seed ``--data-seed``), and
each training recipe trains a tiny AVP-CNN with the cpu demo profile's batch and learning rate
(``boed.demo.PROFILES["cpu"]``) and its former 2 000 steps (:data:`BASE_STEPS`; ``-2x`` recipes
double them) through the same code as ``boed train-avp``. The cpu profile's recipe is the
winner of this table (``full+scan-2x-std``, over three training seeds). Each model is
scored on every test image (>= 500) for the demo illnesses (Effusion, Edema):

- ``full``: AUROC on the full image;
- ``random t``: after t = 1..5 Random scans (distinct uniformly random scan-grid locations, one
  sequence per test image, the same sequences for every recipe);
- ``uncond t``: after the first t scans of the Uncond sequence (``boed.baselines.policies.UncondPolicy``,
  greedy EIG with N = 10 dataset draws; the sequence ignores the test image, so one sequence per
  model and illness), which is also the t = 1 choice of EIG-IPA.

95 % CIs are percentile bootstraps over test images (``--bootstrap`` resamples; the same resamples
for every cell of a row). ``--seeds`` trains each recipe once per training seed and scores every
seed on the same test images, scan sequences and resamples (common random numbers); the table
averages over seeds and gives each multi-seed row's spread, since on ``hard`` one training seed
moves the full-image AUROC by up to +-0.05. Each finished row is written to ``benchmarks/results/classifier.json``
at once (a rerun skips rows already there: the run is resumable); at the end a markdown table
goes to ``benchmarks/results/classifier.md``. Wall times are the training's (the machine may be
shared: see the JSON's ``note``).

``throughput``: the AVP-CNN forward throughput per architecture, batch and memory format
(``benchmarks/results/classifier_throughput.json``), as before.

    python benchmarks/bench_classifier.py [recipes] [--presets default,hard] [--recipes default,old] [--seeds 0,1,2] [--quick]
    python benchmarks/bench_classifier.py throughput [--quick] [--device cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from boed.classifier import AVPClassifier, AVPConfig
from xray.io import atomic_write_json, atomic_write_text

RESULTS_DIR = Path(__file__).parent / "results"
RESULTS = RESULTS_DIR / "classifier.json"
TABLE = RESULTS_DIR / "classifier.md"
THROUGHPUT = RESULTS_DIR / "classifier_throughput.json"

ILLNESSES = ("Effusion", "Edema")  # the demo's tasks
T = 5  # scans
PRESET_NAMES = ("default", "realistic", "hard")

TTA_SHIFT = 2  # px: test-time averaging over the input and its shifts by this much up, down, left and right

#: name -> (what it is, AVPTrainConfig overrides, AVPConfig overrides (``tta``: scoring only), steps factor)
RECIPES: dict[str, tuple[str, dict, dict, float]] = {
    "default": ("today's default: free-form/uniform-patch mixture, no full images (I.4)",
                dict(p_full=0.0, p_freeform=0.5, patch_layout="uniform"), {}, 1.0),
    "old": ("the old default --p-full 0.2 --p-freeform 0", dict(p_full=0.2, p_freeform=0.0, patch_layout="uniform"), {}, 1.0),
    "scan+ff": ("scan-grid unions of 0..5 patches, free-form share 1/2", dict(p_full=0.0, p_freeform=0.5, patch_layout="scan"), {}, 1.0),
    "full+scan": ("--p-full 0.2 --p-freeform 0 --patch-layout scan", dict(p_full=0.2, p_freeform=0.0, patch_layout="scan"), {}, 1.0),
    "full+scan+ff": ("--p-full 0.2 --p-freeform 0.25 --patch-layout scan",
                     dict(p_full=0.2, p_freeform=0.25, patch_layout="scan"), {}, 1.0),
    "old-2x": ("the old default with 2x the steps", dict(p_full=0.2, p_freeform=0.0, patch_layout="uniform"), {}, 2.0),
    "full+scan-2x": ("full+scan with 2x the steps", dict(p_full=0.2, p_freeform=0.0, patch_layout="scan"), {}, 2.0),
    "full+scan-w20": ("full+scan, tiny net width 20 (2.7x the FLOPs)", dict(p_full=0.2, p_freeform=0.0, patch_layout="scan"),
                      dict(width=20), 1.0),
    "full+scan-2x-ipa": ("full+scan-2x on `--arch encoder --init ipa:RUN`: the partial encoder of a finished demo's IPA "
                         "(--encoder-run; its images are other draws of the preset, never this table's test images) "
                         "fine-tuned; 6.5x the tiny net's FLOPs per input, no patch-local scoring",
                         dict(p_full=0.2, p_freeform=0.0, patch_layout="scan"), dict(arch="encoder", init="ipa"), 2.0),
    "full+scan-2x-enc": ("the control of full+scan-2x-ipa: the same encoder architecture (read from --encoder-run's IPA), "
                         "input standardisation and steps, from random weights (no init)",
                         dict(p_full=0.2, p_freeform=0.0, patch_layout="scan"), dict(arch="encoder", init="ipa", scratch=True), 2.0),
    "full+scan-2x-nomask": ("full+scan-2x without the mask channel (mask_channel=False: the net sees x * m only)",
                            dict(p_full=0.2, p_freeform=0.0, patch_layout="scan"), dict(mask_channel=False), 2.0),
    "full+scan-2x-std": ("full+scan-2x with the input standardised by the training images' pixel mean and std "
                         "(input_norm 'dataset': unobserved pixels read as the mean, not as black)",
                         dict(p_full=0.2, p_freeform=0.0, patch_layout="scan"), dict(input_norm="dataset"), 2.0),
    "full+scan-2x+tta": ("full+scan-2x scored with test-time averaging: the mean probability over the input and its 4 "
                         f"shifts by {TTA_SHIFT} px (image and mask shifted together, unobserved fill); 5x the inference",
                         dict(p_full=0.2, p_freeform=0.0, patch_layout="scan"), dict(tta=True), 2.0),
    "full+scan-2x-vae": ("full+scan-2x on `--arch encoder --init vae:RUN`: the VAE's encoder phi, a zero mask channel",
                         dict(p_full=0.2, p_freeform=0.0, patch_layout="scan"), dict(arch="encoder", init="vae"), 2.0),
}

CHOSEN = "full+scan-2x-std"  # the recipe of the cpu demo profile, chosen from this table (three training seeds)
REPLACED = "full+scan-2x"  # the cpu profile's recipe before CHOSEN, compared with it seed by seed

log = logging.getLogger("bench_classifier")


# ----------------------------------------------------------------------------------------------
# recipes x presets


BASE_STEPS = 2000  # the cpu profile's AVP steps when the recipes were compared (the "2x" recipes double it)


def cpu_recipe():
    """Batch and learning rate of the cpu demo profile's AVP stage and :data:`BASE_STEPS`, as a TrainConfig."""
    from boed.commands.train_avp import _defaults
    from boed.demo import PROFILES

    p = PROFILES["cpu"]
    return p, dataclasses.replace(_defaults(), steps=BASE_STEPS, batch_size=p.avp_batch, lr=p.avp_lr, device="cpu")


def make_data(work: Path, preset: str, n: int, seed: int):
    """(train, test) datasets of a phantom set of ``preset`` (generated once under ``work``)."""
    from xray import phantom
    from xray.dataset import open_dataset

    root = work / f"phantom-{preset}-n{n}-s{seed}-v{phantom.PHANTOM_VERSION}"
    if not root.is_dir():
        phantom.generate(root, n=n, size=64, seed=seed, workers=1, prevalence=phantom.DEMO_PREVALENCE,
                         progress=False, difficulty=preset)
    kw = dict(size=64, cache_dir=work / "cache", progress=False, workers=1)
    return open_dataset("chestxray", root, split="train", **kw), open_dataset("chestxray", root, split="test", **kw)


def train(recipe: str, train_set, steps_scale: float, run_dir: Path, seed: int = 0, steps: int | None = None,
          encoder_run: Path | None = None):
    """Train one recipe as ``boed train-avp`` does (cpu profile); return (model, seconds). Recipes
    on ``--arch encoder`` start from ``encoder_run``'s ``ipa/`` or ``vae/`` (a finished demo folder)."""
    from ipa_core.seeding import seeded
    from ipa_core.trainer import fit

    from boed.classifier import init_config, init_state, parse_init
    from boed.train_avp import AVPTrainConfig, AVPTrainTask, training_norm_stats

    _, tcfg0 = cpu_recipe()
    _, tr, mo, factor = RECIPES[recipe]
    n_steps = steps if steps is not None else int(round(tcfg0.steps * factor * steps_scale))
    tcfg = dataclasses.replace(tcfg0, steps=n_steps, seed=seed, sample_every=10**9, ckpt_every=max(n_steps, 1),
                               log_every=max(n_steps // 4, 1))
    mo = dict(mo)
    mo.pop("tta", None)  # scoring only
    if mo.get("input_norm") == "dataset":
        mo["norm_stats"] = training_norm_stats(train_set, seed)  # as `boed train-avp --input-norm dataset`
    kind = mo.pop("init", None)
    scratch = mo.pop("scratch", False)  # the encoder's architecture from the init's config, random weights
    if kind is not None and encoder_run is None:
        raise SystemExit(f"recipe {recipe} starts from a trained {kind.upper()}: pass --encoder-run RUN (a finished boed demo folder)")
    init = parse_init("scratch" if kind is None else f"{kind}:{encoder_run / kind}", mo.get("arch", "tiny"), None)
    mcfg = init_config(AVPConfig(image_size=train_set.image_size, **mo), init)
    with seeded(seed):
        model = AVPClassifier(mcfg) if scratch else init_state(AVPClassifier(mcfg), init)
    task = AVPTrainTask(model, AVPTrainConfig(seed=seed, **tr), progress=False)
    t0 = time.perf_counter()
    out = fit(task, train_set, tcfg, run_dir)
    return out.eval(), time.perf_counter() - t0


def auroc_matrix(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """AUROC of each row of ``scores (R, n)`` against labels ``y (R, n)`` (average ranks for ties)."""
    from scipy.stats import rankdata

    r = rankdata(scores, axis=1)  # (R, n)
    pos = y.sum(1)
    neg = y.shape[1] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((r * y).sum(1) - pos * (pos + 1) / 2) / (pos * neg)


def shifted(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``t (B, C, S, S)`` moved by (dy, dx) pixels, the vacated border filled with 0 (unobserved)."""
    S = t.shape[-1]
    p = torch.nn.functional.pad(t, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))  # (B, C, S + |dy|, S + |dx|)
    return p[..., max(-dy, 0):max(-dy, 0) + S, max(-dx, 0):max(-dx, 0) + S]  # (B, C, S, S)


def predict_tta(model, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Test-time averaging: the mean of ``predict_proba`` over the input and its 4 shifts by :data:`TTA_SHIFT` px."""
    k = TTA_SHIFT
    views = [(0, 0), (k, 0), (-k, 0), (0, k), (0, -k)]
    return torch.stack([model.predict_proba(shifted(x, dy, dx), shifted(m, dy, dx)) for dy, dx in views]).mean(0)  # (B, K)


def score_model(model, train_set, test_set, n_boot: int, seed: int = 0, tta: bool = False) -> dict:
    """Full / Random t / Uncond t AUROCs with bootstrap CIs for each illness (``tta``: every input scored
    with :func:`predict_tta`; the Uncond sequence is still chosen with the plain model)."""
    from boed.baselines.policies import UncondPolicy
    from boed.geometry import ScanGeometry
    from boed.samplers import DatasetSampler
    from xray.dataset import dataset_images
    from xray.labels import resolve_illness

    n = len(test_set)
    S = model.config.image_size
    geom = ScanGeometry(S)
    x = dataset_images(test_set, list(range(n)))  # (n, C, S, S) uint8
    Y = np.asarray(test_set.labels)  # (n, K)
    g = torch.Generator().manual_seed(1234 + seed)
    locs = torch.rand(n, geom.num_locations, generator=g).argsort(dim=1)[:, :T]  # (n, T) distinct random scans
    boot = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # (R, n) resampled test images

    def probs(masks_fn) -> np.ndarray:
        out = []
        for s in range(0, n, 256):
            idx = list(range(s, min(s + 256, n)))
            out.append(predict_tta(model, x[idx], masks_fn(idx)) if tta else model.predict_proba(x[idx], masks_fn(idx)))
        return torch.cat(out).double().numpy()  # (n, K)

    conds = {"full": probs(lambda idx: torch.ones(len(idx), 1, S, S))}
    for t in range(1, T + 1):
        conds[f"random{t}"] = probs(lambda idx, t=t: geom.masks([locs[i, :t].tolist() for i in idx]))
    res: dict = {}
    for name in ILLNESSES:
        ill = resolve_illness(name)
        pol = UncondPolicy(model, DatasetSampler(train_set), ill, geom, n_samples=10, device="cpu")
        seq = pol.sequence(T, torch.Generator().manual_seed(seed))
        c = dict(conds)
        for t in range(1, T + 1):
            m = geom.mask(seq[:t])[None]  # (1, 1, S, S)
            c[f"uncond{t}"] = probs(lambda idx, m=m: m.expand(len(idx), -1, -1, -1))
        y = np.asarray(ill.target(Y), dtype=np.float64)  # (n,)
        scores = {k: np.asarray(ill.prob(torch.as_tensor(v)), dtype=np.float64) for k, v in c.items()}  # (n,) each
        point = {k: float(auroc_matrix(v[None], y[None])[0]) for k, v in scores.items()}
        bs = {k: auroc_matrix(v[boot], y[boot]) for k, v in scores.items()}  # (R,) each
        for kind in ("random", "uncond"):
            point[f"{kind}_mean"] = float(np.mean([point[f"{kind}{t}"] for t in range(1, T + 1)]))
            bs[f"{kind}_mean"] = np.mean([bs[f"{kind}{t}"] for t in range(1, T + 1)], axis=0)
        res[name] = {"auroc": point, "ci95": {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]
                                               for k, v in bs.items()},
                     "positives": int(y.sum()), "uncond_sequence": [int(l) for l in seq]}
    res["n_test"] = n
    return res


def load_results(path: Path) -> dict:
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("kind") == "recipes":
            return data
    return {"kind": "recipes", "rows": []}


def _row_key(r: dict) -> tuple:
    return r["preset"], r["recipe"], r.get("seed", 0)  # rows from before --seeds were seed 0


def seed_groups(rows: list[dict]) -> list[list[dict]]:
    """The rows grouped by (preset, recipe) in order of first appearance, each group's training seeds sorted."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_row_key(r)[:2], []).append(r)
    return [sorted(g, key=lambda r: r.get("seed", 0)) for g in groups.values()]


def mean_auroc(group: list[dict], illnesses=ILLNESSES) -> dict[str, np.ndarray]:
    """Per cell key, the AUROC averaged over ``illnesses``, one value per training seed: ``(n_seeds,)``."""
    keys = group[0]["scores"][ILLNESSES[0]]["auroc"]
    return {k: np.array([np.mean([r["scores"][i]["auroc"][k] for i in illnesses]) for r in group]) for k in keys}


def seed_wins(groups: list[list[dict]], a: str, b: str, key: str) -> tuple[int, int]:
    """(pairs where recipe ``a`` beats ``b`` on ``key``, pairs): over the (preset, seed) pairs both were trained on."""
    by = {(g[0]["preset"], g[0]["recipe"]): {r.get("seed", 0): v for r, v in zip(g, mean_auroc(g)[key])} for g in groups}
    pairs = [(va[s], by[(p, b)][s]) for (p, r), va in by.items() if r == a and (p, b) in by for s in va if s in by[(p, b)]]
    return sum(x > y for x, y in pairs), len(pairs)


def markdown(data: dict) -> str:
    """The table: per preset and recipe, AUROC averaged over the illnesses (and over training seeds where
    a row was trained with several), then per illness, then each multi-seed row's spread over seeds."""
    groups = seed_groups(data["rows"])
    lines = [f"# AVP-CNN recipes x phantom presets ({data.get('setup', '')})", "",
             "Mean over " + ", ".join(ILLNESSES) + " of the AUROC (95 % bootstrap CI of each illness in the JSON), "
             "and over the training seeds of a row (`seeds`). "
             "`rand 1..5` / `uncond 1..5`: after t = 1..5 Random / Uncond scans; `mean` = mean over t. "
             "Wall time: the training (median over seeds), on a shared 2-core machine (single-threaded), so indicative only.", "",
             "| preset | recipe | seeds | full | rand 1 | rand 2 | rand 3 | rand 4 | rand 5 | rand mean | uncond 1 | uncond 5 | "
             "uncond mean | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        a = {k: v.mean() for k, v in mean_auroc(g).items()}
        cells = [a["full"], *[a[f"random{t}"] for t in range(1, T + 1)], a["random_mean"], a["uncond1"], a["uncond5"],
                 a["uncond_mean"]]
        lines.append(f"| {g[0]['preset']} | {g[0]['recipe']} | {len(g)} | " + " | ".join(f"{v:.3f}" for v in cells)
                     + f" | {np.median([r['train_s'] for r in g]):.0f} |")
    lines += ["", "Per illness: full / rand mean / uncond mean. One training seed: the 95 % bootstrap CI over test "
              "images in brackets; several: the mean over seeds and the range over seeds in braces.", "",
              "| preset | recipe | " + " | ".join(ILLNESSES) + " |", "|---|---|" + "---|" * len(ILLNESSES)]
    for g in groups:
        cells = []
        for i in ILLNESSES:
            if len(g) == 1:
                au, ci = g[0]["scores"][i]["auroc"], g[0]["scores"][i]["ci95"]
                cells.append(" / ".join(f"{au[k]:.3f} [{ci[k][0]:.2f}, {ci[k][1]:.2f}]" for k in ("full", "random_mean", "uncond_mean")))
            else:
                v = mean_auroc(g, (i,))
                cells.append(" / ".join(f"{v[k].mean():.3f} {{{v[k].min():.2f}, {v[k].max():.2f}}}"
                                        for k in ("full", "random_mean", "uncond_mean")))
        lines.append(f"| {g[0]['preset']} | {g[0]['recipe']} | " + " | ".join(cells) + " |")
    multi = [g for g in groups if len(g) > 1]
    if multi:
        lines += ["", "Training seeds (mean of the illnesses per seed; the test images, scan sequences and bootstrap "
                  "are the same for every seed): full / rand mean / uncond mean, mean +- sd over seeds, then each seed.", "",
                  "| preset | recipe | seeds | full | rand mean | uncond mean | per seed (full / rand mean / uncond mean) |",
                  "|---|---|---|---|---|---|---|"]
        for g in multi:
            a = mean_auroc(g)
            stats = [f"{a[k].mean():.3f} +- {a[k].std(ddof=1):.3f}" for k in ("full", "random_mean", "uncond_mean")]
            per = "; ".join(f"{r.get('seed', 0)}: {a['full'][j]:.3f} / {a['random_mean'][j]:.3f} / {a['uncond_mean'][j]:.3f}"
                            for j, r in enumerate(g))
            lines.append(f"| {g[0]['preset']} | {g[0]['recipe']} | {len(g)} | " + " | ".join(stats) + f" | {per} |")
    rows = data["rows"]
    lines += ["", "Recipes:", ""] + [f"- `{k}`: {v[0]}" for k, v in RECIPES.items() if any(r["recipe"] == k for r in rows)]
    enc = [r for r in rows if r.get("init")]
    if enc:
        lines += ["", "Encoder rows start from the IPA of a finished cpu-profile pipeline on the same preset: "
                  + ", ".join(f"{r['preset']} `{r['init']}`" for r in enc) + " (`default`: the published cpu demo, "
                  "trained on the default phantom set of 8 000 images; `realistic`, `hard`: the variability sweep's "
                  "pipelines, 6 000-image sets of that preset; all seed 0, never this table's seed-1 images). `-enc` "
                  "rows (`arch of ...`) build that encoder from random weights: the control of the init. Their wall "
                  "times were measured while other jobs shared the machine."]
    (rw, rn), (uw, un) = (seed_wins(groups, CHOSEN, REPLACED, k) for k in ("random_mean", "uncond_mean"))
    lines += ["", f"The cpu demo profile uses `{CHOSEN}` (`boed.demo.PROFILES['cpu']`): among the tiny-net recipes within "
              "the AVP stage's 2x time budget, the best mean AUROC after 1..5 Random scans over the presets, over three "
              f"training seeds (ahead of `{REPLACED}`, the profile's recipe before, after 1..5 Random scans in {rw} of {rn} "
              f"(preset, seed) pairs and after 1..5 Uncond scans in {uw} of {un}), and a full-image AUROC above the old default's "
              "on every preset. Single-seed rows do not resolve differences under about 0.05 on `hard` (see the seed "
              "table). The encoder init (`-ipa`) is ahead on every preset (decisively on `hard`; one seed) but costs over "
              "10x the training and 6.5x the FLOPs per decision: an option (`--arch encoder --init ipa:RUN`), not the "
              "default. The paper profile keeps appendix I.4 (the `default` masks)."]
    return "\n".join(lines) + "\n"


def run_recipes(args) -> None:
    torch.set_num_threads(args.threads)
    presets = [p for p in args.presets.split(",") if p]
    recipes = [r for r in args.recipes.split(",") if r]
    try:
        seeds = sorted({int(v) for v in args.seeds.split(",") if v})
    except ValueError:
        raise SystemExit(f"--seeds is {args.seeds!r}; expected comma-separated non-negative integers, e.g. 0,1,2") from None
    if not seeds or min(seeds) < 0:
        raise SystemExit(f"--seeds is {args.seeds!r}; expected comma-separated non-negative integers, e.g. 0,1,2")
    unknown = [r for r in recipes if r not in RECIPES] + [p for p in presets if p not in PRESET_NAMES]
    if unknown:
        raise SystemExit(f"unknown recipe/preset {unknown}; recipes: {', '.join(RECIPES)}; presets: {', '.join(PRESET_NAMES)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prof, tcfg = cpu_recipe()
    results, table = Path(args.results) / RESULTS.name, Path(args.results) / TABLE.name
    data = load_results(results)
    data.update({"setup": f"64 px, cpu profile: {tcfg.steps} steps, batch {tcfg.batch_size}, lr {tcfg.lr}, tiny AVP-CNN; "
                          f"{args.n} phantom images per preset (seed {args.data_seed}, demo prevalence)",
                 "note": "wall times measured on a shared, loaded 2-core machine with torch.set_num_threads(1)",
                 "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                 "recipes": {k: {"about": v[0], "train": v[1], "model": v[2], "steps_factor": v[3]} for k, v in RECIPES.items()}})
    done = {_row_key(r) for r in data["rows"]}
    for preset in presets:
        t0 = time.perf_counter()
        train_set, test_set = make_data(work, preset, args.n, args.data_seed)
        log.info("data %s: %d train, %d test images (%.0f s)", preset, len(train_set), len(test_set), time.perf_counter() - t0)
        for recipe, seed in itertools.product(recipes, seeds):
            if (preset, recipe, seed) in done:
                continue
            with tempfile.TemporaryDirectory(dir=work) as run_dir:
                model, secs = train(recipe, train_set, args.steps_scale, Path(run_dir), seed=seed, encoder_run=args.encoder_run)
            t1 = time.perf_counter()
            scores = score_model(model, train_set, test_set, args.bootstrap, tta=bool(RECIPES[recipe][2].get("tta")))
            row = {"preset": preset, "recipe": recipe, "seed": seed, "train_s": secs, "score_s": time.perf_counter() - t1,
                   "steps": int(round(tcfg.steps * RECIPES[recipe][3] * args.steps_scale)),
                   "n_train": len(train_set), "scores": scores,
                   **({"init": ("arch of " if RECIPES[recipe][2].get("scratch") else "")
                               + f"{RECIPES[recipe][2]['init']}:{args.encoder_run / RECIPES[recipe][2]['init']}"}
                      if "init" in RECIPES[recipe][2] else {})}
            data["rows"].append(row)
            atomic_write_json(results, data)
            a = scores[ILLNESSES[0]]["auroc"]
            log.info("%-9s %-14s seed %d full %.3f rand %s uncond1 %.3f  (%s; train %.0f s)", preset, recipe, seed, a["full"],
                     " ".join(f"{a[f'random{t}']:.3f}" for t in range(1, T + 1)), a["uncond1"], ILLNESSES[0], secs)
    atomic_write_text(table, markdown(data))
    print(markdown(data))
    print(f"wrote {results} and {table}")


# ----------------------------------------------------------------------------------------------
# throughput


def flops_per_input(model: AVPClassifier, S: int) -> float:
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        model(torch.zeros(1, model.config.in_channels + 1, S, S))
    return float(fc.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, min_time: float, min_reps: int = 3) -> float:
    """Seconds per call (median of repeated calls after one warm-up)."""
    fn()
    sync(device)
    times, total = [], 0.0
    while len(times) < min_reps or total < min_time:
        t = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t
        times.append(dt)
        total += dt
    times.sort()
    return times[len(times) // 2]


def bench(arch: str, S: int, batch: int, channels_last: bool, device: torch.device, amp: bool, min_time: float, width: int = 12) -> dict:
    torch.manual_seed(0)
    model = AVPClassifier(AVPConfig(arch=arch, image_size=S, width=width)).eval()
    flops = flops_per_input(model, S)
    model = model.to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.set_channels_last(channels_last)
    y = torch.rand(batch, 2, S, S, device=device).contiguous(memory_format=fmt)
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext

    def fwd():
        with torch.inference_mode(), ctx():
            model(y)

    x = torch.randint(0, 256, (batch, 1, S, S), dtype=torch.uint8, device=device)
    m = (torch.rand(batch, 1, S, S, device=device) > 0.5).float()
    dt = timeit(fwd, device, min_time)
    dt_pp = timeit(lambda: model.predict_proba(x, m), device, min_time) if not amp else float("nan")
    return {"arch": arch, "S": S, "batch": batch, "channels_last": channels_last, "amp_bf16": amp,
            "mflops_per_input": flops / 1e6, "inputs_per_s": batch / dt, "gflops_per_s": flops * batch / dt / 1e9,
            "predict_proba_inputs_per_s": batch / dt_pp if dt_pp == dt_pp else None,
            "ms_per_2890": 2890 / (batch / dt) * 1e3}


def run_throughput(args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    min_time = 0.3 if args.quick else 1.0
    configs = [("tiny", 64, b) for b in ((256,) if args.quick else (64, 289, 1024))]
    configs += [("resnet18", 64, 64)]
    if not args.quick:
        configs += [("densenet121", 64, 64)]
    if device.type == "cuda":
        configs += [("tiny", 64, 2890), ("resnet18", 256, 256), ("densenet121", 256, 256)]
    rows = []
    for arch, S, b in configs:
        for cl in (False, True):
            for amp in ((False, True) if device.type == "cuda" else (False,)):
                r = bench(arch, S, b, cl, device, amp, min_time)
                rows.append(r)
                pp = f"{r['predict_proba_inputs_per_s']:9.0f}" if r["predict_proba_inputs_per_s"] else "        -"
                print(f"{arch:<12} S={S:<4} B={b:<5} {'CL ' if cl else 'NCHW'} {'bf16' if amp else 'fp32'}  "
                      f"{r['mflops_per_input']:8.1f} MFLOP/in  {r['inputs_per_s']:9.0f} in/s  {r['gflops_per_s']:6.1f} GFLOP/s  "
                      f"predict_proba {pp} in/s  {r['ms_per_2890']:8.1f} ms per 2890", flush=True)
    atomic_write_json(THROUGHPUT, {"device": str(device), "threads": args.threads, "torch": torch.__version__,
                                   "machine": platform.processor() or platform.machine(),
                                   "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                                   "rows": rows})
    print(f"wrote {THROUGHPUT}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", choices=("recipes", "throughput"), default="recipes")
    ap.add_argument("--quick", action="store_true", help="throughput: fewer configurations; recipes: 300 images, 1/10 steps")
    ap.add_argument("--device", default="cpu", help="throughput only")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    ap.add_argument("--presets", default=",".join(PRESET_NAMES), help="comma-separated phantom presets")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds; the scoring (test images, scan "
                    "sequences, bootstrap) is the same for every seed (default: 0)")
    ap.add_argument("--n", type=int, default=3000, help="phantom images per preset (about 20 %% are test images)")
    ap.add_argument("--data-seed", type=int, default=1, help="phantom seed (1: not the default set's 0)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every recipe's steps (smoke runs)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    ap.add_argument("--results", default=str(RESULTS_DIR), help="folder of classifier.json and classifier.md")
    ap.add_argument("--encoder-run", type=Path, default=None,
                    help="a finished boed demo folder whose ipa/ and vae/ start the *-ipa / *-vae recipes")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "boed-bench-classifier"), help="data and run folder")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("ipa_core", "boed", "xray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.mode == "throughput":
        return run_throughput(args)
    if args.quick:
        args.n, args.steps_scale, args.bootstrap = min(args.n, 300), args.steps_scale / 10, min(args.bootstrap, 100)
    run_recipes(args)


if __name__ == "__main__":
    main()
