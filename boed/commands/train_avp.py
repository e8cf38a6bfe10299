"""Train the AVP-CNN g(v | y) on partially observed x-rays (15 sigmoid outputs, BCE).

Examples:
  boed train-avp --out runs/demo/avp                     # tiny CNN on the phantom set at 64 px
  boed train-avp --data chestxray --data-root /data/nih --image-size 256 --arch densenet121 \\
      --init imagenet --lr 1e-5 --batch-size 32 --steps 32000 --device cuda --out runs/avp256   # paper I.4
  boed train-avp ... --arch densenet121 --init xrv:densenet121-res224-nih        # a chest x-ray backbone
  boed train-avp ... --init imagenet --init-weights densenet121-a639ec97.pth    # offline: a local copy
  torchrun --nproc-per-node 4 -m boed.cli train-avp ...   # data parallel

Training masks (paper I.4): the completion networks' free-form mixture with 25 %-width patches;
--p-full adds fully observed images (default none). --input-norm dataset standardises the tiny
net's input by the training images' pixel mean and std (with the cpu demo profile's masks and
steps: its recipe, issue 24). --init imagenet / xrv:NAME download the weights (torchvision's
weights API / torchxrayvision) unless --init-weights names a local copy.

Re-running the same command resumes from the last checkpoint. The run folder gets model/ (for
`boed evaluate --avp`; its config.json records the labels, the input normalisation and how it was
trained), metrics.jsonl, samples/, eval.json and auroc_table.txt (per-label AUROC on the full
image and after one random scan patch).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from boed.classifier import (ARCHS, AVPClassifier, AVPConfig, DEFAULT_INIT, XRV_MODELS, init_config, init_state,
                             parse_init)
from boed.train_avp import PATCH_LAYOUTS, AVPTrainConfig, AVPTrainTask, format_auroc_table, training_norm_stats
from ipa_core.seeding import seeded
from ipa_core.distributed import env_world
from ipa_core.trainer import TrainConfig, add_train_args, check_resume_settings, fit, train_config_from_args
from xray.cli_base import describe_train_flags, device_flag, finite_float
from xray.dataset import add_data_args, dataset_from_args, write_data_record
from xray.errors import UserError
from xray.io import atomic_write_text

HELP = "train the AVP-CNN classifier of partially observed images"


def _defaults():
    return TrainConfig(steps=2000, batch_size=32, lr=2e-3, warmup=100, weight_decay=1e-4, ema_rate=0.995,
                       grad_clip=100.0, skip_threshold=None, log_every=50, sample_every=500, ckpt_every=500)


def _default(cls, name: str):
    return cls.__dataclass_fields__[name].default


TRAIN_BYTES_PER_PARAM = 4 * 5  # float32 weights, gradients, two AdamW moments and the EMA copy
MEMORY_SHARE = 0.8  # of the device's memory that the parameters may take (activations and data need the rest)


def check_fits(mcfg, device: str, batch_size: int) -> None:
    """Refuse, before anything is allocated, an AVP-CNN whose parameters (and, for the tiny net, the
    pooled features of a batch) cannot be trained in this device's memory (``--pool 1000`` is 1.4
    billion parameters: the OOM killer after a minute, no message)."""
    with torch.device("meta"):  # shapes only: no memory
        n = sum(p.numel() for p in AVPClassifier(mcfg).parameters())
    need = n * TRAIN_BYTES_PER_PARAM
    if mcfg.arch == "tiny":  # the head's input, forward and backward: 8 w pool^2 floats per image
        need += 2 * 4 * batch_size * 8 * mcfg.width * mcfg.pool ** 2
    dev = torch.device(device)
    if dev.type == "cuda":
        have, where = torch.cuda.get_device_properties(dev).total_memory, f"{dev} has"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
    if need > MEMORY_SHARE * have:
        raise UserError(f"--arch {mcfg.arch} --width {mcfg.width} --pool {mcfg.pool} at {mcfg.image_size} px is {n / 1e6:,.0f} M "
                        f"parameters, about {need / 2**30:,.1f} GiB to train at batch {batch_size}; {where} {have / 2**30:,.1f} GiB; use a smaller "
                        f"--width or --pool (defaults {_default(type(mcfg), 'width')} and {_default(type(mcfg), 'pool')})")


def configure(p: argparse.ArgumentParser) -> None:
    arch = _default(AVPConfig, "arch")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (model/, checkpoints/, metrics); re-run to resume")
    p.add_argument("--arch", choices=ARCHS, default=arch, help=f"backbone (default: {arch})")
    w, pool = _default(AVPConfig, "width"), _default(AVPConfig, "pool")
    p.add_argument("--width", type=int, default=None,
                   help=f"tiny only: stem channels (default: {w} channels for --arch tiny)")
    p.add_argument("--pool", type=int, default=None,
                   help=f"tiny and encoder: pooled grid before the head, 1 = global average (default: a {pool} x {pool} grid)")
    p.add_argument("--init", default=DEFAULT_INIT, metavar="SPEC",
                   help="initial weights: scratch; imagenet (torchvision ImageNet weights, ImageNet normalisation); "
                        f"xrv:NAME (torchxrayvision chest x-ray model, NAME one of {', '.join(XRV_MODELS)}); "
                        "ipa:RUN or vae:RUN (with --arch encoder: the VD-VAE encoder of a trained IPA (its partial encoder, "
                        "which reads the same masked input) or VAE, fine-tuned; in-domain and offline); "
                        f"or an AVP model/run folder to fine-tune (default: {DEFAULT_INIT})")
    p.add_argument("--input-norm", choices=("none", "dataset"), default=_default(AVPConfig, "input_norm"),
                   help="tiny from scratch only: dataset = standardise the input by the training images' pixel mean and "
                        "std (so an unobserved pixel reads as the mean, not as black; saved in config.json); other "
                        f"inits bring their own normalisation (default: {_default(AVPConfig, 'input_norm')})")
    p.add_argument("--init-weights", default=None, metavar="FILE",
                   help="a local copy of the --init imagenet or xrv:NAME weights (a state dict); nothing is downloaded (default: none)")
    p.add_argument("--pos-weight", choices=("none", "auto"), default=_default(AVPTrainConfig, "pos_weight"),
                   help=f"auto: weight positives by negatives/positives per label (default: {_default(AVPTrainConfig, 'pos_weight')})")
    p.add_argument("--p-full", type=finite_float(0, 1), default=_default(AVPTrainConfig, "p_full"),
                   help=f"share of fully observed training images, not in the paper (default: {_default(AVPTrainConfig, 'p_full')})")
    p.add_argument("--p-freeform", type=finite_float(0, 1), default=_default(AVPTrainConfig, "p_freeform"),
                   help="share of free-form masks among the partial ones, the rest 0-5 random patches of "
                        f"{round(100 * _default(AVPTrainConfig, 'patch_frac'))}%% width (default: {_default(AVPTrainConfig, 'p_freeform')})")
    p.add_argument("--patch-layout", choices=PATCH_LAYOUTS, default=_default(AVPTrainConfig, "patch_layout"),
                   help="the partial masks' patches: uniform = centres uniform over the image (appendix I.4); scan = unions "
                        "of 0-5 distinct scan-grid patches, the masks the policies make (default: "
                        f"{_default(AVPTrainConfig, 'patch_layout')})")
    p.add_argument("--freeform-bank", type=int, default=_default(AVPTrainConfig, "freeform_bank"),
                   help="free-form masks drawn once and reused under random flips; 0 draws each fresh (slow on CPU) "
                        f"(default: {_default(AVPTrainConfig, 'freeform_bank')})")
    p.add_argument("--eval-images", type=int, default=_default(AVPTrainConfig, "eval_images"),
                   help=f"test images in the end-of-run AUROC report, 0 for none (default: {_default(AVPTrainConfig, 'eval_images')})")
    add_data_args(p)
    add_train_args(p, _defaults())
    describe_train_flags(p, {"AVP-CNN": _defaults()})


def main(args: argparse.Namespace) -> int:
    # everything is checked (and the initial weights loaded) before a file or folder is created
    args.device = device_flag(args.device)  # checked before anything is created
    if args.eval_images < 0:
        raise UserError(f"--eval-images is {args.eval_images}; expected 0 or more test images for the end-of-run AUROC report")
    tiny_only = [f"--{k} {getattr(args, k)}" for k in ("width", "pool") if getattr(args, k) is not None
                 and not (k == "pool" and args.arch == "encoder")]
    if args.arch != "tiny" and tiny_only:
        raise UserError(f"{' '.join(tiny_only)} {'shapes' if len(tiny_only) == 1 else 'shape'} the tiny network only, not --arch {args.arch}; drop them or use --arch tiny")
    if args.input_norm != "none" and (args.arch, args.init) != ("tiny", "scratch"):
        raise UserError(f"--input-norm {args.input_norm} is for --arch tiny --init scratch, got --arch {args.arch} --init "
                        f"{args.init} (that init brings its own normalisation); drop --input-norm or train the tiny net from scratch")
    args.width = _default(AVPConfig, "width") if args.width is None else args.width
    args.pool = _default(AVPConfig, "pool") if args.pool is None else args.pool
    tcfg = train_config_from_args(args, _defaults())
    init = parse_init(args.init, args.arch, args.init_weights)
    record = init.describe()
    acfg = AVPTrainConfig(p_full=args.p_full, p_freeform=args.p_freeform, freeform_bank=args.freeform_bank,
                          patch_layout=args.patch_layout,
                          pos_weight=args.pos_weight, eval_images=args.eval_images, seed=tcfg.seed,
                          init=record["init"], init_weights=init.path if init.kind in ("imagenet", "xrv") else None,
                          init_digest=record.get("init_digest"))
    mcfg = init_config(AVPConfig(arch=args.arch, image_size=args.image_size, width=args.width, pool=args.pool), init)
    check_fits(mcfg, args.device, tcfg.batch_size)
    with seeded(tcfg.seed):  # the initial weights depend on the seed alone
        model = init_state(AVPClassifier(mcfg), init)
    check_resume_settings(args.out, tcfg, env_world()[1])  # a refused resume prepares no data
    train_set = dataset_from_args(args, "train")
    test_set = dataset_from_args(args, "test")
    if args.input_norm == "dataset":  # scratch weights (checked above), built again with the training pixels' mean and std
        mcfg = replace(mcfg, input_norm="dataset", norm_stats=training_norm_stats(train_set, tcfg.seed))
        with seeded(tcfg.seed):
            model = AVPClassifier(mcfg)
    model.config.image_size = train_set.image_size
    if args.channels_last:
        model.channels_last = True
    task = AVPTrainTask(model, acfg, train_labels=getattr(train_set, "labels", None), preview=test_set)
    fit(task, train_set, tcfg, args.out, test_set=test_set if args.eval_images != 0 else None)  # 0: no report
    write_data_record(args.out, args, train_set)  # `boed run` draws its t = 1 images from the same data

    out = Path(args.out)
    eval_path = out / "eval.json"
    if eval_path.is_file():  # rank 0 only
        results = json.loads(eval_path.read_text())
        table = format_auroc_table(results, model.label_names)
        atomic_write_text(out / "auroc_table.txt", table + "\n")
        print(table)
        print(f"model: {out / 'model'}   report: {eval_path}, {out / 'auroc_table.txt'}")
    elif not (out / "model").is_dir():
        raise UserError(f"training finished without writing {out / 'model'}; see {out / 'train.log'}")
    return 0
