"""Cost of the integrity layer: load time of a 256 px training checkpoint (the ``xray256`` VAE with
its EMA copy and Adam moments, as the trainer writes it) with and without the SHA-256 check, and
the save-side digest. Prints a table and writes ``benchmarks/results/integrity.json``.

    python benchmarks/bench_integrity.py [--config xray256] [--repeats 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ipa_core import VAE
from ipa_core.checkpoint import CKPT_FORMAT, read_checkpoint, save_checkpoint
from ipa_core.config import get_config
from xray.integrity import sha256_file, sidecar_path


def fake_state(config: str) -> dict:
    torch.manual_seed(0)
    model = VAE(get_config(config))
    sd = model.state_dict()
    params = [p for p in model.parameters()]
    opt = {"state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
                     for i, p in enumerate(params)},
           "param_groups": [{"lr": 1e-4, "params": list(range(len(params)))}]}
    return {"format": CKPT_FORMAT, "step": 10, "model": sd, "ema": {k: v.clone() for k, v in sd.items()},
            "optimizer": opt, "provenance": {"bench": True}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="xray256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        state = fake_state(a.config)
        t = time.perf_counter()
        path = save_checkpoint(Path(d), state, [])
        t_save = time.perf_counter() - t
        del state
        size = path.stat().st_size
        rows = {"verified load (torch.load + SHA-256)": [], "plain torch.load": [], "SHA-256 alone": []}
        for _ in range(a.repeats):
            t = time.perf_counter(); read_checkpoint(path); rows["verified load (torch.load + SHA-256)"].append(time.perf_counter() - t)
            t = time.perf_counter(); torch.load(path, map_location="cpu", weights_only=True); rows["plain torch.load"].append(time.perf_counter() - t)
            t = time.perf_counter(); sha256_file(path); rows["SHA-256 alone"].append(time.perf_counter() - t)
        assert sidecar_path(path).is_file()
    best = {k: min(v) for k, v in rows.items()}
    overhead = best["verified load (torch.load + SHA-256)"] / best["plain torch.load"] - 1
    print(f"{a.config} checkpoint: {size / 1e6:.0f} MB (model + EMA + Adam moments); save with digest {t_save:.2f} s")
    for k, v in best.items():
        print(f"  {k:<40} {v:6.2f} s (best of {a.repeats}, warm page cache)")
    print(f"  load-time overhead of the check: {overhead:+.0%}")
    out = Path(__file__).parent / "results" / "integrity.json"
    out.write_text(json.dumps({"config": a.config, "bytes": size, "save_s": t_save, "best_s": best,
                               "load_overhead": overhead, "threads": 1}, indent=2) + "\n")


if __name__ == "__main__":
    main()
