"""The input-change harness (issue 22): change one input of a finished run, as a user would, and
rerun the same command. Every change must be refused in one line (nothing written) or recomputed,
never silently reused. Prints ``input changes detected: K of N`` (``make test-slow``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from boed.classifier import AVPClassifier, AVPConfig
from boed.evaluation.records import load_records
from ipa_core.config import get_config
from ipa_core.ipa import IPA, IPAConfig
from tests.xray.conftest import finding_for, make_nih
from xray import nih
from xray.cli_base import make_main

S = 64


def _findings(i: int) -> str:  # both classes of Effusion among the test images drawn below
    base = [x for x in finding_for(i).split("|") if x not in ("Effusion", "No Finding")]
    return "|".join(base + (["Effusion"] if i % 2 else [])) or "No Finding"


def _cli(prog: str, commands: dict, argv: list[str], capsys) -> tuple[int, str]:
    main = make_main(prog, "test", commands)
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


def _snapshot(folder: Path, pattern: str = "*") -> dict:
    """The bytes of the files under ``folder`` matching ``pattern`` (a refused command changes none)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob(pattern)) if p.is_file() and p.name != ".lock"}


RESULTS = {"ev": "records*.jsonl", "tr": "model.safetensors"}  # what a recomputation changes


def _new_data(root: Path) -> Path:
    """A small NIH-format folder whose PNGs are stored uncompressed (a file's size depends on its
    shape only, so an image can be replaced by another of exactly the same size)."""
    shutil.rmtree(root, ignore_errors=True)
    make_nih(root, n=40, px=48, findings=_findings)
    for p in nih.find_images(root).values():
        Image.open(p).save(p, format="PNG", compress_level=0)
    return root


def _swap_image_keep_mtime(path: Path) -> None:
    """Another image of the same byte size with the old mtime (cp -p, rsync -t, a restore)."""
    st = path.stat()
    img = np.asarray(Image.open(path)).copy()
    img[: img.shape[0] // 2] = 255 - img[: img.shape[0] // 2]
    Image.fromarray(img).save(path, format="PNG", compress_level=0)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def _edit_label_row(root: Path, name: str) -> None:
    csv = next(root.glob("Data_Entry_2017*.csv"))
    df = pd.read_csv(csv)
    row = df.index[df["Image Index"] == name][0]
    old = df.at[row, "Finding Labels"]
    df.at[row, "Finding Labels"] = "No Finding" if "Effusion" in old else "Effusion"
    df.to_csv(csv, index=False)


@pytest.mark.slow
def test_input_change_harness(tmp_path, capsys):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    models = tmp_path / "models"
    AVPClassifier(AVPConfig(arch="tiny", image_size=S, width=4)).save_pretrained(models / "avp-a")
    AVPClassifier(AVPConfig(arch="tiny", image_size=S, width=4)).save_pretrained(models / "avp-b")  # other weights
    vae_cfg = __import__("dataclasses").replace(get_config("tiny"), shift=-127.5, scale=1 / 64)
    IPA(IPAConfig.from_vae(vae_cfg)).save_pretrained(models / "ipa-a")
    torch.manual_seed(1)
    IPA(IPAConfig.from_vae(vae_cfg)).save_pretrained(models / "ipa-b")

    root, cache = tmp_path / "nih", tmp_path / "cache"
    data = ["--data", "chestxray", "--data-root", str(root), "--cache-dir", str(cache)]
    avp, ipa = tmp_path / "avp", tmp_path / "ipa"
    ev = ["--methods", "eig,full", "--illness", "effusion", "--scans", "2", "--n-test", "6", "--n-samples", "2",
          "--repeats", "1", "--n-boot", "10", "--batch-size", "2", "--no-progress",
          "--avp", str(avp), "--ipa", str(ipa), "--out", str(tmp_path / "ev"), *data]
    tr = ["--image-size", str(S), "--width", "4", "--steps", "2", "--batch-size", "4", "--log-every", "1",
          "--ckpt-every", "1", "--sample-every", "100", "--freeform-bank", "4", "--eval-images", "0",
          "--out", str(tmp_path / "tr"), *data]

    def evaluate(extra=()):
        return _cli("boed", {"evaluate": "boed.commands.evaluate"}, ["evaluate", *ev, *extra], capsys)

    def train(extra=()):
        return _cli("boed", {"train-avp": "boed.commands.train_avp"}, ["train-avp", *tr, *extra], capsys)

    def verify():
        code, err = _cli("xray", {"prepare": "xray.commands.prepare"},
                         ["prepare", "--root", str(root), "--size", str(S), "--cache-dir", str(cache), "--verify",
                          "--workers", "0", "--no-progress"], capsys)
        assert code == 0, err

    def fresh() -> None:
        """The finished runs every case starts from: data, cache, models, an evaluation, a training."""
        for p in (cache, avp, ipa, tmp_path / "ev", tmp_path / "tr"):
            shutil.rmtree(p, ignore_errors=True)
        _new_data(root)
        shutil.copytree(models / "avp-a", avp)
        shutil.copytree(models / "ipa-a", ipa)
        for run in (evaluate, train):
            code, err = run()
            assert code == 0, err

    def test_image(k: int = 0) -> str:
        from xray.dataset import open_dataset

        ds = open_dataset("chestxray", data_root=root, size=S, split="test", cache_dir=cache, workers=0, progress=False)
        return ds.names[sorted({r["index"] for r in load_records(tmp_path / "ev")})[k]]

    def train_image() -> str:
        from xray.dataset import open_dataset

        return open_dataset("chestxray", data_root=root, size=S, split="train", cache_dir=cache, workers=0,
                            progress=False).names[0]

    def replace_folder(src: Path, dst: Path) -> None:
        shutil.rmtree(dst)
        shutil.copytree(src, dst)

    def replace_weights_only(src: Path, dst: Path) -> None:
        shutil.copyfile(src / "model.safetensors", dst / "model.safetensors")  # digest.json not updated

    def edit_image_size(dst: Path) -> None:
        import json

        cfg = json.loads((dst / "config.json").read_text())
        cfg["image_size"] = 32
        (dst / "config.json").write_text(json.dumps(cfg))

    # (what changed, which command reruns, flags added, a change made to the files first)
    cases = [
        ("evaluate --seed", evaluate, ["--seed", "1"], None),
        ("evaluate --rng", evaluate, ["--rng", "batch"], None),
        ("evaluate --batch-size", evaluate, ["--batch-size", "3"], None),
        ("evaluate --n-samples", evaluate, ["--n-samples", "3"], None),
        ("evaluate --temperature", evaluate, ["--temperature", "0.5"], None),
        ("evaluate --scans", evaluate, ["--scans", "3"], None),
        ("evaluate --repeats", evaluate, ["--repeats", "2"], None),
        ("evaluate --n-test", evaluate, ["--n-test", "8"], None),
        ("evaluate: AVP retrained in place (another model folder)", evaluate, [], lambda: replace_folder(models / "avp-b", avp)),
        ("evaluate: IPA retrained in place (another model folder)", evaluate, [], lambda: replace_folder(models / "ipa-b", ipa)),
        ("evaluate: AVP weights file replaced alone", evaluate, [], lambda: replace_weights_only(models / "avp-b", avp)),
        ("evaluate: AVP config.json image_size edited", evaluate, [], lambda: edit_image_size(avp)),
        ("evaluate: test image replaced (same size, mtime kept), then xray prepare --verify", evaluate, [],
         lambda: (_swap_image_keep_mtime(nih.find_images(root)[test_image()]), verify())),
        ("evaluate: label CSV row of a test image changed", evaluate, [], lambda: _edit_label_row(root, test_image())),
        ("train-avp --seed", train, ["--seed", "3"], None),
        ("train-avp --lr", train, ["--lr", "0.01"], None),
        ("train-avp --batch-size", train, ["--batch-size", "2"], None),
        ("train-avp --width (model config)", train, ["--width", "8"], None),
        ("train-avp --steps lower than trained", train, ["--steps", "1"], None),
        ("train-avp: training image replaced (same size, mtime kept), then xray prepare --verify", train, [],
         lambda: (_swap_image_keep_mtime(nih.find_images(root)[train_image()]), verify())),
        ("train-avp: label CSV row of a training image changed", train, [], lambda: _edit_label_row(root, train_image())),
    ]
    def outcome(command, extra) -> tuple[str, int, str]:
        name = "ev" if command is evaluate else "tr"
        before, results = _snapshot(tmp_path / name), _snapshot(tmp_path / name, RESULTS[name])
        code, err = command(extra)
        if code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and _snapshot(tmp_path / name) == before:
            return "refused", code, err
        if code == 0 and "Traceback" not in err and _snapshot(tmp_path / name, RESULTS[name]) != results:
            return "recomputed", code, err
        return "reused", code, err

    fresh()
    for command in (evaluate, train):  # the control: the same command again reuses the finished run
        assert outcome(command, [])[0] == "reused"
    missed, dirty = [], False
    for what, command, extra, change in cases:
        if change is not None or dirty:
            fresh()  # a change to files is undone by starting from a fresh finished run
        dirty = change is not None
        if change is not None:
            change()
        got, code, err = outcome(command, extra)
        if got == "reused":
            missed.append(f"{what} (exit {code}: {err.strip()[-200:]!r})")
    with capsys.disabled():
        print(f"\ninput changes detected: {len(cases) - len(missed)} of {len(cases)}"
              + "".join(f"\n  missed: {m}" for m in missed))
    assert not missed, missed
