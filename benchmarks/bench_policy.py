"""Decision latency of the amortised policies against greedy EIG-IPA, S = 64, one thread.

One decision for a batch of B = 64 test images at t = 3 (two patches already scanned, so greedy
EIG-IPA cannot use its cached t = 1 choice): greedy EIG-IPA (N = 10 IPA completions per image,
289 candidates x N classifier passes, incremental scoring: the GreedyPolicy defaults) against the
distilled policy and the GDFS policy (one forward of the small policy CNN each, masking and
argmax included). Same process, same thread, same states; the target is a ratio >= 100x.

Models: the demo cpu-profile architectures with random weights (the cost does not depend on
training): ``AVPClassifier(AVPConfig(arch="tiny", image_size=64))``, the "tiny" IPA config,
``PolicyNet(arch="small")``; or trained ones with ``--ipa --avp --distilled --gdfs``.
Times are CPU time of this process (``time.process_time``: on a shared machine wall time mostly
measures the neighbours); wall times are recorded too. Prints a table and writes
benchmarks/results/policy.json.

    python benchmarks/bench_policy.py [--batch 64] [--greedy-repeats 1] [--policy-repeats 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from pathlib import Path

import torch

from boed.amortised import AmortisedPolicy, PolicyConfig, PolicyNet, load_policy
from boed.amortised.teacher import states_of
from boed.classifier import AVPClassifier, AVPConfig
from boed.geometry import ScanGeometry
from boed.policies import GreedyPolicy
from boed.samplers import IPASampler
from xray.io import atomic_write_json

RESULTS = Path(__file__).parent / "results" / "policy.json"
S, N = 64, 10


def timed(fn, repeats: int, warmup: bool = True) -> tuple[float, float]:
    """Mean (CPU seconds, wall seconds) of ``fn()`` over ``repeats`` calls (after one warm-up call)."""
    if warmup:
        fn()
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.process_time() - c0) / repeats, (time.perf_counter() - w0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="images per decision (default: 64)")
    ap.add_argument("--greedy-repeats", type=int, default=1, help="timed greedy decisions (default: 1)")
    ap.add_argument("--policy-repeats", type=int, default=20, help="timed policy decisions (default: 20)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--ipa", default=None, help="a trained IPA model (default: None, random tiny IPA)")
    ap.add_argument("--avp", default=None, help="a trained AVP model (default: None, random tiny AVP-CNN)")
    ap.add_argument("--distilled", default=None, help="a trained distilled policy (default: None, random)")
    ap.add_argument("--gdfs", default=None, help="a trained GDFS policy (default: None, random)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from ipa_core.config import get_config
    from ipa_core.ipa import IPA, IPAConfig

    geometry = ScanGeometry(S)
    avp = AVPClassifier.from_pretrained(args.avp) if args.avp else AVPClassifier(AVPConfig(arch="tiny", image_size=S))
    ipa = (IPA.from_pretrained(args.ipa) if args.ipa else
           IPA(IPAConfig.from_vae(dataclasses.replace(get_config("tiny"), shift=-127.5, scale=1 / 64)))).eval()
    greedy = GreedyPolicy(avp.eval(), IPASampler(ipa), "effusion", geometry, n_samples=N, device="cpu")

    def policy(path, method):
        if path:
            return load_policy(path, "effusion", geometry, "cpu")
        return AmortisedPolicy(PolicyNet(PolicyConfig(method=method, image_size=S, patch_size=geometry.patch_size,
                                                      grid=geometry.grid, first_location=0 if method == "distill" else None)))

    distilled, gdfs = policy(args.distilled, "distill"), policy(args.gdfs, "gdfs")
    g = torch.Generator().manual_seed(1)
    B = args.batch
    x = torch.randint(0, 256, (B, 1, S, S), dtype=torch.uint8, generator=g)
    locs = torch.randint(0, geometry.num_locations, (B, 2), generator=g)
    state = states_of(x, locs, geometry)  # t = 3: two patches scanned

    rows = {}
    greedy.next_locations(states_of(x[:2], locs[:2], geometry))  # warm-up on 2 images (a full batch takes ~25 s)
    rows["eig-ipa (greedy)"] = timed(lambda: greedy.next_locations(state, torch.Generator().manual_seed(0)),
                                     args.greedy_repeats, warmup=False)
    rows["distilled"] = timed(lambda: distilled.next_locations(state), args.policy_repeats)
    rows["gdfs"] = timed(lambda: gdfs.next_locations(state), args.policy_repeats)
    base = rows["eig-ipa (greedy)"][0]
    print(f"one decision for {B} images at {S} px, t = 3, {args.threads} thread(s), CPU time of this process")
    print(f"{'method':<20} {'s / batch':>10} {'ms / image':>11} {'wall s':>8} {'speed-up':>9}")
    for name, (cpu, wall) in rows.items():
        print(f"{name:<20} {cpu:10.4f} {1000 * cpu / B:11.3f} {wall:8.4f} {base / cpu:8.0f}x")
    atomic_write_json(RESULTS, {
        "batch": B, "image_size": S, "n_samples": N, "t": 3, "threads": args.threads,
        "clock": "time.process_time (CPU time of this process)",
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "trained_models": bool(args.ipa or args.avp or args.distilled or args.gdfs),
        "rows": {k: {"cpu_s_per_batch": c, "wall_s_per_batch": w, "speedup_vs_greedy": base / c} for k, (c, w) in rows.items()},
    })
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
