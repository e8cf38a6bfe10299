"""AVP-CNN forward throughput: inputs/s and GFLOP/s per architecture, batch, memory format.

A greedy BOED decision scores L x N = 289 x 10 = 2 890 observations of one test image, so the
classifier's throughput on batches of a few hundred inputs bounds the decision time. Measures
``model(y)`` in inference mode (fp32 on CPU; bf16 autocast too on CUDA) for contiguous and
channels_last layouts, and ``predict_proba`` (uint8 -> probabilities, includes the observe() step).
Prints a table and writes benchmarks/results/classifier.json.

    python benchmarks/bench_classifier.py [--quick] [--device cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from boed.classifier import AVPClassifier, AVPConfig
from xray.io import atomic_write_json

RESULTS = Path(__file__).parent / "results" / "classifier.json"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer configurations, shorter timings")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    args = ap.parse_args()
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
    atomic_write_json(RESULTS, {"device": str(device), "threads": args.threads, "torch": torch.__version__,
                                "machine": platform.processor() or platform.machine(),
                                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                                "rows": rows})
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
