from __future__ import annotations

import csv
import gzip
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from tests.xray.conftest import finding_for, make_nih
from xray import nih
from xray.errors import UserError
from xray.labels import PATHOLOGIES

V2020_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


@pytest.fixture(scope="module")
def real_labels(xrv_data):
    return nih.read_labels(xrv_data / "Data_Entry_2017_v2020.csv.gz")


def test_real_v2020_counts_match_an_independent_count(real_labels, xrv_data):
    with gzip.open(xrv_data / "Data_Entry_2017_v2020.csv.gz", "rt", newline="") as f:
        rows = list(csv.reader(f))[1:]
    raw = Counter(lab for r in rows for lab in r[1].split("|"))
    assert len(real_labels) == len(rows) == 112_120
    assert real_labels["patient_id"].nunique() == 30_805
    assert set(raw) == set(nih.LABEL_COLUMNS)
    for name in nih.LABEL_COLUMNS:
        assert int(real_labels[name].sum()) == raw[name], name
    known = {"No Finding": 60_361, "Infiltration": 19_894, "Effusion": 13_317, "Edema": 2_303, "Hernia": 227}
    assert {k: int(real_labels[k].sum()) for k in known} == known
    # "No Finding" never co-occurs with a finding
    assert (real_labels[list(PATHOLOGIES)].sum(axis=1)[real_labels["No Finding"] == 1] == 0).all()


def test_real_metadata_types_and_values(real_labels):
    first = real_labels.loc["00000001_001.png"]
    assert first["Cardiomegaly"] == 1 and first["Emphysema"] == 1 and first["No Finding"] == 0
    assert (first["patient_id"], first["age"], first["sex"], first["view"], first["follow_up"]) == (1, 58, "M", "PA", 1)
    assert real_labels.index.name == "image"
    assert set(real_labels["sex"]) == {"M", "F"} and set(real_labels["view"]) == {"PA", "AP"}
    for c in ("patient_id", "age", "follow_up"):
        assert np.issubdtype(real_labels[c].dtype, np.integer)
    assert set(np.unique(real_labels[list(nih.LABEL_COLUMNS)].to_numpy())) == {0, 1}


def test_real_bboxes(xrv_data):
    b = nih.read_bboxes(xrv_data / "BBox_List_2017.csv.gz")
    assert list(b.columns) == ["image", "label", "x", "y", "w", "h"]
    assert len(b) == 984 and b["image"].nunique() == 880 and b["label"].nunique() == 8
    assert "Infiltration" in set(b["label"]) and "Infiltrate" not in set(b["label"])
    assert set(b["label"]) <= set(PATHOLOGIES)
    assert ((b["x"] >= 0) & (b["x"] + b["w"] <= 1024 + 1) & (b["w"] > 0)).all()


def test_2017_variant_trailing_column_and_Y_ages(tmp_path):
    p = tmp_path / "Data_Entry_2017.csv"
    p.write_text(
        V2020_HEADER + ",\n"
        "00000001_000.png,Cardiomegaly|Effusion,0,1,058Y,M,PA,2682,2749,0.143,0.143,\n"
        "00000002_000.png,No Finding,3,2,081Y,F,AP,2500,2048,0.171,0.171,\n"
        "00000003_000.png,Hernia,0,3,011M,F,PA,2500,2048,0.171,0.171,\n")
    df = nih.read_labels(p)
    assert df["age"].tolist() == [58, 81, 0]
    assert df["follow_up"].tolist() == [0, 3, 0]
    assert df.loc["00000001_000.png", ["Cardiomegaly", "Effusion", "No Finding"]].tolist() == [1, 1, 0]
    assert df.loc["00000002_000.png", "No Finding"] == 1
    assert df["Hernia"].tolist() == [0, 0, 1]


def test_header_split_expands_bracketed_names():
    assert nih._split_header(V2020_HEADER)[-4:] == [
        "OriginalImage[Width]", "OriginalImage[Height]", "OriginalImagePixelSpacing[x]", "OriginalImagePixelSpacing[y]"]


def test_unknown_label_is_named(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text(V2020_HEADER + "\na.png,Effusion|Cardiomegalyy,0,1,50,M,PA,1,1,1,1\n")
    with pytest.raises(UserError, match="Cardiomegalyy"):
        nih.read_labels(p)


def test_missing_columns_are_listed(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("Image Index,Finding Labels,Patient ID\na.png,Effusion,1\n")
    with pytest.raises(UserError, match="Follow-up #.*Patient Age.*Patient Gender.*View Position"):
        nih.read_labels(p)


def test_bad_age_and_duplicates(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text(V2020_HEADER + "\na.png,Effusion,0,1,old,M,PA,1,1,1,1\n")
    with pytest.raises(UserError, match="Patient Age.*'old'"):
        nih.read_labels(p)
    p.write_text(V2020_HEADER + "\na.png,Effusion,0,1,5,M,PA,1,1,1,1\na.png,Mass,0,1,5,M,PA,1,1,1,1\n")
    with pytest.raises(UserError, match="more than once"):
        nih.read_labels(p)


def test_find_csv_and_images_both_layouts(tmp_path):
    flat = make_nih(tmp_path / "flat", n=6)
    nested = make_nih(tmp_path / "nested", n=6, layout="nested")
    for root in (flat, nested):
        assert nih.find_csv(root).name == "Data_Entry_2017_v2020.csv"
        found = nih.find_images(root)
        assert sorted(found) == sorted(nih.read_labels(nih.find_csv(root)).index)
        assert all(p.is_file() for p in found.values())
    assert {p.parent.parent.name for p in nih.find_images(nested).values()} == {"images_001", "images_002"}
    (flat / "images" / "00000009_000.dcm").write_bytes(b"")
    assert nih.find_images(flat)["00000009_000.png"].suffix == ".dcm"


def test_find_csv_errors(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        nih.find_csv(tmp_path / "nope")
    with pytest.raises(UserError, match="no label CSV"):
        nih.find_csv(tmp_path)


def test_hash_split_is_patient_disjoint_and_deterministic(real_labels, tmp_path):
    s1 = nih.split(tmp_path, real_labels)
    s2 = nih.split(tmp_path, real_labels)
    assert s1 == s2
    pid = real_labels["patient_id"]
    tv, test = set(pid[s1["trainval"]]), set(pid[s1["test"]])
    assert not tv & test
    assert not set(pid[s1["train"]]) & set(pid[s1["val"]])
    assert sorted(s1["train"] + s1["val"]) == sorted(s1["trainval"])
    assert len(s1["trainval"]) + len(s1["test"]) == len(real_labels)
    assert 0.17 < len(test) / pid.nunique() < 0.23
    assert 0.04 < len(set(pid[s1["val"]])) / len(tv) < 0.06
    # order follows the label table
    pos = pd.Series(np.arange(len(real_labels)), index=real_labels.index)
    assert (np.diff(pos[s1["train"]].to_numpy()) > 0).all()


def test_official_split_files_are_used(tmp_path):
    root = make_nih(tmp_path / "r", n=20, official_split=True)
    labels = nih.read_labels(nih.find_csv(root))
    s = nih.split(root, labels)
    assert s["test"] == (root / "test_list.txt").read_text().split()
    assert sorted(s["trainval"]) == sorted((root / "train_val_list.txt").read_text().split())
    assert sorted(s["train"] + s["val"]) == sorted(s["trainval"])


def test_fixture_labels_round_trip(tiny_nih):
    df = nih.read_labels(nih.find_csv(tiny_nih))
    for i, name in enumerate(df.index):
        expect = set(finding_for(i).split("|"))
        assert {c for c in nih.LABEL_COLUMNS if df.loc[name, c]} == expect


def test_an_empty_csv_is_called_empty_and_a_header_only_one_has_no_rows(tmp_path):
    from xray.errors import UserError
    from xray.nih import read_labels

    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match=r"is empty \(no header, no rows\)"):
        read_labels(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("Image Index,Finding Labels,Follow-up #,Patient ID\n")
    with pytest.raises(UserError, match="has a header but no rows"):
        read_labels(tmp_path / "header.csv")
