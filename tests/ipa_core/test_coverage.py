"""Coverage metrics: known answers for best-of-K MSE and diversity, and the study loop."""

from __future__ import annotations

import pytest
import torch

from ipa_core.coverage import best_of_k_mse, coverage_study, diversity, per_sample_mse
from xray.errors import UserError


def setup(values: list[int]):
    """One 2x2 image of zeros, left column observed; sample k has value values[k] everywhere."""
    x = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    m = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    s = torch.tensor(values, dtype=torch.uint8)[None, :, None, None, None].expand(1, len(values), 1, 2, 2).clone()
    s[..., 0] = 200  # observed column: wrong on purpose, must be ignored
    return x, m, s


def test_known_answers():
    x, m, s = setup([0, 51, 102, 255])  # errors 0, 0.04, 0.16, 1
    torch.testing.assert_close(per_sample_mse(s, x, m), torch.tensor([[0.0, 0.04, 0.16, 1.0]]))
    torch.testing.assert_close(best_of_k_mse(s, x, m, 1), torch.tensor([0.3]))
    torch.testing.assert_close(best_of_k_mse(s, x, m, 2), torch.tensor([(0.0 + 0.16) / 2]))
    torch.testing.assert_close(best_of_k_mse(s, x, m, 4), torch.tensor([0.0]))
    two = setup([0, 255])[2]
    torch.testing.assert_close(diversity(two, m), torch.tensor([0.5]))
    same = setup([7, 7, 7])[2]
    torch.testing.assert_close(diversity(same, m), torch.tensor([0.0]))
    with pytest.raises(UserError, match="at least"):
        best_of_k_mse(s, x, m, 5)
    assert per_sample_mse(s, x, torch.ones_like(m)).isnan().all()


def test_study_oracle_and_noise():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (6, 1, 8, 8), generator=g).to(torch.uint8)
    masks = {"low": torch.zeros(6, 1, 8, 8), "high": (torch.rand(6, 1, 8, 8, generator=g) < 0.7).float()}

    def oracle(x, m, n, generator):
        return x[:, None].expand(-1, n, -1, -1, -1)

    def noise(x, m, n, generator):
        return torch.randint(0, 256, (x.shape[0], n, *x.shape[1:]), generator=generator).to(torch.uint8)

    rows = coverage_study(oracle, "oracle", imgs, masks, ks=(1, 10), batch_size=4, generator=g, progress=False)
    assert len(rows) == 4 and all(r.best_of_k_mse == 0 and r.diversity == 0 and r.n_images == 6 for r in rows)
    rows = coverage_study(noise, "noise", imgs, masks, ks=(1, 10, 50), batch_size=4, generator=g, progress=False)
    by = {(r.bin, r.k): r.best_of_k_mse for r in rows}
    for b in masks:
        assert by[(b, 1)] > by[(b, 10)] > by[(b, 50)]  # more samples, closer best match
        assert 0.1 < by[(b, 1)] < 0.25  # E (U - V)^2 = 1/6 for independent uniforms
    with pytest.raises(UserError, match="masks for"):
        coverage_study(oracle, "o", imgs, {"bad": masks["low"][:2]}, ks=(1,), progress=False)


def test_ipa_sampler_bins_and_outputs(tmp_path):
    import csv

    from PIL import Image

    from ipa_core.coverage import bin_masks, ipa_sampler, write_results
    from ipa_core.ipa import IPA
    from tests.ipa_core.test_ipa import images, micro_vae

    torch.set_num_threads(1)
    ipa = IPA.from_vae(micro_vae()).eval()
    x = images(3)
    masks = bin_masks(3, 16, torch.Generator().manual_seed(0))
    assert list(masks) == ["0-20%", "20-40%", "40-60%", "60-80%", "80-100%"]
    fn = ipa_sampler(ipa, t=1.0, max_batch=5)  # 12 rows in passes of 5
    s = fn(x, masks["40-60%"], 4, torch.Generator().manual_seed(0))
    assert s.shape == (3, 4, 1, 16, 16)
    keep = masks["40-60%"].bool()[:, None].expand_as(s)
    assert torch.equal(s[keep], x[:, None].expand_as(s)[keep])
    rows = coverage_study(fn, "IPA t=1", x, masks, ks=(1, 2, 4), generator=torch.Generator().manual_seed(0), progress=False)
    rows += coverage_study(ipa_sampler(ipa, t=0.5), "IPA t=0.5", x, masks, ks=(1, 2, 4), progress=False,
                           generator=torch.Generator().manual_seed(0))
    paths = write_results(rows, tmp_path, notes="unit test")
    table = list(csv.DictReader(open(paths["csv"])))
    assert len(table) == 2 * 5 * 3 and table[0]["method"] == "IPA t=1"
    assert Image.open(paths["png"]).size[0] > 500
    md = paths["md"].read_text()
    assert "IPA t=0.5" in md and "unit test" in md and md.count("\n| IPA") == 10


def test_pairwise_distance_known_answers():
    from ipa_core.coverage import pairwise_distance

    x, m, s = setup([0, 51, 102])  # unobserved values 0, 0.2, 0.4: pair distances 0.2, 0.4, 0.2
    torch.testing.assert_close(pairwise_distance(s, m), torch.tensor([(0.2 + 0.4 + 0.2) / 3]))
    torch.testing.assert_close(pairwise_distance(setup([9, 9, 9, 9])[2], m), torch.tensor([0.0]))
    torch.testing.assert_close(pairwise_distance(s[:, :1], m), torch.tensor([0.0]))  # one sample: no pairs
    assert pairwise_distance(s, torch.ones_like(m)).isnan().all()


def test_completion_quality_same_states_and_seeds():
    from ipa_core.coverage import completion_quality

    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (7, 1, 8, 8), generator=g).to(torch.uint8)
    masks = (torch.rand(7, 1, 8, 8, generator=g) < 0.4).float()
    masks[0] = 1.0  # nothing unobserved: skipped
    seen = {}

    def truth(x_obs, m, n, generator):  # cheats by lookup: returns the hidden image (known answer: MSE 0)
        hidden = masks[:, None] < 0.5
        assert torch.equal(x_obs, x_obs * (m > 0.5)), "completers must only see observed pixels"
        return torch.stack([imgs[(imgs * (masks > 0.5) == xo).flatten(1).all(1)][0] for xo in x_obs])[:, None].expand(-1, n, -1, -1, -1)

    def draw(x_obs, n, generator):
        return torch.randint(0, 256, (x_obs.shape[0], n, *x_obs.shape[1:]), generator=generator).to(torch.uint8)

    def noise(x_obs, m, n, generator):
        seen.setdefault("noise", []).append(generator.initial_seed())
        return draw(x_obs, n, generator)

    def noise_twin(x_obs, m, n, generator):
        seen.setdefault("twin", []).append(generator.initial_seed())
        return draw(x_obs, n, generator)

    def constant(x_obs, m, n, generator):
        return torch.full((x_obs.shape[0], n, *x_obs.shape[1:]), 128, dtype=torch.uint8)

    rows = completion_quality({"truth": truth, "noise": noise, "twin": noise_twin, "constant": constant},
                              imgs, masks, n_samples=10, seed=3, batch_size=3, progress=False)
    by = {r.completer: r for r in rows}
    assert [r.completer for r in rows] == ["truth", "noise", "twin", "constant"]
    assert by["truth"].best_mse == 0 and by["truth"].pairwise == 0 and by["truth"].n_images == 6
    assert by["constant"].pairwise == 0 and by["constant"].pixel_std == 0
    assert by["constant"].best_mse == pytest.approx(by["constant"].mean_mse)
    assert by["noise"].best_mse < by["noise"].mean_mse  # best of 10 beats a typical draw
    assert 0.3 < by["noise"].pairwise < 0.5  # RMS of U - V for independent uniforms: sqrt(1/6)
    assert seen["noise"] == seen["twin"] and len(set(seen["noise"])) == 3  # the same seeds for every completer
    assert by["noise"].best_mse == by["twin"].best_mse  # hence identical numbers for identical completers
    with pytest.raises(UserError, match="masks for"):
        completion_quality({"t": truth}, imgs, masks[:2], progress=False)
