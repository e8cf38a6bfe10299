import numpy as np
import torch
from PIL import Image

from boed.geometry import ScanGeometry
from boed.heatmaps import grid_extent, patch_centre, plot_decision, plot_summary


def test_grid_cells_sit_on_patch_centres():
    for S, G in ((64, 17), (32, 5), (256, 17)):
        geo = ScanGeometry(S, grid=G)
        left, right, bottom, top = grid_extent(geo)
        cell = (right - left) / G
        assert cell == geo.stride
        for loc in (0, G + 2, geo.num_locations - 1):
            r, c = divmod(loc, G)
            cx, cy = patch_centre(geo, loc)
            assert abs(left + (c + 0.5) * cell - cx) < 1e-9 and abs(top + (r + 0.5) * cell - cy) < 1e-9


def test_plot_decision_and_summary_write_pngs(tmp_path):
    geo = ScanGeometry(32, grid=5)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1, 32, 32), dtype=torch.uint8, generator=g)
    m0 = geo.mask([3])
    m1 = geo.mask([3, 12])
    samples = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8, generator=g)
    ig = torch.rand(25, 6, generator=g)
    eig = ig.mean(1)
    plot_decision(tmp_path / "step_1.png", geo, x * m0.byte(), m0, eig, ig, samples, int(eig.argmax()),
                  x * m1.byte(), m1, [3], title="test", n_show=4)
    plot_summary(tmp_path / "summary.png", geo, x, x * m1.byte(), m1, [3, 12], [0.2, 0.3, 0.6], [0.1, 0.05],
                 "Effusion", target=1.0)
    for name in ("step_1.png", "summary.png"):
        with Image.open(tmp_path / name) as im:
            a = np.asarray(im.convert("RGB"))
        assert a.shape[0] > 100 and a.shape[1] > 300 and a.std() > 10  # a real drawing, not blank
    # a red x was drawn (pure-ish red pixels exist in the decision figure)
    with Image.open(tmp_path / "step_1.png") as im:
        a = np.asarray(im.convert("RGB")).astype(int)
    assert ((a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1.png", "summary.png"]  # no temp files left
