"""What R repeats of `boed evaluate` cost: one repeat's cost, what is shared, and R x one evaluation.

Runs ``boed.evaluation.evaluate`` on the same tiny setting with R = 1 and R = 3 (all six default
methods, S = 64, the demo's tiny AVP-CNN and tiny IPA with random weights: the cost does not depend
on training) and times each method's jobs. Shared across repeats: the full-image records (computed
once, ``repeat`` None), the test images, the models and their inference copies; shared across
methods within a repeat: the t = 1 choice (EIG-IPA, Uncond; :class:`boed.policies.FirstChoiceCache`).
Everything else (t = 1 draws, Uncond / non-greedy searches, per-image sample streams) is redrawn
per repeat, so R repeats should cost about R x one evaluation minus the shared part.

    python benchmarks/bench_repeats.py [--images 8] [--scans 3] [--threads 1]

Prints a table and writes benchmarks/results/repeats.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from boed.classifier import AVPClassifier, AVPConfig  # noqa: E402
from boed.evaluation import BuildContext, EvalConfig, build_policies, evaluate  # noqa: E402
from boed.policies import Policy  # noqa: E402
from boed.geometry import ScanGeometry  # noqa: E402
from ipa_core.config import get_config  # noqa: E402
from ipa_core.ipa import IPA, IPAConfig  # noqa: E402
from xray.io import atomic_write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "repeats.json"
S = 64


class Bank:
    """In-memory split: smooth random uint8 images and random 0/1 labels."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        yy, xx = torch.meshgrid(torch.linspace(0, 1, S), torch.linspace(0, 1, S), indexing="ij")
        a = torch.rand(n, 3, generator=g) * 4 + 0.5
        img = 0.5 + 0.3 * torch.sin(a[:, 0, None, None] * 6 * xx + a[:, 1, None, None]) * torch.cos(a[:, 2, None, None] * 6 * yy)
        self.images = (img.clamp(0, 1) * 255).to(torch.uint8)[:, None]  # (n, 1, S, S)
        self.labels = (torch.rand(n, 15, generator=g) > 0.5).float().numpy()
        self.image_size = S

    def __len__(self):
        return len(self.images)

    def get_batch(self, idx):
        return self.images[torch.as_tensor(idx).long()]


class Timed(Policy):
    """Wraps a policy and accumulates the CPU time of its calls (prime + next_locations)."""

    def __init__(self, policy: Policy, clock):
        self.p, self.clock, self.seconds = policy, clock, 0.0
        self.name, self.observes_everything, self.per_budget = policy.name, policy.observes_everything, policy.per_budget

    def _t(self, fn, *a):
        t0 = self.clock()
        try:
            return fn(*a)
        finally:
            self.seconds += self.clock() - t0

    def reset(self):
        self.p.reset()

    def prime(self, *a):
        return self._t(self.p.prime, *a)

    def budget_set(self, t):
        return self._t(self.p.budget_set, t)

    def next_locations(self, state, generator=None):
        return self._t(self.p.next_locations, state, generator)


def run(R: int, images: int, scans: int, clf, ipa, test, train, out: Path) -> dict:
    cfg = EvalConfig(tasks=("Effusion",), scans=scans, seed=0, repeats=R, indices=list(range(images)), batch_size=8,
                     n_samples=10, image_size=S, n_boot=0)
    ctx = BuildContext(cfg, clf, ScanGeometry(S), torch.device("cpu"), train, {"ipa": ipa})
    pols = {k: Timed(p, time.process_time) for k, p in build_policies(cfg, ctx).items()}
    t0, w0 = time.process_time(), time.perf_counter()
    evaluate(pols, clf, test, cfg, out, progress=False)
    total, wall = time.process_time() - t0, time.perf_counter() - w0
    return {"R": R, "cpu_s": total, "wall_s": wall, "policy_cpu_s": {m: p.seconds for (m, _), p in pols.items()},
            "t1_computed": ctx.first_cache.misses, "t1_shared": ctx.first_cache.hits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--scans", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clf = AVPClassifier(AVPConfig(arch="tiny", image_size=S)).eval()
    ipa = IPA(IPAConfig.from_vae(dataclasses.replace(get_config("tiny"), shift=-127.5, scale=1 / 64))).eval()
    test, train = Bank(args.images, 1), Bank(200, 2)
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args.images, args.scans, clf, ipa, test, train, Path(tmp) / "r1")
        three = run(3, args.images, args.scans, clf, ipa, test, train, Path(tmp) / "r3")
    per_repeat = (three["cpu_s"] - one["cpu_s"]) / 2
    shared = one["cpu_s"] - per_repeat
    print(f"R repeats of boed evaluate: {args.images} images, T = {args.scans}, N = 10, 289 sequences, "
          f"6 methods, {args.threads} thread(s), CPU time")
    print(f"  {'method':<12} {'R=1 s':>8} {'R=3 s':>8} {'ratio':>6}")
    for m in one["policy_cpu_s"]:
        a, b = one["policy_cpu_s"][m], three["policy_cpu_s"][m]
        print(f"  {m:<12} {a:8.2f} {b:8.2f} {b / a if a > 0 else float('nan'):6.2f}")
    print(f"  {'total':<12} {one['cpu_s']:8.2f} {three['cpu_s']:8.2f} {three['cpu_s'] / one['cpu_s']:6.2f}"
          f"   (wall {one['wall_s']:.1f} s, {three['wall_s']:.1f} s)")
    print(f"  one repeat costs {per_repeat:.2f} s; shared by all repeats {shared:.2f} s "
          f"(full image, classifier at t = 0, setup); R = 3 costs {three['cpu_s'] / (3 * one['cpu_s']):.2f} x (3 x one evaluation)")
    print(f"  t = 1 choices computed/shared between methods: R=1 {one['t1_computed']}/{one['t1_shared']}, "
          f"R=3 {three['t1_computed']}/{three['t1_shared']}")
    atomic_write_json(RESULTS, {"images": args.images, "scans": args.scans, "threads": args.threads,
                                "machine": platform.machine(), "torch": torch.__version__, "r1": one, "r3": three,
                                "per_repeat_cpu_s": per_repeat, "shared_cpu_s": shared,
                                "r3_over_3x_r1": three["cpu_s"] / (3 * one["cpu_s"])})
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
