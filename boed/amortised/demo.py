"""The optional demo stage (`boed demo --with-policies`): both amortised policies trained on a demo run.

:func:`policy_stages` gives the stage entries in the format of :func:`boed.demo.run_demo`
(``(name, cli, module, argv)``), one distilled and one GDFS policy per illness, written to
``<out>/policies/<illness>-{distill,gdfs}``; :func:`train_demo_policies` runs them directly on an
existing demo folder (``runs/demo`` with ``ipa/`` and ``avp/``).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Sequence

from xray.cli_base import run_command
from xray.errors import UserError
from xray.labels import resolve_illness

# cpu profile: teacher 256 images x (4 greedy + 2 off-policy states), N = 10, 1500 student steps;
# GDFS 600 steps of 24 images. The quick profile shrinks everything to a smoke test.
PROFILE_ARGS = {
    "cpu": {"distill": [], "gdfs": []},
    "quick": {"distill": ["--teacher-images", 16, "--shard-size", 8, "--steps", 40, "--batch-size", 16],
              "gdfs": ["--steps", 40, "--batch-size", 16]},
    "paper": {"distill": ["--arch", "resnet18", "--teacher-images", 2048, "--steps", 20000, "--lr", 1e-3],
              "gdfs": ["--arch", "resnet18", "--steps", 20000, "--batch-size", 32, "--lr", 1e-4]},
}


def policy_dir(out: str | Path, illness: str, method: str) -> Path:
    return Path(out) / "policies" / f"{resolve_illness(illness).slug}-{method}"


def policy_stages(out: str | Path, illnesses: Sequence[str], profile: str, scans: int, n_samples: int,
                  data_args: list, device: str = "cpu", seed: int = 0) -> list[tuple[str, str, str, list]]:
    """Stage entries ``(name, cli, module, argv)`` training both policies for every illness."""
    if profile not in PROFILE_ARGS:
        raise UserError(f"no policy settings for demo profile {profile!r}; choose one of {', '.join(PROFILE_ARGS)}")
    out = Path(out)
    models = ["--ipa", out / "ipa", "--avp", out / "avp", "--device", device, "--seed", seed, "--no-progress"]
    stages = []
    for ill in illnesses:
        slug = resolve_illness(ill).slug
        stages.append((f"policy/{slug}-distill", "boed train-policy", "boed.commands.train_policy",
                       ["--method", "distill", "--illness", ill, "--scans", scans, "--n-samples", n_samples,
                        "--out", policy_dir(out, ill, "distill"), *models, *data_args, *PROFILE_ARGS[profile]["distill"]]))
        stages.append((f"policy/{slug}-gdfs", "boed train-policy", "boed.commands.train_policy",
                       ["--method", "gdfs", "--illness", ill, "--scans", scans, "--out", policy_dir(out, ill, "gdfs"),
                        *models, *data_args, *PROFILE_ARGS[profile]["gdfs"]]))
    return stages


def train_demo_policies(demo_dir: str | Path, illnesses: Sequence[str] = ("effusion",), profile: str = "cpu",
                        scans: int = 5, n_samples: int = 10, data_args: Sequence = ("--data", "phantom"),
                        device: str = "cpu", seed: int = 0) -> dict[str, Path]:
    """Train both policies on the demo run in ``demo_dir`` (its ``ipa/`` and ``avp/``); returns
    ``{stage name: policy dir}``. Each command resumes when rerun."""
    demo_dir = Path(demo_dir)
    for sub in ("ipa", "avp"):
        if not (demo_dir / sub).is_dir():
            raise UserError(f"{demo_dir} has no {sub}/; run `boed demo --out {shlex.quote(str(demo_dir))}` first")
    done = {}
    for name, _, module, argv in policy_stages(demo_dir, illnesses, profile, scans, n_samples, list(data_args), device, seed):
        run_command(module, argv)
        done[name] = Path(argv[argv.index("--out") + 1])
    return done
