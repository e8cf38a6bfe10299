"""Wall time of the demo's AVP stage: the cpu profile's recipe against the one it replaced (issue 24).

Issue 24 allows the cpu profile's AVP stage at most 2x the time of the stage it had before
(appendix I.4 masks, 2 000 steps). This runs the demo's own AVP stage command
(``boed.demo.avp_stage``: `boed train-avp` with the profile's flags, its end-of-run report
included) for both recipes on the same data, alternating them ``--rounds`` times in one process so
that both see the same machine, and reports each one's median wall time and their ratio.

    python benchmarks/bench_avp_stage.py [--rounds 2] [--data-root DIR]

``--data-root``: an NIH-format folder (default: the default phantom set, generated on first use).
Prints a table and writes benchmarks/results/avp_stage.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from boed.demo import PROFILES, DemoOptions, DemoProfile, avp_stage  # noqa: E402
from xray.cli_base import run_command  # noqa: E402
from xray.io import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "avp_stage.json"
TABLE = RESULTS.with_suffix(".md")


def before_issue_24(profile: DemoProfile) -> DemoProfile:
    """The cpu profile's AVP recipe before issue 24: `boed train-avp`'s own masks (appendix I.4), 2 000 steps."""
    return dataclasses.replace(profile, avp_steps=2000, avp_p_full=None, avp_p_freeform=None, avp_patch_layout=None,
                               avp_input_norm=None)


def time_stage(profile: DemoProfile, out: Path, data_root: Path | None) -> float:
    """Seconds to run the demo's AVP stage for ``profile`` into the fresh folder ``out``."""
    stage = avp_stage(DemoOptions(out=out, profile=profile, illnesses=("Effusion",), data_root=data_root))
    t0 = time.perf_counter()
    run_command(stage.target, [str(a) for a in stage.argv])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two recipes (default: 2)")
    ap.add_argument("--data-root", type=Path, default=None, help="an NIH-format folder (default: the default phantom set)")
    args = ap.parse_args()
    recipes = {"before (I.4 masks, 2 000 steps)": before_issue_24(PROFILES["cpu"]), "cpu profile now": PROFILES["cpu"]}
    times: dict[str, list[float]] = {k: [] for k in recipes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, prof in recipes.items():
                times[name].append(time_stage(prof, Path(tmp) / f"{r}-{len(times[name])}-{name.split()[0]}", args.data_root))
                print(f"round {r}: {name}: {times[name][-1]:.1f} s", flush=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    base = med[next(iter(recipes))]
    rows = [{"recipe": k, "steps": recipes[k].avp_steps, "seconds": times[k], "median_s": med[k], "ratio": med[k] / base}
            for k in recipes]
    atomic_write_json(RESULTS, {"rows": rows, "rounds": args.rounds, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                "machine": platform.processor() or platform.machine(),
                                "data": str(args.data_root or "the default phantom set")})
    lines = ["# The demo's AVP stage, cpu profile now vs before issue 24 (alternated in one process)", "",
             "| recipe | steps | median s | runs (s) | ratio to before |", "|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['steps']} | {r['median_s']:.1f} | {', '.join(f'{s:.1f}' for s in r['seconds'])} | "
              f"{r['ratio']:.2f}x |" for r in rows]
    atomic_write_text(TABLE, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
