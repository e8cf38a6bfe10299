"""VAE training and sampling speed on this machine.

Per config: one training step split into forward (loss) / backward / clip + AdamW, steps/s and
images/s, and peak resident memory of a fresh process that runs only that config (ru_maxrss);
unconditional sampling throughput for tiny. Prints a table and writes ``benchmarks/results/vae.json``.

``--memory``: peak resident memory of training at 256 px (``xray256``, batch 1, CPU) for the VAE
and the IPA stage, activation checkpointing off and on, each in a fresh process (``ru_maxrss``):
two steps of the trainer's own ``train_step`` (AdamW state, EMA copy, clipping, skip rule, as
``ipa_core train`` runs them); writes ``benchmarks/results/memory256.json``.

    .venv/bin/python benchmarks/bench_vae.py [--configs tiny mid] [--batch 8] [--reps 5] [--threads 2]
    .venv/bin/python benchmarks/bench_vae.py --memory [--memory-config xray256] [--batch 1] [--threads 1]
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


def memory_step(name: str, stage: str, checkpointing: bool, batch: int, steps: int = 2) -> dict:
    """``steps`` training steps of ``stage`` (vae or ipa) in this (fresh) process, exactly as
    :func:`ipa_core.trainer.fit` takes them (its own ``make_optimizer``, ``train_step``, EMA copy,
    clipping and skip rule, the stage's xray256 training defaults): from the second step on the
    AdamW state and the EMA weights sit beside the activations, as in every step of a real run.
    Peak RSS of the process (``ru_maxrss``), also after the model and after the first step."""
    from ipa_core.ema import EMA, ema_copy
    from ipa_core.ipa import IPA
    from ipa_core.ipa_task import IPA_TRAIN_DEFAULTS, IPATask
    from ipa_core.memory import release_freed_memory
    from ipa_core.skip_rule import SkipRule
    from ipa_core.trainer import make_optimizer, train_step, warmup_lr
    from ipa_core.vae_task import TRAIN_DEFAULTS, VAETask

    cfg = config(name)
    torch.manual_seed(0)
    model = VAE(cfg)
    if stage == "ipa":
        model = IPA.from_vae(model)
        task = IPATask(model)
        tcfg = IPA_TRAIN_DEFAULTS.get(name, IPA_TRAIN_DEFAULTS["default"])
    else:
        task = VAETask(model)
        tcfg = TRAIN_DEFAULTS.get(name, TRAIN_DEFAULTS["xray256"])
    model.set_checkpointing(checkpointing).train()
    if checkpointing:
        release_freed_memory()  # as fit() does for checkpointed CPU runs
    params = list(task.trainable_parameters())
    ema = ema_copy(model, params) if tcfg.ema_rate is not None else None
    ema_updater = EMA(ema, model, tcfg.ema_rate) if ema is not None else None
    opt, skip = make_optimizer(params, tcfg), SkipRule.from_config(tcfg)
    g = torch.Generator().manual_seed(0)
    S = cfg.image_size
    x = torch.randint(0, 256, (batch, cfg.image_channels, S, S), dtype=torch.uint8, generator=g)
    labels = torch.zeros(batch, 15)
    rss_model = maxrss_mb()
    times, rss_steps, losses = [], [], []
    for step in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss, _, norm, _, skipped = train_step(task, model, params, opt, (x, labels), g, warmup_lr(step, tcfg), tcfg, skip, ema_updater)
        times.append((time.perf_counter() - t0, time.process_time() - c0))
        rss_steps.append(maxrss_mb())
        losses.append(float(loss))
    return {"config": name, "stage": stage, "checkpointing": checkpointing, "batch": batch, "steps": steps, "loss": losses[0],
            "losses": losses, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "trainable_M": sum(p.numel() for p in params) / 1e6, "ema": tcfg.ema_rate is not None,
            "step_s": times[-1][0], "step_cpu_s": times[-1][1], "first_step_cpu_s": times[0][1],
            "rss_model_MB": rss_model, "rss_after_first_step_MB": rss_steps[0], "peak_rss_MB": maxrss_mb()}


MEMORY_TARGET_GB = 4.0  # issue 13: a 256 px training step within 4 GB per image at batch 1 on the CPU


def bench_memory(name: str, batch: int, threads: int, out: Path, stages=("vae", "ipa"), modes=("off", "on")) -> None:
    """One fresh child process per (stage, checkpointing) row. The rows are merged into ``out``
    (a row of the same config, stage, checkpointing and batch is replaced), written after each
    child: a partial run keeps what it measured, and a run of some rows keeps the others."""
    old = json.loads(out.read_text()).get("rows", []) if out.is_file() else []
    rows = []
    for stage in stages:
        for ck in ["0" if m == "off" else "1" for m in modes]:
            cmd = [sys.executable, __file__, "--memory-child", name, stage, ck, "--batch", str(batch), "--threads", str(threads)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"memory child {stage} checkpointing={ck} failed:\n{res.stderr[-2000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            r["load_avg_1m"] = os.getloadavg()[0]
            per_image = r["peak_rss_MB"] / 1024 / batch
            print(f"{r['stage']:4} checkpointing {str(r['checkpointing']):5}  batch {r['batch']}  peak RSS {r['peak_rss_MB'] / 1024:6.2f} GB "
                  f"(model + EMA {r['rss_model_MB'] / 1024:5.2f} GB, after step 1 {r['rss_after_first_step_MB'] / 1024:5.2f} GB)  "
                  f"step {r['step_cpu_s']:7.1f} s CPU  loss {r['loss']:.6f}  "
                  f"{'within' if per_image <= MEMORY_TARGET_GB else 'above'} {MEMORY_TARGET_GB} GB per image", flush=True)
            key = ("config", "stage", "checkpointing", "batch")
            kept = [o for o in old if not any(all(o.get(k) == n.get(k) for k in key) for n in rows)]
            atomic_write_json(out, {"machine": platform.processor() or platform.machine(), "threads": threads, "torch": torch.__version__,
                                    "device": "cpu", "target_GB_per_image": MEMORY_TARGET_GB,
                                    "measure": "ru_maxrss of a fresh process per row, 2 steps of ipa_core.trainer.train_step "
                                               "(EMA, clipping, skip rule, AdamW state from step 2 on); GB = 1024 MB; "
                                               "step_cpu_s = CPU time (user + sys) of the 2nd step",
                                    "rows": kept + rows})
    for stage in stages:
        both = [r for r in rows if r["stage"] == stage]
        if len(both) < 2:
            continue
        off, on = both
        print(f"{stage}: peak per image {off['peak_rss_MB'] / 1024 / batch:.2f} GB -> {on['peak_rss_MB'] / 1024 / batch:.2f} GB "
              f"with checkpointing ({off['peak_rss_MB'] / on['peak_rss_MB']:.1f}x less; step CPU time x{on['step_cpu_s'] / off['step_cpu_s']:.2f})")
    print(f"wrote {out}")


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
    ap.add_argument("--memory", action="store_true", help="peak memory of a 256-px training step, checkpointing off and on")
    ap.add_argument("--memory-config", default="xray256", help="config for --memory (default: %(default)s)")
    ap.add_argument("--memory-stages", nargs="+", choices=("vae", "ipa"), default=["vae", "ipa"], help="stages for --memory (default: all)")
    ap.add_argument("--memory-modes", nargs="+", choices=("off", "on"), default=["off", "on"], help="checkpointing for --memory (default: both)")
    ap.add_argument("--memory-child", nargs=3, metavar=("CONFIG", "STAGE", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        name, stage, ck = args.memory_child
        print(json.dumps(memory_step(name, stage, ck == "1", args.batch)))
        return
    if args.memory:
        out = Path(args.out).with_name("memory256.json") if args.out == ap.get_default("out") else Path(args.out)
        bench_memory(args.memory_config, args.batch, args.threads, out, args.memory_stages, args.memory_modes)
        return
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
