"""One device check of the paper profile's pieces (issue 13): run it first on a new accelerator.

On CUDA (S = 256, the paper's sizes, untrained models: speed only):
  (1) VAE and IPA training steps/s of the xray256 model (115 M parameters) at 256 px, fp32 and bf16
      autocast, activation checkpointing on (as the paper profile), peak GPU memory per row;
  (2) one greedy decision (N = 10, 289 candidates) with a DenseNet-121 AVP-CNN, incremental vs full;
  (3) bf16 vs fp32 argmax agreement of the EIG over ``--decisions`` decisions (fp32: TF32 off);
  (4) images/s of ``boed evaluate`` per method on a small phantom set (one process per method; the
      rate includes process start-up and model loading), under ``torchrun --nproc_per_node=<GPUs>``
      when more than one GPU is visible, and the projected wall time of the paper's 5 000-image
      evaluation of one task.
Without CUDA everything runs at reduced size on the CPU (64 px, tiny VAE, DenseNet-121 on a few
candidates, the tiny AVP-CNN for agreement and evaluation) and the table says so. Prints a table,
writes JSON (default ``benchmarks/results/device_check_<cpu|cuda>.json``).

    benchmarks/device_check.sh [--device auto] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_greedy  # noqa: E402
from boed import estimators  # noqa: E402
from boed.classifier import AVPClassifier, AVPConfig  # noqa: E402
from boed.geometry import ScanGeometry  # noqa: E402
from boed.scoring import candidate_probs, prepare_classifier  # noqa: E402
from ipa_core.config import get_config  # noqa: E402
from ipa_core.ipa import IPA  # noqa: E402
from ipa_core.vae import VAE  # noqa: E402
from xray.cli_base import parse_device  # noqa: E402
from xray.errors import UserError, cli_entry  # noqa: E402
from xray.io import atomic_write_json  # noqa: E402
from xray.labels import resolve_illness  # noqa: E402

RESULTS = Path(__file__).parent / "results"
METHODS = ("eig", "epe", "random", "uncond", "nongreedy", "full")
PAPER_TEST_IMAGES = 5000
BUDGET_S = 450.0  # the whole check fits in 8 minutes on a CUDA machine


@dataclasses.dataclass
class Sizes:
    """What each part runs at: the paper's sizes on CUDA, reduced ones on the CPU."""

    S: int
    vae_config: str
    batch: int
    steps: int
    candidates: int
    agreement_arch: str
    eval_arch: str
    eval_images: int
    scans: int
    phantom_n: int

    @classmethod
    def for_device(cls, device: torch.device) -> "Sizes":
        if device.type == "cuda":
            return cls(256, "xray256", 8, 5, 289, "densenet121", "densenet121", 16, 5, 64)
        return cls(64, "tiny", 2, 2, 3, "tiny", "tiny", 2, 2, 24)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: process peak RSS so far


@contextmanager
def precision(device: torch.device, bf16: bool):
    """bf16 autocast, or true fp32 (TF32 off on CUDA)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ----------------------------------------------------------------------------- (1) training steps
def train_steps(sz: Sizes, device: torch.device) -> list[dict]:
    rows = []
    cfg = dataclasses.replace(get_config(sz.vae_config), shift=-127.5, scale=1 / 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (sz.batch, 1, sz.S, sz.S), dtype=torch.uint8, generator=g).to(device)
    m = (torch.rand(sz.batch, 1, 4, 4, generator=g) < 0.4).float().repeat_interleave(sz.S // 4, 2).repeat_interleave(sz.S // 4, 3)
    g = torch.Generator(device=device).manual_seed(0)  # the training noise on the device, as ipa_core.trainer draws it
    for stage in ("vae", "ipa"):
        torch.manual_seed(0)
        model = VAE(cfg)
        if stage == "ipa":
            model = IPA.from_vae(model)
        model = model.to(device).set_checkpointing(True).train()
        params = model.partial_parameters() if stage == "ipa" else list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-5)
        for bf16 in (False, True):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for i in range(sz.steps + 1):  # the first step warms up
                sync(device)
                t = time.perf_counter()
                with precision(device, bf16):
                    out = model.objective(x, m, g)["loss"] if stage == "ipa" else model.loss(x, g)["elbo"]
                opt.zero_grad(set_to_none=True)
                out.backward()
                opt.step()
                sync(device)
                if i:
                    times.append(time.perf_counter() - t)
            step = min(times)
            rows.append(dict(stage=stage, config=sz.vae_config, S=sz.S, batch=sz.batch, precision="bf16" if bf16 else "fp32",
                             checkpointing=True, step_s=step, steps_per_s=1 / step, images_per_s=sz.batch / step,
                             peak_memory_gb=peak_memory_gb(device), loss=float(out.detach())))
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- (2) + (3) decisions
def greedy_decision(sz: Sizes, device: torch.device) -> dict:
    bench_greedy.DEVICE = device
    if device.type == "cuda":
        bench_greedy.CLOCK = bench_greedy._cuda_clock
    clf = bench_greedy.load_classifier("densenet121", sz.S, None, device)
    return bench_greedy.bench_arch(clf, sz.S, sz.candidates, repeats=1 if device.type == "cuda" else 0)


def agreement(sz: Sizes, device: torch.device, decisions: int, per_call: int = 10) -> dict:
    """EIG argmax with bf16 autocast vs fp32 on the same samples and masks."""
    geo = ScanGeometry(sz.S)
    ill = resolve_illness("effusion")
    torch.manual_seed(0)
    clf = AVPClassifier(AVPConfig(arch=sz.agreement_arch, image_size=sz.S))
    with torch.no_grad():
        clf.first_conv.weight[:, -1].normal_(0, 0.3)
    model = prepare_classifier(clf, device)
    g = torch.Generator().manual_seed(1)
    same, gaps, done, t0 = 0, [], 0, time.perf_counter()
    while done < decisions:
        B = min(per_call, decisions - done)
        x = torch.randint(0, 256, (B, 10, 1, sz.S, sz.S), dtype=torch.uint8, generator=g).to(device)
        mask = torch.stack([geo.mask(torch.randperm(geo.num_locations, generator=g)[:b % 4].tolist()) for b in range(B)]).to(device)
        with precision(device, False):
            e32 = estimators.eig(candidate_probs(model, x, mask, geo, ill, amp=False))  # (B, L)
        e16 = estimators.eig(candidate_probs(model, x, mask, geo, ill, amp=True))
        a32, a16 = e32.argmax(1), e16.argmax(1)
        same += int((a32 == a16).sum())
        gaps.extend((e32.gather(1, a32[:, None]) - e32.gather(1, a16[:, None])).flatten().tolist())  # fp32 EIG lost
        done += B
    return dict(arch=sz.agreement_arch, S=sz.S, decisions=done, agree=same / done, max_eig_lost=max(gaps),
                seconds=time.perf_counter() - t0, bf16_active=device.type == "cuda")


# ----------------------------------------------------------------------------- (4) evaluation
def evaluate_rates(sz: Sizes, device: torch.device, work: Path, deadline: float) -> list[dict]:
    from xray.phantom import generate

    root = generate(work / "nih", n=sz.phantom_n, size=sz.S, seed=0, workers=1, progress=False)
    cfg = dataclasses.replace(get_config(sz.vae_config), shift=-127.5, scale=1 / 64)
    torch.manual_seed(0)
    IPA.from_vae(VAE(cfg)).save_pretrained(work / "ipa" / "model")
    AVPClassifier(AVPConfig(arch=sz.eval_arch, image_size=sz.S)).save_pretrained(work / "avp" / "model")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", "-m", "boed.cli"] if gpus > 1  # torchrun
                else [sys.executable, "-m", "boed.cli"])
    common = ["--data", "chestxray", "--data-root", str(root), "--cache-dir", str(work / "cache"), "--image-size", str(sz.S),
              "--ipa", str(work / "ipa"), "--avp", str(work / "avp"), "--scans", str(sz.scans), "--n-boot", "20",
              "--no-progress"] + ([] if gpus > 1 else ["--device", str(device)])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    rows = []
    for k, method in enumerate(("random",) + METHODS):  # the first run builds the cache: not timed
        n = 1 if k == 0 else sz.eval_images
        t = time.perf_counter()
        if t > deadline:
            rows.append(dict(method=method, error="skipped: the time budget (--budget-s) is spent"))
            continue
        try:
            res = subprocess.run(launcher + ["evaluate", "--methods", method, "--n-test", str(n), "--out", str(work / f"ev_{k}")]
                                 + common, capture_output=True, text=True, env=env, timeout=deadline - t)
        except subprocess.TimeoutExpired:
            rows.append(dict(method=method, error="stopped: the time budget (--budget-s) is spent"))
            continue
        wall = time.perf_counter() - t
        if res.returncode:
            rows.append(dict(method=method, error=" / ".join(res.stderr.strip().splitlines()[-3:] or ["?"])[-600:]))
            continue
        if k:
            rows.append(dict(method=method, images=n, scans=sz.scans, wall_s=wall, images_per_s=n / wall, processes=max(1, gpus),
                             projected_5000_h=PAPER_TEST_IMAGES / (n / wall) / 3600))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    ap.add_argument("--decisions", type=int, default=None, help="decisions for the bf16/fp32 agreement (default: 100 on CUDA, 4 on the CPU)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: benchmarks/results/device_check_<cpu|cuda>.json)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S,
                    help=f"seconds after which the remaining parts are skipped (default: {BUDGET_S:g})")
    ap.add_argument("--skip", nargs="*", default=[], choices=("train", "decision", "agreement", "evaluate"),
                    help="parts to leave out: train, decision, agreement, evaluate (default: none)")
    args = ap.parse_args(argv)
    device = parse_device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: the device check runs on cuda or cpu")
    decisions = args.decisions if args.decisions is not None else (100 if device.type == "cuda" else 4)
    if decisions < 1:
        raise UserError(f"--decisions must be >= 1, got {decisions}")
    torch.set_num_threads(args.threads)
    sz = Sizes.for_device(device)
    out = args.out or RESULTS / f"device_check_{device.type}.json"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    reduced = device.type != "cuda"
    print(f"device check on {device} ({name}){': no CUDA, reduced sizes on the CPU' if reduced else ''}; S = {sz.S}", flush=True)
    res: dict = dict(device=str(device), device_name=name, reduced=reduced, sizes=dataclasses.asdict(sz), torch=torch.__version__,
                     gpus=torch.cuda.device_count() if device.type == "cuda" else 0, threads=args.threads)
    t_all = time.perf_counter()
    deadline = t_all + args.budget_s

    def wanted(part: str) -> bool:
        if part in args.skip:
            return False
        if time.perf_counter() > deadline:
            print(f"({part}: skipped, the time budget of {args.budget_s:g} s is spent)", flush=True)
            res.setdefault("skipped", []).append(part)
            return False
        return True

    def part(name: str, fn) -> None:
        """Run one part; a failure is recorded (type, message, innermost frames) and the next part runs."""
        if not wanted(name):
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- a device check reports every part, not only the first failure
            frames = traceback.extract_tb(e.__traceback__)[-3:]
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {e} ({where})"
            print(f"({name}: FAILED: {res['errors'][name]})", flush=True)

    def run_train() -> None:
        res["train"] = train_steps(sz, device)
        print(f"(1) training steps, {sz.vae_config} at {sz.S} px, batch {sz.batch}, checkpointing on")
        print(f"    {'stage':5} {'precision':9} {'steps/s':>8} {'images/s':>9} {'peak GB':>8}")
        for r in res["train"]:
            print(f"    {r['stage']:5} {r['precision']:9} {r['steps_per_s']:8.3f} {r['images_per_s']:9.2f} {r['peak_memory_gb']:8.2f}")
        print(f"    (peak GB: {'torch.cuda.max_memory_allocated per row' if not reduced else 'process peak RSS so far (CPU)'})", flush=True)

    part('train', run_train)

    def run_decision() -> None:
        d = res["decision"] = greedy_decision(sz, device)
        bench_greedy.print_arch(d, args.threads, label="(2)")

    part('decision', run_decision)

    def run_agreement() -> None:
        a = res["agreement"] = agreement(sz, device, decisions)
        print(f"(3) bf16 vs fp32 EIG argmax agreement, {a['arch']} at {a['S']} px: {100 * a['agree']:.1f} % of {a['decisions']} "
              f"decisions; largest fp32 EIG lost {a['max_eig_lost']:.2e} nats"
              + ("" if a["bf16_active"] else " (bf16 autocast is CUDA-only in boed.scoring: both fp32 here)"), flush=True)

    part('agreement', run_agreement)

    def run_evaluate() -> None:
        work = Path(tempfile.mkdtemp(prefix="device_check_"))
        try:
            rows = res["evaluate"] = evaluate_rates(sz, device, work, deadline)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"(4) boed evaluate, {sz.eval_arch} AVP-CNN + {sz.vae_config} IPA (untrained) at {sz.S} px, {sz.scans} scans, "
              f"{rows[0].get('processes', 1) if rows else 1} process(es); rates include start-up")
        print(f"    {'method':10} {'images':>6} {'wall s':>8} {'images/s':>9} {'5000 images, h':>15}")
        for r in rows:
            if "error" in r:
                print(f"    {r['method']:10} failed: {r['error']}")
            else:
                print(f"    {r['method']:10} {r['images']:6d} {r['wall_s']:8.1f} {r['images_per_s']:9.3f} {r['projected_5000_h']:15.2f}")
        ok = [r for r in rows if "error" not in r]
        res["projected_5000_all_methods_h"] = sum(r["projected_5000_h"] for r in ok)
        print(f"    projected wall time of the paper's {PAPER_TEST_IMAGES}-image evaluation of one task, all methods: "
              f"{res['projected_5000_all_methods_h']:.1f} h" + (" (at reduced size, CPU)" if reduced else ""))

    part('evaluate', run_evaluate)

    res["wall_s"] = time.perf_counter() - t_all
    atomic_write_json(out, res)
    print(f"total {res['wall_s']:.0f} s; wrote {out}" + (f"; FAILED parts: {', '.join(res['errors'])}" if "errors" in res else ""))
    return 1 if "errors" in res else 0


if __name__ == "__main__":
    cli_entry(main)()
