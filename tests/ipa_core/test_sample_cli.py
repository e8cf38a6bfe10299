"""`ipa_core sample`: writes the figure; one-line errors for bad runs, images and masks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ipa_core.cli import main
from ipa_core.ipa import IPA
from ipa_core.sampling import TITLE_BAND
from tests.ipa_core.test_ipa import micro_vae


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    vae = micro_vae()
    vae.save_pretrained(d / "vae" / "model")
    IPA.from_vae(vae).save_pretrained(d / "ipa" / "model")
    img = (np.arange(40 * 30).reshape(40, 30) % 256).astype(np.uint8)
    Image.fromarray(img).save(d / "xray.png")
    return d


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_writes_figure(runs, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, stdout, _ = run(["sample", "--run", str(runs / "ipa"), "--image", str(runs / "xray.png"),
                           "--mask", "box:0,0,8,16", "--n", "3", "--seed", "1", "--out", str(out)], capsys)
    assert code == 0 and "3 completions" in stdout and "observed 50%" in stdout
    im = np.asarray(Image.open(out))
    assert im.ndim == 3 and im.shape[1] / (im.shape[0] - TITLE_BAND) == pytest.approx((7 * 18 + 2) / 20, rel=0.01)  # titles above
    # same seed, same figure; another temperature, another figure
    out2, out3 = tmp_path / "again.png", tmp_path / "t.png"
    run(["sample", "--run", str(runs / "ipa"), "--image", str(runs / "xray.png"), "--mask", "box:0,0,8,16",
         "--n", "3", "--seed", "1", "--out", str(out2)], capsys)
    run(["sample", "--run", str(runs / "ipa"), "--image", str(runs / "xray.png"), "--mask", "box:0,0,8,16",
         "--n", "3", "--seed", "1", "--t", "0.3", "--out", str(out3)], capsys)
    assert np.array_equal(im, np.asarray(Image.open(out2)))
    assert not np.array_equal(im, np.asarray(Image.open(out3)))


@pytest.mark.parametrize("case, needle", [
    ("missing_run", "does not exist"),
    ("vae_run", "unconditional VAE"),
    ("bad_mask", "bad mask spec"),
    ("missing_image", "does not exist"),
    ("bad_n", "--n is 0; expected 1 to 256"),
    ("size_mismatch", "--image-size 64 does not match"),
])
def test_one_line_errors(runs, tmp_path, capsys, case, needle):
    args = {"run": str(runs / "ipa"), "src": ["--image", str(runs / "xray.png")], "mask": "patches:2", "n": "2"}
    if case == "missing_run":
        args["run"] = str(tmp_path / "nope")
    elif case == "vae_run":
        args["run"] = str(runs / "vae")
    elif case == "bad_mask":
        args["mask"] = "circle:3"
    elif case == "missing_image":
        args["src"] = ["--image", str(tmp_path / "none.png")]
    elif case == "bad_n":
        args["n"] = "0"
    elif case == "size_mismatch":
        args["src"] = ["--index", "0"]
    code, _, err = run(["sample", "--run", args["run"], *args["src"], "--mask", args["mask"], "--n", args["n"],
                        "--out", str(tmp_path / "o.png")], capsys)
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.png").exists()


def test_index_images_come_from_the_data_recorded_with_the_model(runs, tmp_path, capsys, monkeypatch):
    """No --data: the test split of the data the model was trained on (its data.json), not the default phantom set."""
    import json
    import shutil

    import ipa_core.commands.sample
    from xray.errors import UserError

    run_dir = tmp_path / "ipa"
    shutil.copytree(runs / "ipa", run_dir)
    S = IPA.from_pretrained(run_dir).config.image_size
    root = str(tmp_path / "nih")
    (run_dir / "data.json").write_text(json.dumps({"data": "chestxray", "data_root": root, "cache_dir": None,
                                                   "image_size": S, "fingerprint": "x"}))
    asked = []

    def fake(args, split):
        asked.append((args.data, args.data_root))
        raise UserError("stop here")

    monkeypatch.setattr(ipa_core.commands.sample, "dataset_from_args", fake)  # the name the command binds
    code, _, err = run(["sample", "--run", str(run_dir), "--index", "0", "--image-size", str(S), "--out", str(tmp_path / "o.png")], capsys)
    assert code == 2 and "stop here" in err
    assert asked == [("chestxray", root)]
