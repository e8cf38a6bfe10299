import pytest
import torch

from boed.estimators import eig as eig_fn
from boed.geometry import ScanGeometry
from boed.policies import GreedyPolicy, Policy, ScanState, select
from boed.samplers import DatasetSampler
from tests.boed.test_samplers import ImageSet
from tests.boed.test_scoring import RegionClassifier, SmallCNN
from xray.errors import UserError

GEO = ScanGeometry(32, grid=5)  # L = 25, patch 8, stride 6
CENTRE = 12


def region_dataset(values):
    """Images that are 0 except the centre patch, which holds values[i]."""
    ds = ImageSet(len(values), S=32)
    ds.images.zero_()
    t, l, b, r = GEO.box(CENTRE)
    for i, v in enumerate(values):
        ds.images[i, :, t:b, l:r] = v
    return ds


def test_scan_state_scan_and_empty():
    x = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    s = ScanState.empty(2, 1, 32)
    assert s.steps == 0 and s.mask.sum() == 0
    s1 = s.scan(x, torch.tensor([0, 24]), GEO).scan(x, torch.tensor([0, 0]), GEO)
    assert s1.locations == [[0, 0], [24, 0]] and s1.steps == 2
    assert torch.equal(s1.mask, GEO.masks([[0], [24, 0]]))
    assert torch.equal(s1.x_obs, x * s1.mask.byte())
    assert s.steps == 0  # scan returns a new state


def test_greedy_eig_picks_informative_patch_and_caches_first_choice():
    clf = RegionClassifier(GEO.box(CENTRE), gain=12, bias=-6)
    sampler = DatasetSampler(region_dataset([0, 255] * 5))
    pol = GreedyPolicy(clf, sampler, "effusion", GEO, n_samples=6, chunk_size=50)
    assert isinstance(pol, Policy) and pol.name == "eig-ipa" and not pol.observes_everything
    state = ScanState.empty(3, 1, 32)
    g = torch.Generator().manual_seed(0)
    locs = pol.next_locations(state, g)
    assert locs.tolist() == [CENTRE] * 3 and pol.first_choice == CENTRE
    calls = pol.classifier.calls
    assert calls > 0
    assert pol.next_locations(ScanState.empty(5, 1, 32), g).tolist() == [CENTRE] * 5
    assert pol.classifier.calls == calls  # cached: no classifier work for a second batch at t = 1
    res = pol.last_result
    assert res.eig.shape == (1, 25) and res.p.shape == (1, 25, 6) and res.info_gain.shape == (1, 25, 6)
    assert torch.allclose(res.info_gain.mean(-1), res.eig, atol=1e-6)
    assert torch.allclose(res.eig, eig_fn(res.p))


def test_epe_prefers_confident_patch_eig_breaks_ties_at_lowest_index():
    # every completion has a bright centre: nothing is uncertain, so EIG is 0 everywhere (tie ->
    # location 0) while EPE picks the patch that makes the classifier most confident
    clf = RegionClassifier(GEO.box(CENTRE), gain=12, bias=-3)
    sampler = DatasetSampler(region_dataset([255] * 4))
    state = ScanState.empty(1, 1, 32)
    e = GreedyPolicy(clf, sampler, "edema", GEO, n_samples=4, estimator="eig").next_locations(state)
    p = GreedyPolicy(clf, sampler, "edema", GEO, n_samples=4, estimator="epe").next_locations(state)
    assert e.tolist() == [0] and p.tolist() == [CENTRE]


def test_fully_observed_candidates_score_zero_and_are_never_chosen():
    clf = RegionClassifier(GEO.box(CENTRE), gain=12, bias=-3)
    pol = GreedyPolicy(clf, DatasetSampler(region_dataset([255] * 4)), "edema", GEO, n_samples=4)
    x = region_dataset([255]).images
    state = ScanState.empty(1, 1, 32).scan(x, torch.tensor([0]), GEO)
    res = pol.score(state)
    assert res.skip[0, 0] and res.skip.sum() == 1 and res.eig[0, 0] == 0
    assert pol.next_locations(state).tolist() == [1]  # all EIG 0; 0 is observed, so the next index
    # mixed batch: the empty image gets the cached first choice, the other is scored
    both = ScanState(torch.cat([torch.zeros_like(x), state.x_obs]), torch.cat([torch.zeros_like(state.mask), state.mask]), [[], [0]])
    assert pol.next_locations(both).tolist() == [pol.first_choice, 1]


def test_select_ties_and_skips():
    s = torch.tensor([[1.0, 3.0, 3.0, 0.5]])
    skip = torch.tensor([[False, True, False, False]])
    assert select(s, skip).tolist() == [2]
    assert select(s, skip, maximize=False).tolist() == [3]


def test_greedy_second_step_conditions_on_observations():
    # the sampler here returns a fixed set of "completions"; with location 0 observed, the best next
    # patch is still the centre (it holds all the uncertainty) and is chosen for every image
    clf = RegionClassifier(GEO.box(CENTRE), gain=12, bias=-6)
    ds = region_dataset([0, 255] * 3)
    pol = GreedyPolicy(clf, DatasetSampler(ds), "effusion", GEO, n_samples=6)
    state = ScanState.empty(2, 1, 32).scan(ds.images[:2], torch.tensor([0, 4]), GEO)
    assert pol.next_locations(state, torch.Generator().manual_seed(0)).tolist() == [CENTRE, CENTRE]


def test_greedy_with_cnn_matches_estimator_and_is_reproducible():
    clf = SmallCNN(seed=5).eval()
    ds = ImageSet(8, S=32)
    ds.images = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pol = GreedyPolicy(clf, DatasetSampler(ds), "infiltration", GEO, n_samples=5, estimator="epe")
    state = ScanState.empty(2, 1, 32).scan(ds.images[:2], torch.tensor([3, 7]), GEO)
    a = pol.score(state, torch.Generator().manual_seed(1))
    b = pol.score(state, torch.Generator().manual_seed(1))
    assert torch.equal(a.p, b.p)
    want = a.epe.masked_fill(a.skip, float("inf")).argmin(1)
    assert pol.next_locations(state, torch.Generator().manual_seed(1)).tolist() == want.tolist()


def test_bad_arguments():
    with pytest.raises(UserError, match="estimator"):
        GreedyPolicy(SmallCNN(), None, "edema", GEO, estimator="max")
    with pytest.raises(UserError, match="unknown illness"):
        GreedyPolicy(SmallCNN(), None, "flu", GEO)


def test_patch_masks_of_matches_geometry():
    from boed.policies import patch_masks_of

    for geo in (GEO, ScanGeometry(64)):
        locs = torch.tensor([0, 5, geo.num_locations - 1, geo.grid + 1])
        assert torch.equal(patch_masks_of(geo, locs), geo.patch_masks()[locs])
    with pytest.raises(ValueError, match="scan locations"):
        patch_masks_of(GEO, torch.tensor([25]))
