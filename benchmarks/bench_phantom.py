"""Phantom generation speed: images/s for ``generate`` at a few sizes and worker counts.

Times ``generate(n)`` end to end (metadata, rendering, PNG writing, CSVs), after a warm-up that
loads the lung-mask bank, and extrapolates to 20 000 images. The machine may be shared, so CPU
time (this process + workers) is reported too: ``img/cpu-s`` does not depend on other people's
load, and ``20k idle`` = 20 000 / (img/cpu-s * min(workers, cores)) is the estimate for an idle
machine.

    python benchmarks/bench_phantom.py [--n 2000] [--sizes 64 128] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from xray.io import atomic_write_json
from xray.phantom import DEMO_PREVALENCE, generate
from xray.phantom.anatomy import lung_bank

OUT = Path(__file__).parent / "results" / "phantom.json"


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    lung_bank()
    rows = []
    print(f"{'size':>5s} {'workers':>7s} {'n':>6s} {'seconds':>8s} {'img/s':>7s} {'20k (min)':>9s} "
          f"{'img/cpu-s':>9s} {'20k idle (min)':>14s}")
    for size in args.sizes:
        for w in args.workers:
            with tempfile.TemporaryDirectory() as tmp:
                t, c = time.perf_counter(), _cpu()
                generate(Path(tmp) / "ph", args.n, size, seed=0, workers=w, prevalence=DEMO_PREVALENCE, progress=False)
                dt, dc = time.perf_counter() - t, _cpu() - c
            ips, ipc = args.n / dt, args.n / dc
            idle = 20000 / (ipc * min(w, os.cpu_count() or 1)) / 60
            rows.append({"size": size, "workers": w, "n": args.n, "seconds": round(dt, 2), "cpu_seconds": round(dc, 2),
                         "images_per_s": round(ips, 1), "est_20k_minutes": round(20000 / ips / 60, 2),
                         "images_per_cpu_s": round(ipc, 1), "est_20k_minutes_idle": round(idle, 2)})
            print(f"{size:5d} {w:7d} {args.n:6d} {dt:8.1f} {ips:7.1f} {20000 / ips / 60:9.2f} {ipc:9.1f} {idle:14.2f}")
    atomic_write_json(OUT, {"cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "runs": rows})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
