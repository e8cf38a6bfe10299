"""Choose where to scan one x-ray by expected information gain (greedy BOED with IPA completions).

At each step the IPA model samples N completions of what has been scanned so far (at t = 1 the N
images are drawn from the training set, as in the paper), the AVP classifier scores every candidate
patch of the G x G grid, and the patch with the largest EIG is scanned. Prints each choice with its
grid cell, pixel box, EIG and the classifier probability after the scan, and writes one figure per
scan (observations, EIG heatmap with a red x, completions with their information-gain maps) plus a
summary figure and scans.json into --out.

The t = 1 completions (and --index images) come from the data the models were trained on, as
recorded in their run folders (data.json); --data / --data-root override it, and models that
record nothing need --data-root (or --first-draws ipa with --image).

examples:
  boed run --illness effusion --scans 5 --index 3
  boed run --illness "no finding" --image patient.dcm --ipa runs/demo/ipa --avp runs/demo/avp --out runs/scan1
"""

from __future__ import annotations

import argparse
import logging
import shlex
import warnings
from pathlib import Path

import torch

from boed.amortised.run import run_policy
from boed.classifier import AVPClassifier
from boed.geometry import ScanGeometry
from boed.heatmaps import plot_decision, scan_out_dir
from boed.policies import GreedyPolicy
from boed.samplers import DatasetSampler, IPASampler
from boed.scan_loop import Decision, scan_image
from ipa_core.ipa import IPA
from ipa_core.persist import model_digest
from ipa_core.trainer import DAMAGED, check_finite_weights
from xray.cli_base import MAX_TEMPERATURE, add_device_arg, finite_float, parse_device
from xray.cache import resize_square
from xray.dataset import add_data_args, dataset_from_args, models_data, models_data_help, same_data, use_models_data
from xray.errors import UserError
from xray.imageio import read_image
from xray.io import atomic_write_json
from xray.labels import resolve_illness

HELP = "choose scan locations for one image by EIG (greedy BOED with IPA completions)"
DEFAULT_IPA = "runs/demo/ipa"
DEFAULT_AVP = "runs/demo/avp"
MIN_N_SAMPLES, MAX_N_SAMPLES = 2, 1000  # one completion gives EIG 0 everywhere; a million fills any memory
log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--illness", default="effusion", help="target: a pathology, 'any finding' or 'no finding' (default: effusion)")
    parser.add_argument("--scans", type=int, default=5, help="number of patches to scan, T (default: 5)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--image", metavar="FILE", help="a PNG or DICOM x-ray (resized to the models' size)")
    src.add_argument("--index", type=int, metavar="I", help="image I of the test split of --data (default: image 0 when --image is not given)")
    parser.add_argument("--ipa", default=DEFAULT_IPA, metavar="DIR", help=f"IPA model or run dir (default: {DEFAULT_IPA})")
    parser.add_argument("--avp", default=DEFAULT_AVP, metavar="DIR", help=f"AVP classifier model or run dir (default: {DEFAULT_AVP})")
    parser.add_argument("--n-samples", type=int, default=10, help=f"completions N per decision, {MIN_N_SAMPLES} to {MAX_N_SAMPLES} (default: 10)")
    parser.add_argument("--estimator", choices=("eig", "epe"), default="eig", help="eig: scan where the expected information gain is largest (the paper); epe: where the expected posterior entropy is smallest (default: eig)")
    parser.add_argument("--temperature", type=finite_float(0, MAX_TEMPERATURE, lo_open=True), default=1.0, help="IPA sampling temperature: scales the spread of the random latent draws, 1 = as trained (default: 1.0)")
    parser.add_argument("--first-draws", choices=("dataset", "ipa"), default="dataset",
                        help="t = 1 completions: images of the train split of --data (paper) or IPA samples given nothing "
                             "(no data needed) (default: dataset)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", metavar="DIR", default=None, help="output folder (default: runs/scan-ILLNESS-SOURCE, e.g. runs/scan-effusion-test0)")
    add_device_arg(parser)
    parser.add_argument("--chunk-size", type=int, default=None, help="classifier inputs per forward pass (default: 2048 on CUDA, 256 on CPU)")
    parser.add_argument("--show", type=int, default=5, help="completions shown per figure (default: 5)")
    parser.add_argument("--no-figures", action="store_true", help="print and save scans.json only")
    parser.add_argument("--policy", metavar="RUN_POL", default=None,
                        help="scan with an amortised policy from `boed train-policy` instead of greedy EIG-IPA; its "
                             "probability maps are drawn beside EIG-IPA's EIG maps when --ipa holds a model (default: none: greedy EIG-IPA)")
    add_data_args(parser)
    parser.set_defaults(image_size=None)  # the models decide S unless --image-size is given
    parser._option_string_actions["--image-size"].help = "image side in pixels (default: the models' size)"
    parser.set_defaults(data=None)  # None: the data recorded in the model runs
    parser._option_string_actions["--data"].help = models_data_help()


def _image_size_of(model) -> int | None:
    for obj in (model, getattr(model, "config", None), getattr(getattr(model, "vae", None), "config", None)):
        s = getattr(obj, "image_size", None)
        if isinstance(s, int):
            return s
    return None


def _require_model_dir(path: str, default: str, what: str, make: str) -> Path:
    p = Path(path)
    if (p / "config.json").is_file() or (p / "model" / "config.json").is_file():
        return p
    hint = "run `boed demo` (it writes runs/demo/ipa and runs/demo/avp)" if path == default else f"train one with `{make}`"
    raise UserError(f"no {what} model at {p} (no config.json there or in {p / 'model'}); {hint} or pass --{what.lower()} DIR")


def load_models(ipa_path: str, avp_path: str, device: torch.device):
    """``(ipa, avp, S)``; one-line errors for missing models or different image sizes."""
    avp_dir = _require_model_dir(avp_path, DEFAULT_AVP, "AVP", f"boed train-avp --out {shlex.quote(str(avp_path))}")
    ipa_dir = _require_model_dir(ipa_path, DEFAULT_IPA, "IPA", f"ipa_core train --stage ipa --vae VAE_RUN --out {shlex.quote(str(ipa_path))}")

    avp = AVPClassifier.from_pretrained(avp_dir, map_location=device).eval()
    ipa = IPA.from_pretrained(ipa_dir, map_location=device).eval()
    check_finite_weights(avp, f"the AVP model in {avp_dir}", DAMAGED)
    check_finite_weights(ipa, f"the IPA model in {ipa_dir}", DAMAGED)
    s_avp, s_ipa = avp.config.image_size, _image_size_of(ipa)
    if s_ipa is not None and s_ipa != s_avp:
        raise UserError(f"the IPA model ({ipa_dir}) works at {s_ipa} px but the AVP classifier ({avp_dir}) at {s_avp} px; "
                        "use models trained at the same --image-size")
    return ipa, avp, s_avp


def resolve_data_args(args, needs_data: bool) -> dict | None:
    """Fill ``args.data``/``data_root``/``cache_dir`` by the one data rule
    (:func:`xray.dataset.use_models_data`): explicit --data/--data-root win, else the models' record;
    with neither and data needed, a one-line error. Returns the models' record."""
    models = {"IPA": args.ipa, "AVP": args.avp}
    if not needs_data and args.data is None and args.data_root is None:
        return models_data(models)[0]
    return use_models_data(args, models, "boed run", required=True)


def check_fingerprint(train_set, rec: dict | None) -> None:
    """Warn when the t = 1 draws come from other data than the models recorded."""
    want = (rec or {}).get("fingerprint")
    have = getattr(train_set, "fingerprint", None)
    if want and have and want != have:
        warnings.warn(f"the train split used for the t = 1 draws (fingerprint {have}) is not the one the models "
                      f"were trained on ({want}); pass the --data-root they were trained on", stacklevel=2)


def load_image(args, S: int, channels: int):
    """``(x uint8 (1, C, S, S), label row or None, source name)`` from --image or --index."""
    if args.image is not None:
        arr = resize_square(read_image(args.image), S)  # uint8 (S, S)
        x = torch.from_numpy(arr.copy())[None, None]  # (1, 1, S, S)
        labels, source = None, Path(args.image).stem
    else:
        index = 0 if args.index is None else args.index
        test = _dataset(args, S, "test")
        if not 0 <= index < len(test):
            raise UserError(f"--index {index} is outside the test split (0..{len(test) - 1})")
        x = test.get_batch([index])  # (1, 1, S, S)
        labels, source = test.labels[index], f"test{index}"
        if x.shape[-1] != S:
            raise UserError(f"test images are {x.shape[-1]} px but the models work at {S} px; pass --image-size {S}")
    if channels != x.shape[1]:
        x = x.expand(1, channels, S, S).contiguous()  # gray -> the classifier's channel count
    return x, labels, source


def _dataset(args, S: int, split: str):
    if args.image_size is None:
        args.image_size = S
    elif args.image_size != S:
        raise UserError(f"--image-size {args.image_size} differs from the models' {S} px; drop the flag or use matching models")
    return dataset_from_args(args, split)


def check_run_flags(args: argparse.Namespace) -> None:
    """The numeric flags, before any model is loaded or anything computed (one line each)."""
    if not MIN_N_SAMPLES <= args.n_samples <= MAX_N_SAMPLES:
        raise UserError(f"--n-samples is {args.n_samples}; expected {MIN_N_SAMPLES} to {MAX_N_SAMPLES} completions per decision "
                        "(with one completion the EIG is 0 everywhere; the paper uses 10)")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise UserError(f"--chunk-size is {args.chunk_size}; expected at least 1 classifier input per pass (or leave it out)")
    if args.show < 0:
        raise UserError(f"--show is {args.show}; expected 0 or more completions per figure")


def main(args: argparse.Namespace) -> int:
    illness = resolve_illness(args.illness)
    check_run_flags(args)
    device = parse_device(args.device)
    if args.policy is not None:  # amortised policy (boed train-policy)
        return _run_policy(args, illness, device)
    ipa, avp, S = load_models(args.ipa, args.avp, device)
    geometry = ScanGeometry(S)
    if not 1 <= args.scans <= geometry.num_locations:
        raise UserError(f"--scans must be in 1..{geometry.num_locations} (the {geometry.grid}x{geometry.grid} grid), got {args.scans}")
    C = avp.config.in_channels
    if args.image is not None:  # a file: checked before the data it needs no part of
        x, labels, source = load_image(args, S, C)
    rec = resolve_data_args(args, needs_data=args.first_draws == "dataset" or args.image is None)
    if args.image is None:  # --index: an image of the (recorded) test split
        x, labels, source = load_image(args, S, C)
    x = x.to(device)
    first_sampler = None
    if args.first_draws == "dataset":
        train = _dataset(args, S, "train")
        if rec is not None and same_data(args, rec):  # other data given: warned already
            check_fingerprint(train, rec)
        first_sampler = DatasetSampler(train)
    out = scan_out_dir(args.out or Path("runs") / f"scan-{illness.slug}-{source}", args.data_root)  # after every check
    sampler = IPASampler(ipa, temperature=args.temperature)
    policy = GreedyPolicy(avp, sampler, illness, geometry, n_samples=args.n_samples, estimator=args.estimator,
                          first_sampler=first_sampler, chunk_size=args.chunk_size, device=device)
    generator = torch.Generator().manual_seed(args.seed)

    def decide(t: int, state) -> Decision:
        res = policy.score(state, generator, sampler=first_sampler if (t == 1 and first_sampler is not None) else None)
        if not bool(torch.isfinite(res.eig).all()):
            raise UserError(f"scan {t}: the models give a non-finite EIG; the model files {args.ipa}, {args.avp} "
                            "are damaged or diverged; nothing more is saved")
        loc = int(res.choose(args.estimator, generator)[0])  # ties: a uniform pick
        row, col = divmod(loc, geometry.grid)
        top, left, bottom, right = geometry.box(loc)
        gain, post = float(res.eig[0, loc]), float(res.epe[0, loc])

        def plot(path, state, new):
            plot_decision(path, geometry, state.x_obs[0], state.mask[0], res.eig[0], res.info_gain[0], res.samples[0],
                          loc, new.x_obs[0], new.mask[0], state.locations[0],
                          title=f"{illness.name}, scan {t}: location {loc} (row {row}, col {col}), EIG {gain:.3g} nats"
                          + (f", chosen by min EPE ({post:.3g} nats)" if args.estimator == "epe" else ""),
                          n_show=args.show)

        return Decision(loc, fields=dict(eig=gain, epe=post), value=gain, plot=plot,
                        text=f"pixels y {top}:{bottom}, x {left}:{right}  EIG {gain:.4g} nats"
                        + (f"  EPE {post:.4g} nats" if args.estimator == "epe" else ""))

    result = scan_image(x, labels, avp, illness, geometry, args.scans, decide, None if args.no_figures else out, device,
                        source, f"{geometry.grid}x{geometry.grid} grid, patch {geometry.patch_size} px, "
                        f"N = {args.n_samples}, estimator {args.estimator}", models=f"the model files {args.ipa}, {args.avp}")
    probs, steps, target, locations = result.probs, result.steps, result.target, result.state.locations[0]
    atomic_write_json(out / "scans.json", dict(
        illness=illness.name, source=str(args.image) if args.image else source, target=target,
        estimator=args.estimator, n_samples=args.n_samples, seed=args.seed, first_draws=args.first_draws,
        geometry=geometry.to_dict(), prob_before=probs[0], steps=steps, locations=locations,
        ipa=str(args.ipa), avp=str(args.avp), temperature=args.temperature,
        models={"ipa": model_digest(args.ipa), "avp": model_digest(args.avp)},
        data=None if args.data is None else {"data": args.data, "data_root": None if args.data_root is None else str(args.data_root),
                                             "recorded": rec}))
    print(f"wrote {out / 'scans.json'}" + ("" if args.no_figures else f", {out}/step_*.png and {out / 'summary.png'}"))
    return 0


def _run_policy(args, illness, device: torch.device) -> int:
    """`--policy RUN_POL`: the amortised policy chooses every scan; greedy EIG-IPA's EIG map of the
    same state is drawn beside it when an IPA model is available at --ipa."""
    ipa_here = any((Path(args.ipa) / sub / "config.json").is_file() for sub in ("", "model"))
    if ipa_here:
        ipa, avp, S = load_models(args.ipa, args.avp, device)
    else:
        avp_dir = _require_model_dir(args.avp, DEFAULT_AVP, "AVP", f"boed train-avp --out {shlex.quote(str(args.avp))}")
        avp, ipa = AVPClassifier.from_pretrained(avp_dir, map_location=device).eval(), None
        S = avp.config.image_size
    geometry = ScanGeometry(S)
    if not 1 <= args.scans <= geometry.num_locations:
        raise UserError(f"--scans must be in 1..{geometry.num_locations} (the {geometry.grid}x{geometry.grid} grid), got {args.scans}")
    x, labels, source = load_image(args, S, avp.config.in_channels)
    first_sampler = DatasetSampler(_dataset(args, S, "train")) if ipa is not None and args.first_draws == "dataset" else None
    return run_policy(args, args.policy, avp, ipa, x.to(device), labels, source, illness, device, first_sampler)
