"""Data-layer throughput: `xray.cache.prepare` (decode + resize) and reading a prepared cache.

Builds NIH-format folders of synthetic PNGs in a temp dir, then measures images/s for
  - prepare: 1024 px 8-bit PNGs (the NIH size and about its file size) -> S, with 1 and 2 decoding
    worker processes; from the 1-worker rate (images/s per core) it projects the time to prepare the
    full release (112 120 images) at 64 and 256 px on 2 and 16 cores, assuming linear scaling
    (the measured 2-worker efficiency is printed beside it);
  - reading: DataLoader over XrayDataset (0 and 2 workers) vs XrayDataset.get_batch, S = 64, 256.
Prints a table and writes benchmarks/results/dataset.json.

    python benchmarks/bench_dataset.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from xray import cache
from xray.dataset import XrayDataset
from xray.io import atomic_write_json
from xray.nih import write_labels_csv

RESULTS = Path(__file__).parent / "results" / "dataset.json"


def make_folder(root: Path, n: int, px: int, seed: int = 0) -> Path:
    """n smooth random PNGs of px x px (compress like real radiographs, not like noise)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    yy, xx = np.mgrid[0:px, 0:px] / px
    rows = []
    for i in range(n):
        a, b, c = rng.uniform(0.5, 4, 3)
        img = 0.5 + 0.25 * np.sin(a * 6 * xx + b) * np.cos(c * 6 * yy) + rng.normal(0, 0.02, (px, px))
        name = f"{i // 2 + 1:08d}_{i % 2:03d}.png"
        Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8)).save(root / "images" / name)
        rows.append({"Image Index": name, "Finding Labels": "No Finding" if i % 2 else "Effusion", "Patient ID": i // 2 + 1})
    write_labels_csv(root / "Data_Entry_2017_v2020.csv", rows)
    return root


def rate(n: int, seconds: float) -> float:
    return n / max(seconds, 1e-9)


NIH_IMAGES = 112_120


def bench_prepare(tmp: Path, n: int, sizes: list[int], workers: list[int]) -> list[dict]:
    root = make_folder(tmp / "src1024", n, 1024)
    mean_kb = sum(p.stat().st_size for p in (root / "images").iterdir()) / n / 1024
    print(f"prepare: {n} synthetic 1024 px PNGs, {mean_kb:.0f} KB each on average (NIH: about 400 KB)")
    out = []
    for s in sizes:
        for w in workers:
            t = time.perf_counter()
            cache.prepare(root, s, out=tmp / f"p{s}-{w}", workers=w, progress=False)
            dt = time.perf_counter() - t
            out.append({"what": "prepare 1024px PNG", "S": s, "workers": w, "images": n, "images_per_s": rate(n, dt),
                        "png_kb": mean_kb})
    return out


def project(rows: list[dict], cores: tuple[int, ...] = (2, 16)) -> list[dict]:
    """Hours to prepare the full NIH release, from the per-core rate (1 worker), linear in cores."""
    out = []
    for s in sorted({r["S"] for r in rows}):
        one = next(r for r in rows if r["S"] == s and r["workers"] == 1)["images_per_s"]
        two = next((r["images_per_s"] for r in rows if r["S"] == s and r["workers"] == 2), None)
        for c in cores:
            out.append({"S": s, "cores": c, "per_core_images_per_s": one,
                        "two_worker_efficiency": None if two is None else two / (2 * one),
                        "hours": NIH_IMAGES / (one * c) / 3600})
    return out


def bench_read(tmp: Path, s: int, n: int, batch: int, loader_workers: list[int]) -> list[dict]:
    c = cache.prepare(make_folder(tmp / f"src{s}", n, s), s, out=tmp / f"c{s}", workers=0, progress=False)
    ds = XrayDataset(c, "all")
    gen = torch.Generator().manual_seed(0)
    res = []
    for w in loader_workers:
        loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=w, generator=gen,
                            persistent_workers=False)
        t = time.perf_counter()
        seen = sum(x.shape[0] for x, _ in loader)
        res.append({"what": f"DataLoader workers={w}", "S": s, "images": seen, "images_per_s": rate(seen, time.perf_counter() - t)})
    perm = torch.randperm(len(ds), generator=gen).numpy()
    t = time.perf_counter()
    seen = 0
    for i in range(0, len(perm), batch):
        idx = perm[i:i + batch]
        x, _ = ds.get_batch(idx), ds.get_labels(idx)  # labels read too, as training does
        seen += x.shape[0]
    res.append({"what": "get_batch (random)", "S": s, "images": seen, "images_per_s": rate(seen, time.perf_counter() - t)})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sets (about 30 s)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n_prep = 48 if args.quick else 160
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows += bench_prepare(tmp, n_prep, [64, 256], [1, 2])
        rows += bench_read(tmp, 64, 2048 if args.quick else 8192, 64, [0, 2])
        rows += bench_read(tmp, 256, 512 if args.quick else 2048, 64, [0, 2])
    print(f"{'what':<24} {'S':>4} {'workers':>7} {'images':>7} {'images/s':>10}")
    for r in rows:
        print(f"{r['what']:<24} {r['S']:>4} {r.get('workers', '-'):>7} {r['images']:>7} {r['images_per_s']:>10.0f}")
    proj = project([r for r in rows if r["what"] == "prepare 1024px PNG"])
    print(f"\nfull NIH release ({NIH_IMAGES} images), decode + resize, projected from the 1-worker rate:")
    print(f"{'S':>4} {'cores':>5} {'img/s/core':>10} {'2-worker eff.':>13} {'hours':>7}")
    for r in proj:
        eff = "-" if r["two_worker_efficiency"] is None else f"{r['two_worker_efficiency']:.2f}"
        print(f"{r['S']:>4} {r['cores']:>5} {r['per_core_images_per_s']:>10.1f} {eff:>13} {r['hours']:>7.2f}")
    load = os.getloadavg()[0]  # the numbers are only comparable at similar load
    print(f"load average during run: {load:.1f} on {os.cpu_count()} cores")
    atomic_write_json(RESULTS, {"machine": platform.platform(), "cpu_count": os.cpu_count(), "load_avg_1min": load,
                                "quick": args.quick,
                                "torch": torch.__version__, "rows": rows, "projection_full_nih": proj})
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
