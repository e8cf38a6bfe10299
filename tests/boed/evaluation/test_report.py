import csv
import math

import numpy as np
import pytest

from boed.evaluation.report import (CSV_COLUMNS, PAIRED_COLUMNS, capture_rows, cross_task_rows, format_table, metric_rows,
                                    paired_rows, write_report)
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
    recs = _records(T=3)
    marg = {(r["method"], r["t"]): r["auroc"] for r in metric_rows(recs, ["effusion"], scans=3, n_boot=0)}
    rows = paired_rows(recs, ["effusion"], scans=3, n_boot=200)
    assert [(r["baseline"], r["t"]) for r in rows] == [("random", 1), ("random", 2), ("random", 3), ("random", "2-3"),
                                                       ("full", 1), ("full", 2), ("full", 3), ("full", "2-3")]
    get = {(r["baseline"], r["t"]): r for r in rows}
    for base in ("random", "full"):
        for t in (1, 2, 3):
            assert get[base, t]["diff"] == pytest.approx(marg["eig-ipa", t] - marg[base, t])
        mean = np.mean([marg["eig-ipa", t] - marg[base, t] for t in (2, 3)])  # t = 1 left out of the average
        assert get[base, "2-3"]["diff"] == pytest.approx(mean)
    assert get["full", 2]["diff"] == 1.0 and get["full", 2]["p_above"] == 1.0  # perfect vs reversed ranking
    assert get["random", 1]["diff_lo"] == get["random", 1]["diff_hi"] == 0.5  # every resample: 1.0 - 0.5
    # only images both methods scored are compared
    fewer = [r for r in recs if not (r["method"] == "random" and r["index"] >= 20)]
    assert {r["n"] for r in paired_rows(fewer, ["effusion"], 3, n_boot=0) if r["baseline"] == "random"} == {20}
    assert "2-" not in str([r["t"] for r in paired_rows(recs, ["effusion"], 1, n_boot=0)])  # T = 1: no average row


def _repeated(recs, R, perfect_in=(0,)):
    """``recs`` copied into R repeats; eig-ipa ranks Effusion perfectly only in the repeats ``perfect_in``
    (p = 0.5 elsewhere); full stays repeat-free (repeat None)."""
    out = []
    for r in recs:
        if r["method"] == "full":
            out.append({**r, "repeat": None})
            continue
        for k in range(R):
            rec = {**r, "repeat": k, "probs": [list(p) for p in r["probs"]]}
            if r["method"] == "eig-ipa" and k not in perfect_in:
                for p in rec["probs"]:
                    p[EFF] = 0.5
            out.append(rec)
    return out


def test_repeats_mean_spread_and_repeat_free_methods():
    recs = _repeated(_records(), R=2, perfect_in=(0,))
    rows = {(r["method"], r["t"]): r for r in metric_rows(recs, ["effusion"], scans=2, n_boot=400)}
    e = rows["eig-ipa", 2]
    assert e["repeats"] == 2 and e["auroc"] == pytest.approx(0.75)  # mean of 1.0 and 0.5
    assert e["auroc_sd_repeats"] == pytest.approx(np.std([1.0, 0.5], ddof=1))
    assert e["auroc_lo"] == 0.5 and e["auroc_hi"] == 1.0  # resampled repeats: both 0.5 or both 1.0 happen
    f = rows["full", 2]
    assert f["repeats"] == 1 and f["auroc"] == 0.0 and math.isnan(f["auroc_sd_repeats"])
    paired = {(r["baseline"], r["t"]): r for r in paired_rows(recs, ["effusion"], 2, n_boot=400)}
    assert paired["full", 2]["repeats"] == 2 and paired["full", 2]["diff"] == pytest.approx(0.75 - 0.0)  # full broadcast
    assert paired["random", 2]["diff_sd_repeats"] == pytest.approx(np.std([0.5, 0.0], ddof=1))


def test_write_report_files(tmp_path):
    rows = write_report(tmp_path, _records(), ["effusion", "no finding"], scans=2, n_boot=100, cross_task=True)
    with open(tmp_path / "metrics.csv") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == CSV_COLUMNS
    assert len(table) - 1 == len(rows) == 2 * 3 * 3  # tasks x methods x (T + 1)
    assert {row[0] for row in table[1:]} == {"eig-ipa", "random", "full"}
    with open(tmp_path / "paired.csv") as f:
        paired = list(csv.reader(f))
    assert tuple(paired[0]) == PAIRED_COLUMNS and len(paired) - 1 == 2 * 2 * 3  # tasks x baselines x (T + mean over 2..T)
    for name in ("auroc.png", "nll.png", "paired.png", "cross_task_eig-ipa.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "cross_task.csv").read_text().startswith("method,scan_task,score_task,t,")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
    assert "eig-ipa" in format_table(rows, t=2)


def test_bootstrap_is_deterministic():
    a = metric_rows(_records(seed=1), ["effusion"], scans=1, n_boot=100, seed=5)
    b = metric_rows(_records(seed=1), ["effusion"], scans=1, n_boot=100, seed=5)
    assert repr(a) == repr(b)  # (repr: the NaN sd of one repeat compares unequal to itself)


def test_capture_rows_and_file_from_known_records(tmp_path):
    """eig-ipa as good as the clairvoyant reference and uncond at chance: room 0.5, capture 1;
    capture.csv is written only when all three methods were evaluated."""
    recs = [r for r in _records(T=3) if r["task"] != "No Finding"]
    for r in [r for r in recs if r["method"] == "eig-ipa"]:
        recs.append({**r, "method": "clairvoyant", "probs": [[v + 0.01 for v in p] for p in r["probs"]]})  # same ranking
        recs.append({**r, "method": "uncond", "probs": [[0.5] * 15 for _ in r["probs"]]})
    rows = capture_rows(recs, ["effusion"], scans=3, n_boot=100)
    assert len(rows) == 1 and rows[0]["t"] == "2-3"
    assert rows[0]["room"] == 0.5 and rows[0]["gain"] == 0.5 and rows[0]["capture"] == 1.0
    assert rows[0]["capture_lo"] == rows[0]["capture_hi"] == 1.0
    write_report(tmp_path, recs, ["effusion"], 3, n_boot=50)
    assert (tmp_path / "capture.csv").is_file()
    write_report(tmp_path / "no-ref", [r for r in recs if r["method"] != "clairvoyant"], ["effusion"], 3, n_boot=50)
    assert not (tmp_path / "no-ref" / "capture.csv").exists() and not capture_rows(recs, ["effusion"], scans=1)


def _texts(fig) -> str:
    return " ".join([t.get_text() for ax in fig.axes for t in ax.texts] + [fig._suptitle.get_text() if fig._suptitle else ""])


def test_a_plot_with_no_data_says_so():
    from boed.evaluation.report import curves_figure

    nan = float("nan")
    rows = [{"method": m, "illness": "Edema", "t": t, "auroc": nan, "auroc_lo": nan, "auroc_hi": nan}
            for m in ("eig-ipa", "random") for t in range(3)]
    fig = curves_figure(rows, "auroc")
    assert "no data: no finite AUROC" in _texts(fig)
    assert all(label.endswith("(no data)") for label in fig.axes[0].get_legend_handles_labels()[1])
    assert "no data" in _texts(curves_figure([], "auroc"))
    rows[0]["auroc"] = 0.7  # one value: the panel has data
    fig = curves_figure(rows, "auroc")
    assert "no data: no finite" not in _texts(fig)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert not labels[0].endswith("(no data)") and labels[1].endswith("(no data)")


def test_paired_intervals_are_explained_and_do_not_pile_up():
    from boed.evaluation.report import PAIRED_CAPTION, curves_figure, paired_rows

    paired = paired_rows(_records(), ["effusion"], scans=2, n_boot=50)
    curves = [{"method": r["baseline"], "illness": r["illness"], "t": r["t"], "diff": r["diff"], "diff_lo": r["diff_lo"],
               "diff_hi": r["diff_hi"]} for r in paired if isinstance(r["t"], int)]
    fig = curves_figure(curves, "diff", zero_line=True, bands="bars", caption=PAIRED_CAPTION)
    ax = fig.axes[0]
    assert "95 % bootstrap interval" in _texts(fig) and "0 = a tie" in _texts(fig)
    assert not ax.collections or all(type(c).__name__ == "LineCollection" for c in ax.collections)  # no shaded bands
    xs = [tuple(np.round(line.get_xdata(), 6)) for line in ax.lines if line.get_marker() == "o"]  # each method's t = 1, 2
    assert len(xs) == 2 and len(set(xs)) == 2  # the methods' intervals sit at different x
