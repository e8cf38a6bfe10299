"""Train the hierarchical VAE, then the IPA partial encoder inside it (one resumable run folder).

  ipa_core train --config tiny --out runs/ipa                  # VAE in runs/ipa/vae, IPA in runs/ipa/ipa
  ipa_core train --stage vae --config tiny --out runs/vae      # the VAE only
  ipa_core train --stage ipa --vae runs/vae --out runs/ipa     # IPA on a trained VAE
  ipa_core train --stage vae --config ffhq256 --import-official ffhq256-iter-1700000-model-ema.th --out runs/ft
  torchrun --nproc-per-node 4 -m ipa_core.cli train --device cuda ...   # data parallel (gloo on CPU)

Rerunning the same command resumes from the last checkpoint, and may raise --steps to train on.
A rerun that changes a setting that changes the result (seed, batch size, learning rate, data,
number of processes, model config, objective, the VAE under IPA) is refused with the first
differing field; --restart moves the old run folder aside (<out>.old-<time>) and starts over.
Without --stage the IPA stage follows its VAE: when the VAE stage trained on (or was restarted),
the IPA stage restarts on the new VAE (its old folder moved aside, with a warning); with
--stage ipa a changed --vae is refused instead. Training defaults come from the
config (official hparams for cifar10/imagenet64/ffhq256, the paper's for xray256, fast ones for
tiny); any flag overrides them (for every stage the command runs). Outputs per stage: metrics.jsonl, train.log, samples/*.png,
checkpoints/, eval.json (test metrics) and model/ (the EMA weights, for --vae/--ipa).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch

from xray.cli_base import describe_train_flags, device_flag, format_default, set_help
from xray.dataset import add_data_args, dataset_from_args, dataset_images, write_data_record
from xray.errors import UserError
from xray.provenance import file_digest

from ..config import CONFIGS, get_config
from ..distributed import env_world
from ..ipa import IPA
from ..ipa_task import IPA_TRAIN_DEFAULTS, IPATask
from ..ipa_task import SAMPLE_N as IPA_SAMPLE_N
from ..trainer import add_train_args, check_resume_settings, fit, read_provenance, train_config_from_args
from ..vae import VAE
from ..vae_task import SAMPLE_N as VAE_SAMPLE_N
from ..vae_task import TRAIN_DEFAULTS, VAETask

log = logging.getLogger(__name__)

HELP = "train the VAE (--stage vae), the IPA partial encoder (--stage ipa), or both"
STAGES = ("vae", "ipa")


def configure(p: argparse.ArgumentParser) -> None:
    add_data_args(p)
    p.set_defaults(image_size=None)  # None: the model config's image_size
    set_help(p, "--image-size", "image side in pixels; must equal the model config's (default: the --config's size, e.g. "
             f"{CONFIGS['tiny'].image_size} for tiny)")
    p.add_argument("--stage", choices=STAGES, default=None,
                   help="vae or ipa (default: both: the VAE in DIR/vae, unless --vae is given, then IPA in DIR/ipa)")
    p.add_argument("--config", default="tiny", help=f"model config: {', '.join(CONFIGS)} (default: tiny)")
    p.add_argument("--vae", metavar="DIR", default=None, help="trained VAE (run folder or model folder) for the IPA stage (default: none: train one first)")
    p.add_argument("--out", metavar="DIR", required=True, help="run folder (created; rerun the command to resume)")
    p.add_argument("--import-official", metavar="FILE", default=None,
                   help="start the VAE from an official VD-VAE *-model(-ema).th file (needs the matching --config)")
    p.add_argument("--objective", choices=("forward", "reverse"), default="forward",
                   help="IPA stage training objective: forward = the paper's IPA, which fits the partial encoder to the VAE's "
                        "posterior of the whole image (O_for); reverse = IPA-R, an ELBO of the observed pixels alone "
                        "(O_rev, paper appendix E) (default: forward)")
    p.add_argument("--eval-images", type=int, default=512, help="test images for the end-of-run metrics, 0 = skip them (default: 512)")
    p.add_argument("--sample-n", type=int, default=None, metavar="N",
                   help="images per row of the sample grids (VAE: samples per temperature; IPA: completions per image); "
                        "0 = no sample grids; each sample at 256 px costs about one decoder pass "
                        f"(default: {VAE_SAMPLE_N} for the VAE, {IPA_SAMPLE_N} for IPA)")
    add_train_args(p, TRAIN_DEFAULTS["tiny"], note=" with --config tiny")
    describe_train_flags(p, {"VAE": TRAIN_DEFAULTS["tiny"], "IPA": IPA_TRAIN_DEFAULTS["tiny"]},
                         note=" for --config tiny; other configs below")
    p.add_argument("--checkpointing", action="store_true",
                   help="recompute block activations in backward: much less memory at 256 px, "
                        "about one extra forward per step, same gradients (default: off)")
    p.epilog = "training defaults per --config (VAE stage | IPA stage):\n" + "\n".join(
        f"  {k}: " + " | ".join(f"steps {d.steps}, batch {d.batch_size}, lr {format_default(d.lr)}, skip threshold "
                                f"{format_default(d.skip_threshold)}"
                                for d in (v, IPA_TRAIN_DEFAULTS.get(k, IPA_TRAIN_DEFAULTS["default"])))
        for k, v in TRAIN_DEFAULTS.items())


def _record_data(out, args, train) -> None:
    """``out/data.json``: the data this run trained on (`boed run` draws its t = 1 images from it)."""
    write_data_record(out, args, train)


def _datasets(args, image_size: int, eval_images: int):
    args.image_size = image_size
    train = dataset_from_args(args, "train")
    test = None
    if eval_images > 0:
        try:
            test = dataset_from_args(args, "test")
        except UserError as e:
            log.warning("no test split (%s): skipping the end-of-run test metrics", e)
        if test is not None and len(test) == 0:
            test = None
    have = getattr(train, "image_size", None) or int(train[0][0].shape[-1])
    if have != image_size:
        raise UserError(f"the dataset has {have}px images, the model config expects {image_size}px; pass --image-size {image_size} or another --config")
    return train, test


TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip format, and the legacy pickle format


def check_checkpoint_file(path: str | Path, flag: str) -> Path:
    """One line when ``path`` is missing or is not a file ``torch.save`` wrote (a text file, an HTML
    error page saved by a download tool, an empty file), before any model is built or folder made."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{flag} {p} {'is a folder' if p.is_dir() else 'does not exist'}; pass the official "
                        "VD-VAE checkpoint file (e.g. ffhq256-iter-1700000-model-ema.th)")
    with open(p, "rb") as f:
        head = f.read(8)
    if not head.startswith(TORCH_MAGIC):
        raise UserError(f"{flag} {p} is not a PyTorch checkpoint (it starts with {head[:8]!r}, expected a zip or pickle "
                        "file from torch.save); download the official *-model-ema.th file again")
    return p


def _vae_model(args):
    if args.import_official:
        model = VAE.from_official(args.import_official, args.config)
        log.info("imported official weights from %s (config %s)", args.import_official, args.config)
        return model
    return VAE(get_config(args.config))


def run_vae_stage(args, out: Path) -> Path:

    if args.config not in TRAIN_DEFAULTS:
        raise UserError(f"unknown config {args.config!r}; valid configs: {', '.join(CONFIGS)}")
    cfg = train_config_from_args(args, TRAIN_DEFAULTS[args.config])
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    model = _vae_model(args).set_checkpointing(args.checkpointing)
    if args.image_size is not None and args.image_size != model.config.image_size:
        raise UserError(f"--image-size {args.image_size} does not match config {args.config!r} ({model.config.image_size}px); drop the flag or pick another config")
    check_resume_settings(out, cfg, env_world()[1])  # a refused resume prepares no data
    train, test = _datasets(args, model.config.image_size, args.eval_images)
    init = None
    if args.import_official:
        init = file_digest(args.import_official)
    task = VAETask(model, eval_max_images=args.eval_images or None, init_digest=init, **_sample_kw(args))
    fit(task, train, cfg, out, test_set=test)
    _record_data(out, args, train)
    return out


def _sample_kw(args) -> dict:
    """``sample_n`` for the task when --sample-n was given (else the task's default)."""
    return {} if getattr(args, "sample_n", None) is None else {"sample_n": args.sample_n}


def _config_name(cfg) -> str | None:
    """The named config a trained VAE was built from (measured shift/scale aside), if any."""
    def arch(c) -> dict:
        return {k: v for k, v in c.to_dict().items() if k not in ("shift", "scale")}

    return next((name for name, c in CONFIGS.items() if arch(c) == arch(cfg)), None)


def run_ipa_stage(args, vae_dir: Path, out: Path, follow_vae: bool = False) -> Path:
    """Train IPA on the VAE in ``vae_dir``. ``follow_vae``: when ``out`` holds an IPA run made on
    another VAE, move it aside and start over (the combined run); otherwise such a resume is refused."""


    vae = VAE.from_pretrained(vae_dir)
    name = _config_name(vae.config) or args.config
    cfg = train_config_from_args(args, IPA_TRAIN_DEFAULTS.get(name, IPA_TRAIN_DEFAULTS["default"]))
    torch.manual_seed(cfg.seed)
    model = IPA.from_vae(vae, warm_start=True, objective=args.objective).set_checkpointing(args.checkpointing)
    if not follow_vae:  # (following a retrained VAE restarts the run whatever its settings were)
        check_resume_settings(out, cfg, env_world()[1])  # a refused resume prepares no data
    train, test = _datasets(args, model.config.image_size, args.eval_images)
    shown = test if test is not None else train  # the same images in every sample grid, also after a resume
    grid = dataset_images(shown, range(min(4, len(shown))))  # (4, C, S, S) uint8
    task = IPATask(model, sample_images=grid, eval_max_images=args.eval_images or 1, **_sample_kw(args))
    if follow_vae and not cfg.restart:
        old = read_provenance(out) or {}
        old_vae, new_vae = (old.get("task") or {}).get("vae"), task.provenance()["vae"]
        if old_vae is not None and old_vae != new_vae:
            log.warning("the VAE in %s changed since %s was trained on it (weights %s, now %s): the IPA stage restarts on the new VAE",
                        vae_dir, out, old_vae, new_vae)
            cfg = dataclasses.replace(cfg, restart=True)
    fit(task, train, cfg, out, test_set=test)
    _record_data(out, args, train)
    return out


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    args.device = device_flag(args.device)  # checked before anything is created
    if args.eval_images < 0:
        raise UserError(f"--eval-images is {args.eval_images}; expected 0 (skip the end-of-run metrics) or more test images")
    if getattr(args, "sample_n", None) is not None and args.sample_n < 0:
        raise UserError(f"--sample-n must be >= 0 (0 = no sample grids), got {args.sample_n}")
    if args.stage == "ipa" and args.vae is None:
        raise UserError("--stage ipa needs --vae DIR (a trained VAE run folder, e.g. from `ipa_core train --stage vae --out DIR`)")
    if args.stage == "vae" and args.vae is not None:
        raise UserError(f"--vae {args.vae} is the VAE an IPA stage builds on; --stage vae trains a new one and would "
                        "ignore it: drop --vae, or use --stage ipa")
    if args.vae is not None and args.import_official:
        raise UserError("--import-official starts a VAE stage from official weights, --vae skips that stage; pass one of them")
    if args.stage == "ipa" and args.import_official:
        raise UserError("--import-official applies to the VAE stage; drop it or use --stage vae")
    if args.import_official:
        check_checkpoint_file(args.import_official, "--import-official")
    results = {}
    if args.stage == "vae":
        results["vae"] = run_vae_stage(args, out)
    elif args.stage == "ipa":
        results["ipa"] = run_ipa_stage(args, Path(args.vae), out)
    else:
        vae_dir = Path(args.vae) if args.vae else run_vae_stage(args, out / "vae")
        results["vae"] = vae_dir
        results["ipa"] = run_ipa_stage(args, vae_dir, out / "ipa", follow_vae=True)
    if env_world()[0] == 0:
        for stage, d in results.items():
            ev = Path(d) / "eval.json"
            metrics = json.loads(ev.read_text()) if ev.is_file() else {}
            summary = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
            print(f"{stage}: model in {Path(d) / 'model'} {summary}".rstrip())
    return 0
