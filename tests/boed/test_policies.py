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


def test_epe_prefers_confident_patch_eig_ties_spread_over_seeds():
    # every completion has a bright centre: nothing is uncertain, so EIG is 0 everywhere (a 25-way
    # tie) while EPE picks the patch that makes the classifier most confident
    clf = RegionClassifier(GEO.box(CENTRE), gain=12, bias=-3)
    sampler = DatasetSampler(region_dataset([255] * 4))
    state = ScanState.empty(1, 1, 32)
    p = GreedyPolicy(clf, sampler, "edema", GEO, n_samples=4, estimator="epe").next_locations(state, torch.Generator().manual_seed(0))
    assert p.tolist() == [CENTRE]
    firsts = []
    for seed in range(30):
        pol = GreedyPolicy(clf, sampler, "edema", GEO, n_samples=4, estimator="eig")
        firsts.append(int(pol.next_locations(state, torch.Generator().manual_seed(seed))[0]))
        assert float(pol.last_result.eig.abs().max()) == 0.0  # really all tied
    assert len(set(firsts)) >= 10 and firsts.count(0) < 10  # uniform over 25 tied locations, not always 0
    # without a generator the lowest tied index (documented fallback)
    assert GreedyPolicy(clf, sampler, "edema", GEO, n_samples=4).next_locations(state).tolist() == [0]


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
    # ties: uniform among the tied, never a skipped or a worse candidate
    s = torch.tensor([[2.0, 2.0, 1.0, 2.0, 2.0]])
    skip = torch.tensor([[False, False, False, False, True]])
    picks = [int(select(s, skip, generator=torch.Generator().manual_seed(k))[0]) for k in range(300)]
    counts = [picks.count(i) for i in range(5)]
    assert counts[2] == 0 and counts[4] == 0 and all(70 < c < 130 for c in counts[:2] + counts[3:4]), counts
    assert select(-s, skip, maximize=False, generator=torch.Generator().manual_seed(0)).item() in (0, 1, 3)
    # a unique best is chosen whatever the generator
    assert {int(select(torch.tensor([[0.0, 5.0, 1.0]]), torch.zeros(1, 3, dtype=torch.bool),
                       generator=torch.Generator().manual_seed(k))[0]) for k in range(20)} == {1}


class RecordingSampler:
    """Records what it is asked for and returns the test images themselves as "completions"
    (a perfect conditional completer), so the choice depends on what was observed."""

    def __init__(self, truth):
        self.truth, self.calls = truth, []

    def sample(self, x_obs, m, n, generator=None):
        self.calls.append((x_obs.clone(), m.clone(), n))
        B = x_obs.shape[0]
        return self.truth[:B, None].expand(B, n, *self.truth.shape[1:]).clone()  # (B, N, C, S, S)


def test_greedy_passes_observations_to_its_sampler_and_the_dataset_sampler_at_t1():
    clf = RegionClassifier(GEO.box(CENTRE), gain=12, bias=-6)
    truth = region_dataset([0, 255]).images  # image 0: dark centre, image 1: bright centre
    first = RecordingSampler(region_dataset([0, 255] * 3).images)
    cond = RecordingSampler(truth)
    pol = GreedyPolicy(clf, cond, "effusion", GEO, n_samples=6, first_sampler=first)
    g = torch.Generator().manual_seed(0)
    state = ScanState.empty(2, 1, 32)
    l1 = pol.next_locations(state, g)
    assert len(first.calls) == 1 and not cond.calls  # t = 1: the unconditional (first) sampler only
    x0, m0, n0 = first.calls[0]
    assert n0 == 6 and m0.sum() == 0 and x0.sum() == 0
    state = state.scan(truth, l1, GEO)
    pol.next_locations(state, g)
    assert len(first.calls) == 1 and len(cond.calls) == 1  # t = 2: the conditional sampler
    x_obs, m, n = cond.calls[0]
    assert n == 6 and torch.equal(m, state.mask) and torch.equal(x_obs, state.x_obs)  # the current observations
    state = state.scan(truth, torch.tensor([0, 24]), GEO)
    pol.next_locations(state, g)
    assert torch.equal(cond.calls[1][1], state.mask) and torch.equal(cond.calls[1][0], state.x_obs)


def test_greedy_choice_depends_on_the_conditional_samples():
    # a completer that knows the image leaves no uncertainty: EIG is 0 everywhere; an unconditional
    # one (dataset draws with dark and bright centres) puts all the EIG on the centre. A policy that
    # ignored its sampler at t >= 2 could not tell these apart.
    clf = RegionClassifier(GEO.box(CENTRE), gain=12, bias=-6)
    truth = region_dataset([255, 255]).images
    state = ScanState.empty(2, 1, 32).scan(truth, torch.tensor([0, 4]), GEO)
    uncond = GreedyPolicy(clf, DatasetSampler(region_dataset([0, 255] * 3)), "effusion", GEO, n_samples=6)
    assert uncond.next_locations(state, torch.Generator().manual_seed(0)).tolist() == [CENTRE, CENTRE]
    cond = GreedyPolicy(clf, RecordingSampler(truth), "effusion", GEO, n_samples=6)
    cond.next_locations(state, torch.Generator().manual_seed(0))
    assert float(cond.last_result.eig.abs().max()) == 0.0


def test_first_choice_shared_between_policies_making_the_same_computation():
    from boed.baselines.policies import UncondPolicy
    from boed.policies import FirstChoiceCache

    clf = SmallCNN(seed=3).eval()
    ds = ImageSet(12, S=32)
    ds.images = torch.randint(0, 256, (12, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    cache = FirstChoiceCache()
    eig = GreedyPolicy(clf, None, "edema", GEO, n_samples=5, first_sampler=DatasetSampler(ds), first_cache=cache)
    unc = UncondPolicy(clf, DatasetSampler(ds), "edema", GEO, n_samples=5, first_cache=cache)
    for seed in range(3):  # three repeats: a new first generator each
        eig.reset(), unc.reset()
        eig.prime(3, torch.Generator().manual_seed(seed), None)
        unc.prime(3, torch.Generator().manual_seed(seed), torch.Generator().manual_seed(99))
        assert unc.sequence(1) == [eig.first_choice]
    assert cache.misses == 3 and cache.hits == 3
    # without the cache the two make the same computation anyway
    alone = UncondPolicy(clf, DatasetSampler(ds), "edema", GEO, n_samples=5)
    assert alone.sequence(1, first_generator=torch.Generator().manual_seed(2)) == [eig.first_choice]
    # EPE uses the same draws but its own estimator: a separate cache entry
    epe = GreedyPolicy(clf, None, "edema", GEO, n_samples=5, estimator="epe", first_sampler=DatasetSampler(ds), first_cache=cache)
    epe.prime(3, torch.Generator().manual_seed(2))
    assert cache.misses == 4 and torch.equal(epe.last_result.samples, eig.last_result.samples)  # the same t = 1 draws


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
