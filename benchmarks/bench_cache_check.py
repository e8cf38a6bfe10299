"""Cost of the prepared cache's self-check at NIH scale: a synthetic 256 px cache of 112 120 rows
(7.3 GB ``images.u8``, a full-size ``labels.csv``), timed for the default open check (sizes,
labels.csv SHA-256, :data:`xray.cache.SAMPLE_CHUNKS` random chunks) and for ``--verify`` (every
chunk). Prints a table and writes ``benchmarks/results/cache_check.json``.

    python benchmarks/bench_cache_check.py [--rows 112120] [--size 256] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from xray import cache
from xray.integrity import sha256_file


def build(out: Path, n: int, size: int) -> None:
    """A cache folder with random-ish pixels (written in blocks) and a labels.csv of n rows."""
    rng = np.random.default_rng(0)
    mm = np.memmap(out / cache.IMAGES_FILE, dtype=np.uint8, mode="w+", shape=(n, size, size))
    block = rng.integers(0, 256, size=(cache.CHUNK * 16, size, size), dtype=np.uint8)  # (k, S, S)
    for i in range(0, n, len(block)):
        mm[i:i + len(block)] = block[: n - i]
    mm.flush()
    del mm
    cols = ["row", "split", "Patient ID", "Effusion", "Edema", "No Finding"]
    with open(out / cache.LABELS_FILE, "w") as f:
        f.write("image," + ",".join(cols) + "\n")
        for r in range(n):
            f.write(f"{r:08d}_000.png,{r},train,{r // 3},{r % 2},{r % 5 == 0:d},{r % 7 == 0:d}\n")
    manifest = {"image_size": size, "n_rows": n, "n_images": n,
                "files": {cache.LABELS_FILE: {"bytes": (out / cache.LABELS_FILE).stat().st_size, "sha256": sha256_file(out / cache.LABELS_FILE)},
                          cache.IMAGES_FILE: {"chunk_rows": cache.CHUNK, "chunks": cache._image_digests(out, n, size)}}}
    (out / cache.MANIFEST_FILE).write_text(json.dumps(manifest))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=112_120)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        out = Path(d)
        t = time.perf_counter()
        build(out, a.rows, a.size)
        t_build = time.perf_counter() - t
        gb = (out / cache.IMAGES_FILE).stat().st_size / 1e9
        res = {}
        for name, kw in (("default open check", {}), ("sizes + labels.csv only", {"sample": 0}), ("--verify (every chunk)", {"full": True})):
            best = float("inf")
            for _ in range(a.repeats if "verify" not in name else 1):
                t = time.perf_counter()
                assert cache.check_files(out, a.size, **kw) is None
                best = min(best, time.perf_counter() - t)
            res[name] = best
    print(f"synthetic cache: {a.rows} rows at {a.size} px = {gb:.1f} GB images.u8 (built + digested in {t_build:.0f} s)")
    for k, v in res.items():
        print(f"  {k:<28} {v * 1000:8.0f} ms")
    (Path(__file__).parent / "results" / "cache_check.json").write_text(
        json.dumps({"rows": a.rows, "size": a.size, "gb": gb, "seconds": res}, indent=2) + "\n")


if __name__ == "__main__":
    main()
