"""Phantom generator: NIH format, determinism, patient split, finding placement, prevalence knob."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray import nih
from xray.errors import UserError
from xray.labels import NO_FINDING, PATHOLOGIES
from xray.phantom import DEMO_PREVALENCE, contact_sheet, generate, render_meta
from xray.phantom.metadata import HEADER, ImageMeta, rake_weights, real_table, sample_metadata

N, SIZE = 24, 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("ph") / "a", N, SIZE, seed=7, workers=1, prevalence=DEMO_PREVALENCE,
                    progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_header_and_fields(folder):
    assert sorted(p.name for p in folder.iterdir()) == [
        "BBox_List_2017.csv", "Data_Entry_2017_v2020.csv", "images", "test_list.txt", "train_val_list.txt"]
    lines = (folder / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    assert lines[0] == HEADER
    assert len(lines) == N + 1
    for line in lines[1:]:
        f = line.split(",")
        assert len(f) == 11
        assert f[0] == f"{int(f[3]):08d}_{int(f[2]):03d}.png"
        labels = f[1].split("|")
        assert labels == [NO_FINDING] or set(labels) <= set(PATHOLOGIES)
        assert f[5] in ("M", "F") and f[6] in ("PA", "AP")
        im = Image.open(folder / "images" / f[0])
        assert im.mode == "L" and im.size == (SIZE, SIZE)
    assert (folder / "BBox_List_2017.csv").read_text().splitlines()[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    assert not list(folder.parent.glob(".*partial*"))  # the temporary folder was renamed


def test_loads_through_nih_reader(folder):
    df = nih.read_labels(folder / "Data_Entry_2017_v2020.csv")
    assert len(df) == N
    boxes = nih.read_bboxes(folder / "BBox_List_2017.csv")
    assert len(boxes) > 0
    for _, b in boxes.iterrows():
        assert df.loc[b["image"], b["label"]] == 1  # a box only for a finding the image has
        assert 0 <= b["x"] and b["x"] + b["w"] <= 1024 + 1e-6 and 0 <= b["y"] and b["y"] + b["h"] <= 1024 + 1e-6
    assert df["patient_id"].value_counts().max() > 1  # some patients have follow-ups


def test_split_by_patient(folder):
    tv = (folder / "train_val_list.txt").read_text().split()
    te = (folder / "test_list.txt").read_text().split()
    assert sorted(tv + te) == sorted(p.name for p in (folder / "images").iterdir())
    pid = lambda names: {n.split("_")[0] for n in names}  # noqa: E731
    assert not pid(tv) & pid(te)


def test_deterministic_across_workers_and_seed_sensitive(folder, tmp_path):
    again = generate(tmp_path / "b", N, SIZE, seed=7, workers=2, prevalence=DEMO_PREVALENCE, progress=False)
    assert _files(again) == _files(folder)
    other = generate(tmp_path / "c", N, SIZE, seed=8, workers=1, prevalence=DEMO_PREVALENCE, progress=False)
    a, b = _files(folder), _files(other)
    assert a["Data_Entry_2017_v2020.csv"] != b["Data_Entry_2017_v2020.csv"]
    assert a["images/00000001_000.png"] != b["images/00000001_000.png"]


def test_refuses_non_empty_output_and_bad_args(folder, tmp_path):
    with pytest.raises(UserError, match="not empty"):
        generate(folder, 2, SIZE, seed=0, progress=False)
    with pytest.raises(UserError, match="size"):
        generate(tmp_path / "x", 2, 7, seed=0, progress=False)
    with pytest.raises(UserError, match="prevalence label"):
        generate(tmp_path / "y", 2, SIZE, seed=0, prevalence={"Flu": 0.5}, progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _meta(view="PA") -> ImageMeta:
    return ImageMeta("00000001_000.png", (), 0, 1, 50, "M", view, ("2500", "2048", "0.168", "0.168"))


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_effusion_changes_pixels_inside_its_box_at_the_lung_base(index):
    meta, size = _meta(), 128
    plain = render_meta(meta, 11, index, size, labels=()).image.astype(float)
    r = render_meta(meta, 11, index, size, labels=("Effusion",))
    assert [lab for lab, _ in r.boxes] and {lab for lab, _ in r.boxes} == {"Effusion"}
    diff = np.abs(r.image.astype(float) - plain)
    inside = np.zeros_like(diff, dtype=bool)
    for _, (x, y, w, h) in r.boxes:
        inside[int(y) - 2:int(y + h) + 2, int(x) - 2:int(x + w) + 2] = True
        assert y + h > 0.45 * size  # reaches the lower half of the image (lung base)
    assert diff.sum() > 50 * 255 / 100  # visibly different
    assert diff[inside].sum() / diff.sum() > 0.9  # and the change is inside the box
    assert r.image[inside].mean() > plain[inside].mean()  # fluid is dense: brighter


def test_findings_are_local_and_other_findings_unchanged():
    meta, size = _meta("AP"), 96
    both = render_meta(meta, 5, 0, size, labels=("Nodule", "Cardiomegaly"))
    one = render_meta(meta, 5, 0, size, labels=("Cardiomegaly",))
    # removing the nodule leaves the cardiomegaly box identical (independent random streams)
    assert [b for lab, b in both.boxes if lab == "Cardiomegaly"] == [b for lab, b in one.boxes if lab == "Cardiomegaly"]
    (x, y, w, h), = [b for lab, b in both.boxes if lab == "Nodule"]
    assert w * h < 0.05 * size * size  # a nodule is small
    diff = np.abs(both.image.astype(float) - one.image.astype(float))
    box = diff[max(0, int(y) - 3):int(y + h) + 3, max(0, int(x) - 3):int(x + w) + 3]
    assert box.sum() / diff.sum() > 0.95


def test_same_patient_same_anatomy_across_follow_ups():
    a = render_meta(_meta(), 3, 0, 64, labels=()).image.astype(float)
    b = render_meta(ImageMeta("00000001_001.png", (), 1, 1, 50, "M", "PA", _meta().orig), 3, 1, 64, labels=()).image
    c = render_meta(ImageMeta("00000002_000.png", (), 0, 2, 50, "M", "PA", _meta().orig), 3, 1, 64, labels=()).image
    assert np.abs(a - b).mean() < np.abs(a - c.astype(float)).mean()


def test_prevalence_knob_hits_targets():
    rng = np.random.default_rng(0)
    base = sample_metadata(3000, rng)
    raised = sample_metadata(3000, rng, {"Effusion": 0.4, "No Finding": 0.3})
    freq = lambda ms, lab: np.mean([lab in m.labels for m in ms])  # noqa: E731
    assert freq(base, "Effusion") < 0.16
    assert abs(freq(raised, "Effusion") - 0.4) < 0.03
    assert abs(np.mean([not m.labels for m in raised]) - 0.3) < 0.03
    table = real_table()
    w = rake_weights(table.y, {"Edema": 0.2})
    assert abs(w[table.y[:, PATHOLOGIES.index("Edema")]].sum() - 0.2) < 1e-3


def test_contact_sheet(folder, tmp_path):
    out = contact_sheet(folder, tmp_path / "s.png", per_label=3, tile=32)
    im = Image.open(out)
    assert im.size[0] == 110 + 3 * 32 and im.size[1] % 32 == 0 and im.size[1] >= 64
    with pytest.raises(UserError):
        contact_sheet(tmp_path, tmp_path / "t.png")


def test_film_to_film_variation_moves_the_lung_bases_and_keeps_lungs_in_the_image():
    """Positioning, size and inspiration vary per film (more on AP): the costophrenic angles, where
    basal findings sit, move by several percent of the image; the lungs never leave the image."""
    from xray.phantom.anatomy import Pose, lung_bank, lung_frame, sample_anatomy, sample_lungs

    templates, aspects = lung_bank()
    size, rng = 64, np.random.default_rng(0)
    bottoms, lefts = {"PA": [], "AP": []}, {"PA": [], "AP": []}
    for k in range(120):
        view = "AP" if k % 2 else "PA"
        anat = sample_anatomy(rng, "M", len(templates), aspects)
        pose = Pose.sample(rng, anat, view)
        lungs = sample_lungs(templates[anat.template], *lung_frame(size, anat, pose)).sum(0) > 0.5  # (S, S)
        rows, cols = np.nonzero(lungs.any(1))[0], np.nonzero(lungs.any(0))[0]
        assert rows[0] > 0 and rows[-1] < size - 1 and cols[0] > 0 and cols[-1] < size - 1  # inside the image
        bottoms[view].append(rows[-1] / size)
        lefts[view].append(cols[0] / size)
    for view in ("PA", "AP"):
        assert 0.035 < np.std(bottoms[view]) < 0.09, (view, np.std(bottoms[view]))
        assert 0.015 < np.std(lefts[view]) < 0.06, (view, np.std(lefts[view]))
    assert np.std(bottoms["AP"]) > np.std(bottoms["PA"])  # portable films vary more
    assert np.mean(bottoms["AP"]) < np.mean(bottoms["PA"])  # and are taken at shallower breath


# ---------------------------------------------------------------- difficulty knobs and presets

# sha256 over (relative path, bytes) of every file of generate(N=12, 64 px, seed 5, demo prevalence,
# workers=1), computed with the generator before the difficulty knobs existed: the default preset
# must keep writing exactly these files (the published results are computed on them).
DEFAULT_TINY_DIGEST = "10f35f88c56d0654b427f7915249696b1c4b228afa0a1dc831ffe6172dedf638"


def _digest(root: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_default_difficulty_writes_the_original_bytes(tmp_path):
    from xray.phantom import PRESETS

    assert PRESETS["default"].is_default and not PRESETS["hard"].is_default
    out = generate(tmp_path / "d", 12, 64, seed=5, workers=1, prevalence=DEMO_PREVALENCE, progress=False,
                   difficulty="default")
    assert _digest(out) == DEFAULT_TINY_DIGEST
    hard = generate(tmp_path / "h", 12, 64, seed=5, workers=1, prevalence=DEMO_PREVALENCE, progress=False,
                    difficulty="hard")
    a, b = _files(out), _files(hard)
    assert a["Data_Entry_2017_v2020.csv"] == b["Data_Entry_2017_v2020.csv"]  # same rows, other films
    assert sum(a[k] != b[k] for k in a if k.startswith("images/")) == 12


def test_unknown_difficulty_is_a_user_error(tmp_path):
    from xray.phantom import Difficulty

    with pytest.raises(UserError, match="difficulty"):
        generate(tmp_path / "x", 2, 64, seed=0, progress=False, difficulty="brutal")
    with pytest.raises(UserError, match="noise"):
        Difficulty(noise=-1)
    assert not (tmp_path / "x").exists()


def _render(labels, difficulty, index, view="PA", size=64, seed=3):
    return render_meta(_meta(view), seed, index, size, labels=labels, difficulty=difficulty)


def _lung_geometry(difficulty, n=150):
    """Per film: lung-field bottom row, width, height (fractions) and the left-right lung tilt (radians)."""
    from xray.phantom.anatomy import Pose, lung_bank, lung_frame, sample_anatomy, sample_lungs

    templates, aspects = lung_bank()
    rng, size, out = np.random.default_rng(0), 64, []
    for k in range(n):
        anat = sample_anatomy(rng, "M", len(templates), aspects)
        pose = Pose.sample(rng, anat, "AP" if k % 2 else "PA", difficulty)
        lungs = sample_lungs(templates[anat.template], *lung_frame(size, anat, pose)) > 0.5  # (2, S, S)
        both = lungs.any(0)
        rows, cols = np.nonzero(both.any(1))[0], np.nonzero(both.any(0))[0]
        (y0, x0), (y1, x1) = (np.argwhere(lungs[j]).mean(0) for j in range(2))
        out.append((rows[-1] / size, (cols[-1] - cols[0]) / size, (rows[-1] - rows[0]) / size, np.arctan2(y1 - y0, x1 - x0)))
    return np.array(out)  # (n, 4)


def test_pose_knobs_widen_the_spread_of_lung_position_size_tilt_and_breath():
    from xray.phantom import Difficulty

    base = _lung_geometry(Difficulty())
    assert np.std(_lung_geometry(Difficulty(position=2.5))[:, 0]) > 1.3 * np.std(base[:, 0])  # lung bases move more
    assert np.std(_lung_geometry(Difficulty(scale=2.5))[:, 1]) > 1.5 * np.std(base[:, 1])  # lung widths vary more
    assert np.std(_lung_geometry(Difficulty(rotation=3))[:, 3]) > 1.8 * np.std(base[:, 3])  # tilted more
    shallow = _lung_geometry(Difficulty(shallow=0.1))[:, 2]
    assert np.mean(shallow) < np.mean(base[:, 2]) - 0.02  # shallower breaths: shorter lungs
    assert np.std(_lung_geometry(Difficulty(inspiration=3))[:, 2]) > 1.3 * np.std(base[:, 2])


def test_position_knob_moves_the_rendered_effusions():
    """Measured on rendered films: the bottom of the effusion boxes spreads more with the position knob."""
    from xray.phantom import Difficulty

    def bottoms(d):
        return [y + h for i in range(40) for lab, (x, y, w, h) in _render(("Effusion",), d, i).boxes]

    assert np.std(bottoms(Difficulty(position=3.0))) > 1.3 * np.std(bottoms(Difficulty()))


def test_finding_size_contrast_and_laterality_knobs():
    from xray.phantom import Difficulty

    area = lambda d: np.mean([w * h for i in range(20) for _, (x, y, w, h) in _render(("Nodule",), d, i, size=128).boxes])  # noqa: E731
    assert area(Difficulty(finding_size=0.6)) < 0.6 * area(Difficulty())

    def change(d):  # how much an effusion changes the same film
        return np.mean([np.abs(_render(("Effusion",), d, i).image.astype(float) - _render((), d, i).image).sum() for i in range(12)])

    assert change(Difficulty(contrast=0.5)) < 0.7 * change(Difficulty())
    sides = lambda d: [len(_render(("Effusion",), d, i).boxes) for i in range(30)]  # noqa: E731
    assert max(sides(Difficulty(bilateral=0.0))) == 1
    assert np.mean(sides(Difficulty(bilateral=1.0))) > 1.8


def test_distractors_change_normal_films_without_boxes():
    from xray.phantom import Difficulty

    d = Difficulty(distractors=3.0)
    changed = 0
    for i in range(10):
        plain, with_d = _render((), Difficulty(), i, size=96), _render((), d, i, size=96)
        assert with_d.boxes == []  # a look-alike is not a finding
        changed += int(np.abs(with_d.image.astype(float) - plain.image).sum() > 200)
    assert changed >= 8  # Poisson(3): almost every film has one
    same = [_render(("Effusion",), Difficulty(distractors=3.0), i).boxes == _render(("Effusion",), Difficulty(), i).boxes
            for i in range(6)]
    assert all(same)  # findings (and their boxes) do not move


def test_noise_knob_raises_high_frequency_energy():
    from scipy import ndimage

    from xray.phantom import Difficulty

    def hf(d):
        ims = [_render((), d, i).image.astype(float) for i in range(10)]
        return np.mean([np.mean((im - ndimage.gaussian_filter(im, 1.5)) ** 2) for im in ims])

    quiet, base, grainy = hf(Difficulty(noise=0.0)), hf(Difficulty()), hf(Difficulty(noise=3.0))
    assert quiet < base and grainy > 1.3 * base  # at 64 px anatomy edges carry much of it: ~1.5x measured


def test_presets_are_ordered_by_difficulty():
    from xray.phantom import PRESETS

    d, r, h = PRESETS["default"], PRESETS["realistic"], PRESETS["hard"]
    for knob in ("position", "scale", "rotation", "inspiration", "distractors", "noise"):
        assert getattr(d, knob) <= getattr(r, knob) <= getattr(h, knob), knob
    assert d.contrast >= r.contrast >= h.contrast and d.finding_size >= h.finding_size


def test_cli_difficulty_flag(tmp_path, capsys):
    from xray.cli import main

    argv = ["phantom", "--out", str(tmp_path / "p"), "--n", "6", "--size", "64", "--seed", "2", "--workers", "1",
            "--difficulty", "hard", "--no-progress"]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code in (0, None)
    assert "difficulty hard" in capsys.readouterr().out
    ref = generate(tmp_path / "q", 6, 64, seed=2, workers=1, progress=False, difficulty="hard")
    assert _files(tmp_path / "p") == _files(ref)
