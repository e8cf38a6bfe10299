"""Does bf16 scoring change greedy decisions? Argmax agreement of EIG under bf16 autocast vs float32.

Each decision is one greedy step of ``GreedyPolicy``: a test image with t - 1 random patches
already scanned (t = 1..T, so random and partial states, the empty state included), N completions
(dataset draws with the observed pixels pasted back, the same draws for both precisions), every
candidate scored by :func:`boed.scoring.candidate_probs` and the EIG argmax over the candidates
not yet fully observed. The float32 run and the bf16 run (the same call inside
``torch.autocast("cpu", dtype=torch.bfloat16)``, i.e. what ``amp=True`` does on CUDA) see
identical inputs; a decision agrees when both choose the same location. Also reported: the
float32 EIG lost by taking the bf16 choice (regret), and how many disagreements are near-ties
(the two choices' float32 EIGs within 1 % of the best).

Models: by default a tiny AVP-CNN (the demo's ``tiny`` arch, S = 64) trained here for a few
hundred steps on a small private phantom set, so that its EIG surface is not the flat one of a
random network; ``--avp RUN --data-root DIR`` use a trained model and its data instead. Both the
incremental scoring path (the default for the tiny CNN; ``--decisions``) and the full path (every
other classifier; ``--full-decisions``, fewer: bf16 convolutions are slow on CPUs without bf16
units) are measured. About 4 min on one idle core.
Prints a table and writes benchmarks/results/precision.json.

    python benchmarks/bench_precision.py [--decisions 200] [--full-decisions 20] [--quick]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from boed import estimators
from boed.classifier import AVPClassifier, AVPConfig
from boed.geometry import ScanGeometry, observe
from boed.policies import ScanState, select
from boed.samplers import DatasetSampler, paste_observed
from boed.scoring import candidate_probs, prepare_classifier
from xray.dataset import dataset_images, open_dataset
from xray.io import atomic_write_json
from xray.labels import resolve_illness

RESULTS = Path(__file__).parent / "results" / "precision.json"
S, N, T = 64, 10, 5
THRESHOLD = 0.99  # boed.scoring scores in float32 by default unless bf16 agrees at least this often


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson interval of a proportion k / n."""
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5 / (1 + z * z / n)
    return centre - half, centre + half


def verdict(results: dict) -> tuple[str, dict]:
    """float32 by default unless agreement >= THRESHOLD is established: bf16 may stay only when the
    lower end of the 95 % interval of the agreement pooled over every path's decisions reaches it
    (a point estimate at 99 % from a few hundred decisions does not show 99 %)."""
    k = sum(round(r["agreement"] * r["decisions"]) for r in results.values())
    n = sum(r["decisions"] for r in results.values())
    lo, hi = wilson(k, n)
    pooled = {"agree": k, "decisions": n, "agreement": k / n, "ci95": [lo, hi]}
    if lo >= THRESHOLD:
        return "bf16 agrees: it may stay the default on CUDA", pooled
    return (f"agreement >= {THRESHOLD:.0%} not established (95 % interval reaches {lo:.1%}): "
            "score in float32 by default, bf16 as an explicit option"), pooled


def train_tiny_avp(train, steps: int, seed: int) -> AVPClassifier:
    """A tiny AVP-CNN trained briefly on ``train`` with the AVP training masks (patches + full images)."""
    from boed.train_avp import AVPTrainConfig, sample_training_masks

    torch.manual_seed(seed)
    model = AVPClassifier(AVPConfig(arch="tiny", image_size=train.image_size))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    cfg = AVPTrainConfig()
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(train), (32,), generator=g)
        x = dataset_images(train, idx).float() / 255  # (32, 1, S, S)
        y = torch.as_tensor(train.labels[idx.numpy()])  # (32, K)
        m = sample_training_masks(32, train.image_size, cfg, g)  # (32, 1, S, S)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(observe(x, m)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def decisions(classifier, train, test, illness, n_decisions: int, batch: int, seed: int, incremental: bool) -> dict:
    """Score ``n_decisions`` greedy decisions in float32 and bf16; agreement and regret."""
    geometry = ScanGeometry(S)
    g = torch.Generator().manual_seed(seed)
    sampler = DatasetSampler(train)
    clf = prepare_classifier(classifier, torch.device("cpu"))
    agree, regret, near_tie, eig_gap, t_of = [], [], [], [], []
    sec = {"fp32": 0.0, "bf16": 0.0}
    for start in range(0, n_decisions, batch):
        b = min(batch, n_decisions - start)
        idx = torch.randint(len(test), (b,), generator=g)
        x = dataset_images(test, idx)  # (b, 1, S, S)
        t = torch.randint(1, T + 1, (b,), generator=g)  # (b,) decision step: t - 1 patches scanned
        state = ScanState.empty(b, 1, S)
        for k in range(T - 1):
            locs = torch.randint(geometry.num_locations, (b,), generator=g)
            nxt = state.scan(x, locs, geometry)
            keep = (t - 1 > k)[:, None, None, None]  # (b, 1, 1, 1) images that scan patch k + 1
            state = ScanState(torch.where(keep, nxt.x_obs, state.x_obs), torch.where(keep, nxt.mask, state.mask))
        samples = paste_observed(sampler.sample(state.x_obs, state.mask, N, g), state.x_obs, state.mask)  # (b, N, 1, S, S)
        skip = geometry.fully_observed(state.mask)  # (b, L)
        out = {}
        for name, ctx in (("fp32", None), ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
            t0 = time.process_time()
            if ctx is None:
                p = candidate_probs(clf, samples, state.mask, geometry, illness, skip=skip, amp=False, incremental=incremental)
            else:
                with ctx:
                    p = candidate_probs(clf, samples, state.mask, geometry, illness, skip=skip, amp=False, incremental=incremental)
            sec[name] += time.process_time() - t0
            out[name] = estimators.eig(p.float()).masked_fill(skip, 0.0)  # (b, L)
        c32, c16 = select(out["fp32"], skip), select(out["bf16"], skip)  # (b,)
        best = out["fp32"].gather(1, c32[:, None])[:, 0]  # (b,)
        got = out["fp32"].gather(1, c16[:, None])[:, 0]  # (b,) float32 EIG of the bf16 choice
        agree += (c32 == c16).tolist()
        regret += ((best - got) / best.clamp_min(1e-12)).tolist()
        near_tie += ((best - got) <= 0.01 * best.abs()).tolist()
        eig_gap += (out["bf16"] - out["fp32"]).abs().amax(1).tolist()
        t_of += t.tolist()
    n = len(agree)
    per_t = {int(k): sum(a for a, tt in zip(agree, t_of) if tt == k) / max(1, sum(1 for tt in t_of if tt == k))
             for k in range(1, T + 1)}
    wrong = [i for i in range(n) if not agree[i]]
    return {
        "decisions": n, "agreement": sum(agree) / n, "agreement_per_t": per_t,
        "disagreements": len(wrong), "near_ties_among_disagreements": sum(near_tie[i] for i in wrong),
        "mean_relative_regret": sum(regret) / n, "max_relative_regret": max(regret),
        "max_abs_eig_difference": max(eig_gap), "cpu_seconds": sec,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decisions", type=int, default=200, help="greedy decisions on the incremental path (default: 200)")
    ap.add_argument("--full-decisions", type=int, default=20,
                    help="decisions on the full path (bf16 convs are slow on CPUs without bf16 units) (default: 20)")
    ap.add_argument("--batch", type=int, default=10, help="decisions scored per call (default: 10)")
    ap.add_argument("--train-steps", type=int, default=400, help="steps of the tiny AVP-CNN trained here (default: 400)")
    ap.add_argument("--avp", default=None, help="a trained AVP run/model instead (needs --data-root of its data)")
    ap.add_argument("--data-root", default=None, help="NIH-format folder the --avp model was trained on")
    ap.add_argument("--illness", default="effusion", help="target task (default: effusion)")
    ap.add_argument("--seed", type=int, default=0, help="seed of data, training and decisions (default: 0)")
    ap.add_argument("--quick", action="store_true", help="40 decisions, 100 training steps (smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--no-save", action="store_true", help="print only, do not write the results file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.decisions, args.full_decisions, args.train_steps = 20, 10, 100
    illness = resolve_illness(args.illness)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.avp is None:
            from xray import phantom

            root = phantom.generate(Path(tmp) / "phantom", n=600, size=S, seed=args.seed, workers=1,
                                    prevalence=phantom.DEMO_PREVALENCE, progress=False)
            model_note = f"tiny AVP-CNN trained {args.train_steps} steps on 600 phantom images (seed {args.seed})"
        else:
            if args.data_root is None:
                raise SystemExit("error: --avp needs --data-root (the NIH-format folder it was trained on)")
            root = args.data_root
            model_note = f"AVP model {args.avp}"
        train = open_dataset("phantom", root, size=S, split="train", cache_dir=tmp, progress=False)
        test = open_dataset("phantom", root, size=S, split="test", cache_dir=tmp, progress=False)
        classifier = (train_tiny_avp(train, args.train_steps, args.seed) if args.avp is None
                      else AVPClassifier.from_pretrained(args.avp).eval())
        results = {}
        for path, inc, n in (("incremental", True, args.decisions), ("full", False, args.full_decisions)):
            results[path] = decisions(classifier, train, test, illness, n, args.batch, args.seed + 1, inc)
    wall = time.perf_counter() - t0

    print(f"bf16 autocast vs float32 greedy EIG argmax, {illness.name}, S={S}, N={N}, t=1..{T}; {model_note}")
    print(f"{'path':<12} {'decisions':>9} {'agree':>7} {'near-tie':>9} {'mean regret':>12} {'max regret':>11} "
          f"{'max |dEIG|':>11} {'fp32 s':>7} {'bf16 s':>7}")
    for path, r in results.items():
        print(f"{path:<12} {r['decisions']:>9} {r['agreement']:>7.1%} {r['near_ties_among_disagreements']:>4}/{r['disagreements']:<4} "
              f"{r['mean_relative_regret']:>12.2e} {r['max_relative_regret']:>11.2e} {r['max_abs_eig_difference']:>11.2e} "
              f"{r['cpu_seconds']['fp32']:>7.1f} {r['cpu_seconds']['bf16']:>7.1f}")
        print("  per t: " + ", ".join(f"t={k}: {v:.1%}" for k, v in r["agreement_per_t"].items()))
    worst = min(r["agreement"] for r in results.values())
    decision, pooled = verdict(results)
    print(f"pooled agreement {pooled['agree']}/{pooled['decisions']} = {pooled['agreement']:.1%} "
          f"[95 % CI {pooled['ci95'][0]:.1%}, {pooled['ci95'][1]:.1%}], lowest per path {worst:.1%} "
          f"(threshold {THRESHOLD:.0%}): {decision}; wall {wall:.0f} s")
    if not args.no_save and not args.quick:
        atomic_write_json(RESULTS, {"illness": illness.name, "image_size": S, "n_samples": N, "scans": T,
                                    "model": model_note, "threshold": THRESHOLD, "results": results,
                                    "lowest_agreement": worst, "pooled": pooled, "verdict": decision, "wall_seconds": wall,
                                    "machine": platform.machine(), "torch": torch.__version__, "threads": args.threads})
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
