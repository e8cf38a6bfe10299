"""`boed evaluate` (boed.evaluation.run): which data it evaluates on, and flags refused up front."""

from __future__ import annotations

import json
import logging

import pytest

from boed.classifier import AVPClassifier, AVPConfig
from boed.cli import main
from boed.evaluation import run as eval_run
from xray.errors import UserError


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def recorded_avp(tmp_path, **rec):
    """A tiny AVP run folder whose data.json records ``rec`` (nothing when empty)."""
    avp = tmp_path / "avp"
    AVPClassifier(AVPConfig(arch="tiny", image_size=64)).save_pretrained(avp / "model")
    if rec:
        (avp / "data.json").write_text(json.dumps({"cache_dir": None, "image_size": 64, "fingerprint": "x", **rec}))
    return avp


def fake_data(monkeypatch, module):
    """Replace ``module.dataset_from_args``: record what is asked for, then stop the command."""
    asked = []

    def fake(args, split):
        asked.append((args.data, None if args.data_root is None else str(args.data_root)))
        raise UserError("stop here")

    monkeypatch.setattr(module, "dataset_from_args", fake)
    return asked


def test_evaluate_without_data_flags_uses_the_data_recorded_with_the_models(tmp_path, monkeypatch, capsys, caplog):
    root = str(tmp_path / "nih")
    avp = recorded_avp(tmp_path, data="chestxray", data_root=root)
    asked = fake_data(monkeypatch, eval_run)
    argv = ["evaluate", "--avp", str(avp), "--methods", "random", "--out", str(tmp_path / "e")]
    with caplog.at_level(logging.INFO, logger="xray.dataset"):
        code, _, err = run(argv, capsys)
    assert code == 2 and "stop here" in err
    assert asked == [("chestxray", root)]  # never the default phantom set
    assert any("boed evaluate uses the models' training data" in r.getMessage() and root in r.getMessage() for r in caplog.records)
    asked.clear()
    code, _, err = run(argv + ["--data", "phantom"], capsys)  # explicit flags win
    assert asked == [("phantom", None)]


def test_evaluate_merge_with_shard_is_refused(tmp_path, capsys):
    code, _, err = run(["evaluate", "--merge", "--shard", "0/2", "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "--merge" in err and "--shard" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists()


def test_stale_temps_of_killed_writes_are_removed_and_live_ones_spared(tmp_path):
    import os
    import time

    out = tmp_path / "ev"
    out.mkdir()
    old = out / ".metrics.csv.abc123.tmp"  # a write killed 20 minutes ago
    young = out / ".records-000-of-002.jsonl.def456.tmp"  # another shard writing now
    keep = out / "metrics.csv"
    for p in (old, young, keep):
        p.write_text("x")
    past = time.time() - 20 * 60
    os.utime(old, (past, past))
    os.utime(keep, (past, past))
    assert eval_run.remove_stale_temps(out) == [old]
    assert not old.exists() and young.exists() and keep.exists()
    assert eval_run.remove_stale_temps(tmp_path / "missing") == []
