"""VAE training and sampling speed on this machine.

Per config: one training step split into forward (loss) / backward / clip + AdamW, steps/s and
images/s, and peak resident memory of a fresh process that runs only that config (ru_maxrss);
unconditional sampling throughput for tiny. Prints a table and writes ``benchmarks/results/vae.json``.

    .venv/bin/python benchmarks/bench_vae.py [--configs tiny mid] [--batch 8] [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipa_core import VAE, VAEConfig, get_config  # noqa: E402
from xray.io import atomic_write_json  # noqa: E402

# a mid-size model at 64 px: the tiny layout at twice the width, 3x the blocks at 8-32 px
MID = VAEConfig(image_size=64, image_channels=1, width=128, zdim=16, custom_width_str="64:32,32:64", num_mixtures=10,
                enc_blocks="64x1,64d2,32x3,32d2,16x3,16d2,8x3,8d2,4x2,4d4,1x2",
                dec_blocks="1x1,4m1,4x2,8m4,8x3,16m8,16x4,32m16,32x3,64m32,64x1")


def config(name: str) -> VAEConfig:
    cfg = MID if name == "mid" else get_config(name)
    cfg = VAEConfig(**{**cfg.to_dict(), "shift": -128.0, "scale": 1 / 64.0})
    return cfg


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_train(name: str, batch: int, reps: int, channels_last: bool = False) -> dict:
    cfg = config(name)
    torch.manual_seed(0)
    model = VAE(cfg)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.9), weight_decay=0.01, foreach=True)  # as the trainer
    x = torch.randint(0, 256, (batch, cfg.image_channels, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    fwd, bwd, optim, step = [], [], [], []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        loss = model.loss(x, g)["elbo"]
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 200.0, foreach=True)
        opt.step()
        t3 = time.perf_counter()
        if i:  # the first step warms up allocators and kernels
            fwd.append(t1 - t0), bwd.append(t2 - t1), optim.append(t3 - t2), step.append(t3 - t0)
    med = statistics.median
    return {"config": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "batch": batch,
            "channels_last": channels_last, "forward_s": med(fwd), "backward_s": med(bwd), "clip_adamw_s": med(optim), "step_s": med(step),
            "steps_per_s": 1 / med(step), "images_per_s": batch / med(step), "peak_rss_MB": maxrss_mb()}


@torch.no_grad()
def bench_sample(name: str, n: int, reps: int) -> dict:
    model = VAE(config(name)).eval()
    g = torch.Generator().manual_seed(0)
    model.sample(n, t=1.0, generator=g)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model.sample(n, t=1.0, generator=g)
        ts.append(time.perf_counter() - t0)
    return {"config": name, "n": n, "seconds": statistics.median(ts), "images_per_s": n / statistics.median(ts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "mid"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vae.json"))
    ap.add_argument("--one", nargs=2, metavar=("CONFIG", "CHANNELS_LAST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:  # child process: one config, result as JSON on stdout
        print(json.dumps(bench_train(args.one[0], args.batch, args.reps, channels_last=args.one[1] == "1")))
        return
    train = []
    for name in args.configs:
        for cl in ("0", "1"):
            cmd = [sys.executable, __file__, "--one", name, cl, "--batch", str(args.batch), "--reps", str(args.reps),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            train.append(json.loads(out.strip().splitlines()[-1]))
    sample = [bench_sample("tiny", 64, max(2, args.reps // 2))]
    print(f"{'config':8} {'params':>7} {'batch':>5} {'ch_last':>7} {'fwd s':>7} {'bwd s':>7} {'opt s':>7} {'step s':>7} {'img/s':>7} {'RSS MB':>8}")
    for r in train:
        print(f"{r['config']:8} {r['params_M']:6.2f}M {r['batch']:5d} {str(r['channels_last']):>7} {r['forward_s']:7.3f} "
              f"{r['backward_s']:7.3f} {r['clip_adamw_s']:7.3f} {r['step_s']:7.3f} {r['images_per_s']:7.1f} {r['peak_rss_MB']:8.0f}")
    for r in sample:
        print(f"sampling {r['config']}: {r['n']} images in {r['seconds']:.2f} s = {r['images_per_s']:.1f} images/s")
    load = os.getloadavg()[0]
    print(f"(1-minute load average during the run: {load:.1f} on {os.cpu_count()} cores; other jobs slow these numbers)")
    atomic_write_json(args.out, {"machine": platform.processor() or platform.machine(), "threads": args.threads, "load_avg_1m": load,
                                 "torch": torch.__version__, "train": train, "sample": sample})


if __name__ == "__main__":
    main()
