"""The README's Python example runs as written (on tiny untrained models in a temp folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(section: str) -> str:
    """The first ```python fenced block under the ``## <section>`` heading of README.md."""
    text = README.read_text()
    m = re.search(rf"^## {re.escape(section)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, f"README has no '## {section}' section"
    block = re.search(r"^```python\n(.*?)^```", m.group(1), flags=re.M | re.S)
    assert block, f"README section '{section}' has no python block"
    return block.group(1)


def test_python_api_snippet_runs(tmp_path, monkeypatch, capsys):
    from boed import AVPClassifier, AVPConfig
    from ipa_core import IPA, get_config
    from tests.xray.conftest import make_nih

    torch.manual_seed(0)
    torch.set_num_threads(1)
    import dataclasses

    cfg = dataclasses.replace(get_config("tiny"), shift=-128.0, scale=1 / 64)  # training sets these from the data
    S = cfg.image_size
    # the files the walk-through makes: an NIH-format folder and two trained runs (here: untrained)
    make_nih(tmp_path / "data" / "phantom", n=24, px=S)
    IPA(cfg).save_pretrained(tmp_path / "runs" / "ipa" / "model")
    AVPClassifier(AVPConfig(arch="tiny", image_size=S)).save_pretrained(tmp_path / "runs" / "avp" / "model")
    monkeypatch.chdir(tmp_path)

    code = python_block("Python API").replace("n_samples=10", "n_samples=2")  # same code, fewer completions
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})

    lines = capsys.readouterr().out.strip().splitlines()
    steps = [re.fullmatch(r"t=(\d): location (\d+) \(pixels .*\), EIG (-?[\d.]+) nats, p\(Effusion\) = ([\d.]+)", l) for l in lines[:3]]
    assert all(steps), lines
    assert [int(m.group(1)) for m in steps] == [1, 2, 3]
    locs = [int(m.group(2)) for m in steps]
    assert len(set(locs)) == 3 and all(0 <= l < 17 * 17 for l in locs)  # three different scans on the grid
    assert all(float(m.group(3)) >= -1e-6 and 0 <= float(m.group(4)) <= 1 for m in steps)
    assert re.fullmatch(r"label: [01]", lines[3])


def test_snippet_only_uses_public_names():
    import boed
    import ipa_core

    code = python_block("Python API")
    for mod, pkg in (("boed", boed), ("ipa_core", ipa_core)):
        for line in re.findall(rf"^from {mod} import (.+)$", code, flags=re.M):
            for name in (n.strip() for n in line.split(",")):
                assert name in pkg.__all__ and getattr(pkg, name) is not None
    assert set(boed.__all__) <= set(dir(boed))
    with pytest.raises(AttributeError):
        boed.not_a_name  # noqa: B018
