"""boed/scan_loop.py: the one-image loop of `boed run` and `boed run --policy`, with a classifier
whose belief is the observed fraction of the image (a known answer per scan)."""

import json

import pytest
import torch

from boed.geometry import ScanGeometry
from boed.scan_loop import Decision, scan_image
from xray.errors import UserError
from xray.labels import LABELS, resolve_illness

S = 64
EFF = resolve_illness("effusion")


class Fraction:
    """p(every label) = the observed fraction of the image (or NaN from ``nan_after`` scans on)."""

    def __init__(self, nan_after=None):
        self.nan_after, self.calls = nan_after, 0

    def predict_proba(self, x_obs, mask):
        frac = mask.float().mean(dim=(1, 2, 3))  # (B,)
        if self.nan_after is not None and self.calls >= self.nan_after:  # call 0: nothing observed, k: after scan k
            frac = frac * float("nan")
        self.calls += 1
        return frac[:, None].expand(-1, len(LABELS))  # (B, K)


def test_scan_image_scans_the_decided_locations_and_records_each_step(tmp_path, capsys):
    g = ScanGeometry(S)
    x = torch.randint(0, 256, (1, 1, S, S), dtype=torch.uint8)
    plan = [0, g.num_locations - 1, 3]
    drawn = []

    def decide(t, state):
        assert len(state.locations[0]) == t - 1  # the state before scan t
        return Decision(plan[t - 1], fields={"score": 10 * t}, text=f"score {10 * t}", value=float(t),
                        plot=lambda path, s, new: drawn.append((path.name, len(new.locations[0]))))

    res = scan_image(x, torch.zeros(len(LABELS)), Fraction(), EFF, g, 3, decide, tmp_path, "cpu", "img", "detail")
    assert res.state.locations[0] == plan and [s["location"] for s in res.steps] == plan
    assert res.target == 0.0 and res.probs[0] == 0.0
    observed = res.state.mask.float().mean().item()
    assert res.probs[-1] == pytest.approx(observed) and res.probs[1] < res.probs[2] <= res.probs[3]
    assert [s["score"] for s in res.steps] == [10, 20, 30] and all(s["box"] == list(g.box(s["location"])) for s in res.steps)
    assert drawn == [("step_1.png", 1), ("step_2.png", 2), ("step_3.png", 3)]
    assert (tmp_path / "summary.png").is_file()
    assert torch.equal(res.state.x_obs * res.state.mask, x.float() * res.state.mask)  # what was scanned is the image
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Effusion on img (label: 0): detail" and out[1].startswith("t=0  p(Effusion) = 0.000")
    assert out[2].startswith("t=1  location   0 (row  0, col  0)  score 10  p(Effusion)")
    json.dumps(res.steps)  # a step record is JSON as written to scans.json


def test_scan_image_without_out_draws_nothing_and_stops_on_a_non_finite_belief(tmp_path):
    g = ScanGeometry(S)
    x = torch.zeros(1, 1, S, S, dtype=torch.uint8)
    calls = []

    def decide(t, state):
        calls.append(t)
        return Decision(t, plot=lambda *a: pytest.fail("drew a figure without an output folder"))

    scan_image(x, None, Fraction(), EFF, g, 2, decide, None, "cpu")
    with pytest.raises(UserError, match="scan 3: the classifier gives a non-finite probability.*nothing more is saved"):
        scan_image(x, None, Fraction(nan_after=2), EFF, g, 4, decide, None, "cpu")
    assert calls == [1, 2, 1, 2]  # the third decision is never asked for
