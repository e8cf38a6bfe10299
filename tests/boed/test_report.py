import csv
import math

import numpy as np
import pytest

from boed.report import CSV_COLUMNS, PAIRED_COLUMNS, cross_task_rows, format_table, metric_rows, paired_rows, write_report
from xray.labels import LABELS

EFF, ANY = LABELS.index("Effusion"), LABELS.index("Any Finding")


def _records(n=40, T=2, seed=0):
    """eig-ipa: perfect Effusion ranking from t = 1 on; random: p = 0.5 always; full: reversed ranking.

    eig-ipa is also scanned for "No Finding" with locations that rank it perfectly.
    """
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        y = rng.integers(0, 2, 15).tolist()
        y[EFF] = i % 2
        y[ANY] = (i // 2) % 2
        for method, task in (("eig-ipa", "Effusion"), ("eig-ipa", "No Finding"), ("random", None), ("full", None)):
            probs = []
            for t in range(T + 1):
                p = [0.5] * 15
                if method == "eig-ipa" and t > 0:
                    p[EFF] = 0.2 + 0.6 * y[EFF] if task == "Effusion" else 0.5
                    p[ANY] = 0.3 + 0.4 * y[ANY] if task == "No Finding" else 0.5
                if method == "full":
                    p[EFF] = 0.8 - 0.6 * y[EFF]
                probs.append(p)
            recs.append({"method": method, "task": task, "index": i, "locations": [], "probs": probs, "labels": y})
    return recs


def test_metric_rows_known_answers():
    rows = metric_rows(_records(), ["effusion"], scans=2, n_boot=200)
    get = {(r["method"], r["t"]): r for r in rows}
    assert [r["method"] for r in rows[::3]] == ["eig-ipa", "random", "full"]  # paper legend order
    assert get["eig-ipa", 0]["auroc"] == 0.5 and get["eig-ipa", 0]["nll"] == pytest.approx(math.log(2))
    assert get["eig-ipa", 2]["auroc"] == 1.0 and get["eig-ipa", 2]["auroc_lo"] == 1.0
    assert get["eig-ipa", 2]["nll"] == pytest.approx(-math.log(0.8))
    assert get["random", 1]["auroc"] == 0.5
    assert get["full", 0]["auroc"] == 0.0 and get["full", 2]["n"] == 40
    for r in rows:
        assert r["auroc_lo"] <= r["auroc"] <= r["auroc_hi"]


def test_no_finding_is_negated_any_finding():
    rows = metric_rows(_records(), ["no finding"], scans=2, n_boot=0)
    r = next(r for r in rows if r["method"] == "eig-ipa" and r["t"] == 2)
    assert r["illness"] == "No Finding" and r["auroc"] == 1.0  # 1 - p(any) ranks 1 - y(any) perfectly
    assert r["nll"] == pytest.approx(-math.log(0.7))


def test_cross_task_rows():
    rows = cross_task_rows(_records(), ["effusion", "no finding"], scans=2, n_boot=0)
    assert {r["method"] for r in rows} == {"eig-ipa"}  # task-free methods have no matrix
    m = {(r["scan_task"], r["score_task"]): r["auroc"] for r in rows}
    assert m["Effusion", "Effusion"] == 1.0 and m["No Finding", "No Finding"] == 1.0
    assert m["Effusion", "No Finding"] == 0.5 and m["No Finding", "Effusion"] == 0.5


def test_paired_rows_match_the_marginal_differences():
    recs = _records()
    marg = {(r["method"], r["t"]): r["auroc"] for r in metric_rows(recs, ["effusion"], scans=2, n_boot=0)}
    rows = paired_rows(recs, ["effusion"], scans=2, n_boot=200)
    assert [(r["baseline"], r["t"]) for r in rows] == [("random", 1), ("random", 2), ("random", "1-2"),
                                                       ("full", 1), ("full", 2), ("full", "1-2")]
    get = {(r["baseline"], r["t"]): r for r in rows}
    for base in ("random", "full"):
        for t in (1, 2):
            assert get[base, t]["diff"] == pytest.approx(marg["eig-ipa", t] - marg[base, t])
        mean = np.mean([marg["eig-ipa", t] - marg[base, t] for t in (1, 2)])
        assert get[base, "1-2"]["diff"] == pytest.approx(mean)
    assert get["full", 2]["diff"] == 1.0 and get["full", 2]["p_above"] == 1.0  # perfect vs reversed ranking
    assert get["random", 1]["diff_lo"] == get["random", 1]["diff_hi"] == 0.5  # every resample: 1.0 - 0.5
    # only images both methods scored are compared
    fewer = [r for r in recs if not (r["method"] == "random" and r["index"] >= 20)]
    assert {r["n"] for r in paired_rows(fewer, ["effusion"], 2, n_boot=0) if r["baseline"] == "random"} == {20}


def test_write_report_files(tmp_path):
    rows = write_report(tmp_path, _records(), ["effusion", "no finding"], scans=2, n_boot=100, cross_task=True)
    with open(tmp_path / "metrics.csv") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == CSV_COLUMNS
    assert len(table) - 1 == len(rows) == 2 * 3 * 3  # tasks x methods x (T + 1)
    assert {row[0] for row in table[1:]} == {"eig-ipa", "random", "full"}
    with open(tmp_path / "paired.csv") as f:
        paired = list(csv.reader(f))
    assert tuple(paired[0]) == PAIRED_COLUMNS and len(paired) - 1 == 2 * 2 * 3  # tasks x baselines x (T + mean)
    for name in ("auroc.png", "nll.png", "paired.png", "cross_task_eig-ipa.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "cross_task.csv").read_text().startswith("method,scan_task,score_task,t,")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
    assert "eig-ipa" in format_table(rows, t=2)


def test_bootstrap_is_deterministic():
    a = metric_rows(_records(seed=1), ["effusion"], scans=1, n_boot=100, seed=5)
    b = metric_rows(_records(seed=1), ["effusion"], scans=1, n_boot=100, seed=5)
    assert a == b
