"""`boed train-policy`: which data it trains on."""

from __future__ import annotations

from boed.commands import train_policy
from tests.boed.evaluation.test_run import fake_data, recorded_avp, run


def test_train_policy_without_data_flags_uses_the_data_recorded_with_the_models(tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "nih")
    avp = recorded_avp(tmp_path, data="chestxray", data_root=root)
    asked = fake_data(monkeypatch, train_policy)
    code, _, err = run(["train-policy", "--method", "gdfs", "--avp", str(avp), "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "stop here" in err
    assert asked == [("chestxray", root)]  # never the default phantom set
