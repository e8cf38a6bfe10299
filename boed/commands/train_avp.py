"""Train the AVP-CNN g(v | y) on partially observed x-rays (15 sigmoid outputs, BCE).

Examples:
  boed train-avp --out runs/demo/avp                     # tiny CNN on the phantom set at 64 px
  boed train-avp --data chestxray --data-root /data/nih --image-size 256 --arch densenet121 \\
      --init densenet121_imagenet.pth --lr 1e-5 --batch-size 32 --steps 32000 --device cuda --out runs/avp256
  torchrun --nproc-per-node 4 -m boed.cli train-avp ...   # data parallel

Re-running the same command resumes from the last checkpoint. The run folder gets model/ (for
`boed evaluate --avp`), metrics.jsonl, samples/, eval.json and auroc_table.txt (per-label AUROC on
the full image and after one random scan patch).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xray.cli_base import describe_train_flags, device_flag
from xray.errors import UserError

HELP = "train the AVP-CNN classifier of partially observed images"


def _defaults():
    from ipa_core.trainer import TrainConfig

    return TrainConfig(steps=2000, batch_size=32, lr=2e-3, warmup=100, weight_decay=1e-4, ema_rate=0.995,
                       grad_clip=100.0, skip_threshold=None, log_every=50, sample_every=500, ckpt_every=500)


def configure(p: argparse.ArgumentParser) -> None:
    from ipa_core.trainer import add_train_args
    from xray.dataset import add_data_args

    from boed.classifier import ARCHS

    p.add_argument("--out", required=True, metavar="DIR", help="run folder (model/, checkpoints/, metrics); re-run to resume")
    p.add_argument("--arch", choices=ARCHS, default="tiny", help="backbone (default: tiny, the fast CPU CNN)")
    p.add_argument("--width", type=int, default=12, help="tiny only: stem channels (default: 12)")
    p.add_argument("--pool", type=int, default=4, help="tiny only: pooled grid before the head, 1 = global average (default: 4)")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="start from local weights: a torchvision state-dict file of --arch (its first layer is widened for the "
                        "mask channel), or an AVP model/run folder (default: none: random initial weights)")
    p.add_argument("--pos-weight", choices=("none", "auto"), default="none",
                   help="auto: weight positives by negatives/positives per label (default: none)")
    p.add_argument("--p-full", type=float, default=0.2, help="fraction of fully observed training images (default: 0.2)")
    p.add_argument("--p-freeform", type=float, default=0.0, help="fraction of IPA-style free-form masks (default: 0)")
    p.add_argument("--eval-images", type=int, default=5000, help="test images in the end-of-run AUROC report (default: 5000)")
    add_data_args(p)
    add_train_args(p, _defaults())
    describe_train_flags(p, {"AVP-CNN": _defaults()})


def main(args: argparse.Namespace) -> int:
    from ipa_core.trainer import fit, train_config_from_args
    from xray.dataset import dataset_from_args
    from xray.io import atomic_write_text

    from boed.classifier import AVPClassifier, AVPConfig, load_init
    from boed.train_avp import AVPTrainConfig, AVPTrainTask, format_auroc_table

    args.device = device_flag(args.device)  # checked before anything is created
    tcfg = train_config_from_args(args, _defaults())
    acfg = AVPTrainConfig(p_full=args.p_full, p_freeform=args.p_freeform, pos_weight=args.pos_weight,
                          eval_images=args.eval_images, seed=tcfg.seed)
    train_set = dataset_from_args(args, "train")
    test_set = dataset_from_args(args, "test")
    model = AVPClassifier(AVPConfig(arch=args.arch, image_size=train_set.image_size, width=args.width, pool=args.pool))
    if args.init is not None:
        load_init(model, args.init)
    if args.channels_last:
        model.channels_last = True
    task = AVPTrainTask(model, acfg, train_labels=getattr(train_set, "labels", None), preview=test_set)
    fit(task, train_set, tcfg, args.out, test_set=test_set)

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
