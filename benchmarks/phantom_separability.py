"""How separable are the phantom findings, from the full image and from one random 25% patch?

Generates a demo-prevalence phantom set, trains a tiny CNN (input: image * mask, mask) on full
images and, separately, on one random patch of side S/4 per image (rest zeroed), and reports the
per-label test AUROC (split by patient, as written by the generator). A logistic regression on
16 x 16 downsampled full images is reported as a linear reference.

    python benchmarks/phantom_separability.py [--n 3000] [--size 64] [--epochs 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from xray.io import atomic_write_json
from xray.phantom import DEMO_PREVALENCE, generate

LABELS = ("Effusion", "Cardiomegaly", "Edema", "Infiltration", "Pneumothorax", "Any Finding")
OUT = Path(__file__).parent / "results" / "phantom_separability.json"


def load(root: Path, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images ``(N, S, S)`` uint8, targets ``(N, len(LABELS))``, test flag ``(N,)``."""
    rows = [line.split(",") for line in (root / "Data_Entry_2017_v2020.csv").read_text().splitlines()[1:]]
    test = set((root / "test_list.txt").read_text().split())
    x = np.stack([np.asarray(Image.open(root / "images" / r[0])) for r in rows])
    y = np.zeros((len(rows), len(LABELS)), np.float32)
    for i, r in enumerate(rows):
        labs = set(r[1].split("|"))
        for k, lab in enumerate(LABELS):
            y[i, k] = (lab in labs) if lab != "Any Finding" else ("No Finding" not in labs)
    return x, y, np.array([r[0] in test for r in rows])


def patch_masks(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """One random S/4 x S/4 observed patch per image, ``(n, 1, S, S)``."""
    p = size // 4
    ys = torch.randint(0, size - p + 1, (n,), generator=g)
    xs = torch.randint(0, size - p + 1, (n,), generator=g)
    r = torch.arange(size)
    my = (r[None, :] >= ys[:, None]) & (r[None, :] < ys[:, None] + p)  # (n, S)
    mx = (r[None, :] >= xs[:, None]) & (r[None, :] < xs[:, None] + p)  # (n, S)
    return (my[:, :, None] & mx[:, None, :]).float()[:, None]  # (n, 1, S, S)


class TinyCNN(torch.nn.Module):
    def __init__(self, k: int):
        super().__init__()
        chans = [2, 16, 32, 64, 64]
        self.convs = torch.nn.Sequential(*[torch.nn.Sequential(
            torch.nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(b), torch.nn.ReLU())
            for a, b in zip(chans, chans[1:])])
        self.head = torch.nn.Linear(64, k)

    def forward(self, x):  # x: (B, 2, S, S) = (image * mask, mask), image in [0, 1]
        x = torch.cat([(x[:, :1] - 0.5 * x[:, 1:]) / 0.25, x[:, 1:]], 1)  # centre observed pixels
        return self.head(self.convs(x).mean((2, 3)))


def train_eval(x: torch.Tensor, y: torch.Tensor, tr: np.ndarray, patch: bool, epochs: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyCNN(y.shape[1])
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-4)
    xtr, ytr, xte = x[tr], y[tr], x[~tr]
    size = x.shape[-1]
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(perm), 64):
            b = perm[i:i + 64]
            m = patch_masks(len(b), size, g) if patch else torch.ones(len(b), 1, size, size)
            loss = F.binary_cross_entropy_with_logits(model(torch.cat([xtr[b] * m, m], 1)), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        m = patch_masks(len(xte), size, g) if patch else torch.ones(len(xte), 1, size, size)
        return torch.sigmoid(model(torch.cat([xte * m, m], 1))).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "ph", args.n, args.size, args.seed, workers=args.workers,
                        prevalence=DEMO_PREVALENCE, progress=False)
        xs, ys, is_test = load(root, args.size)
    t_gen = time.perf_counter() - t0
    x = torch.from_numpy(xs).float()[:, None] / 255.0  # (N, 1, S, S)
    y = torch.from_numpy(ys)
    tr = ~is_test
    yte = ys[is_test]
    small = F.avg_pool2d(x, args.size // 16).flatten(1).numpy()  # (N, 256)
    lin = np.stack([LogisticRegression(C=1.0, max_iter=2000).fit(small[tr], ys[tr, k]).predict_proba(small[~tr])[:, 1]
                    for k in range(len(LABELS))], 1)
    full = train_eval(x, y, tr, patch=False, epochs=args.epochs, seed=args.seed)
    part = train_eval(x, y, tr, patch=True, epochs=args.epochs, seed=args.seed)
    res = {}
    print(f"{'label':14s} {'pos(test)':>9s} {'logreg full':>11s} {'CNN full':>9s} {'CNN 1 patch':>11s}")
    for k, lab in enumerate(LABELS):
        auc = {name: float(roc_auc_score(yte[:, k], p[:, k])) for name, p in
               (("logreg_full", lin), ("cnn_full", full), ("cnn_patch", part))}
        res[lab] = {"test_positives": int(yte[:, k].sum()), **auc}
        print(f"{lab:14s} {int(yte[:, k].sum()):9d} {auc['logreg_full']:11.3f} {auc['cnn_full']:9.3f} "
              f"{auc['cnn_patch']:11.3f}")
    meta = {"n": args.n, "size": args.size, "epochs": args.epochs, "seed": args.seed, "test_images": int(is_test.sum()),
            "generate_s": round(t_gen, 1), "total_s": round(time.perf_counter() - t0, 1), "patch": args.size // 4}
    atomic_write_json(OUT, {"config": meta, "auroc": res})
    print(f"wrote {OUT} ({meta['total_s']} s)")


if __name__ == "__main__":
    main()
