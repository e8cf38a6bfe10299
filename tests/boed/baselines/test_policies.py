import pytest
import torch

from boed.baselines.policies import ClairvoyantPolicy, FullImagePolicy, NonGreedyUncondPolicy, RandomPolicy, UncondPolicy
from boed.estimators import binary_entropy
from boed.geometry import observe
from boed.policies import Policy, ScanState
from boed.samplers import DatasetSampler
from tests.boed.test_policies import CENTRE, GEO, region_dataset
from tests.boed.test_scoring import RegionClassifier, SmallCNN
from xray.errors import UserError
from xray.labels import resolve_illness


def test_random_policy_uniform_over_unobserved_and_reproducible():
    pol = RandomPolicy(GEO)
    assert isinstance(pol, Policy) and pol.name == "random"
    x = torch.zeros(64, 1, 32, 32, dtype=torch.uint8)
    state = ScanState.empty(64, 1, 32).scan(x, torch.zeros(64, dtype=torch.long), GEO)
    seen = torch.zeros(GEO.num_locations)
    for i in range(40):
        locs = pol.next_locations(state, torch.Generator().manual_seed(i))
        assert (locs != 0).all()  # location 0 is fully observed
        seen += torch.bincount(locs, minlength=GEO.num_locations)
    assert seen[0] == 0 and (seen[1:] > 0).all()
    # 2560 draws over 24 locations: each count ~ 107; a loose uniformity check
    assert seen[1:].min() > 50 and seen[1:].max() < 170
    a = pol.next_locations(state, torch.Generator().manual_seed(7))
    assert torch.equal(a, pol.next_locations(state, torch.Generator().manual_seed(7)))


def test_uncond_sequence_fixed_cached_and_informative():
    clf = RegionClassifier(GEO.box(CENTRE), gain=12, bias=-6)
    pol = UncondPolicy(clf, DatasetSampler(region_dataset([0, 255] * 5)), "effusion", GEO, n_samples=6)
    g = torch.Generator().manual_seed(0)
    seq = pol.sequence(3, g)
    assert seq[0] == CENTRE and len(set(seq)) == 3
    calls = pol.classifier.calls
    x = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    state = ScanState.empty(4, 1, 32)
    for t in range(3):  # the same sequence for every image, whatever it shows
        locs = pol.next_locations(state, g)
        assert locs.tolist() == [seq[t]] * 4
        state = state.scan(x, locs, GEO)
    assert pol.classifier.calls == calls and pol.sequence(2) == seq[:2]
    pol.reset()  # a new repeat draws the sequence again
    pol.sequence(3, torch.Generator().manual_seed(0))
    assert pol.classifier.calls > calls


def test_nongreedy_per_budget_sets_maximise_eq68():
    clf = SmallCNN(seed=2).eval()
    ds = region_dataset([0, 255] * 4)
    ds.images = torch.randint(0, 256, ds.images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    pol = NonGreedyUncondPolicy(clf, DatasetSampler(ds), "edema", GEO, n_samples=4, n_sequences=12, scans=3)
    sets = pol.search(torch.Generator().manual_seed(0), first_generator=torch.Generator().manual_seed(1))
    drawn = DatasetSampler(ds).sample(torch.zeros(1, 1, 32, 32, dtype=torch.uint8), torch.zeros(1, 1, 32, 32), 4,
                                      torch.Generator().manual_seed(1))[0]  # the t = 1 draws (first generator)
    assert torch.equal(pol.draws, drawn)
    ill = resolve_illness("edema")

    def probs(m):
        with torch.no_grad():
            return ill.prob(torch.sigmoid(clf(observe(drawn.float() / 255, m.expand(4, 1, 32, 32)))))

    prior = binary_entropy(probs(torch.zeros(1, 32, 32)).mean())
    for t in (1, 2, 3):  # one search per budget: the chosen t-set maximises eq. 68 among the sampled ones
        cands = pol.candidates[t]
        assert cands.shape == (12, t) and all(len(set(r)) == t for r in cands.tolist())
        by_hand = torch.stack([prior - binary_entropy(probs(GEO.mask(c.tolist()))).mean() for c in cands])  # (12,)
        torch.testing.assert_close(pol.utilities[t], by_hand.float(), atol=1e-5, rtol=1e-5)
        chosen = by_hand[[c.tolist() for c in cands].index(sets[t])]
        assert chosen >= by_hand.max() - 1e-5 and pol.budget_set(t) == sets[t]
    assert not all(sets[t] == sets[3][:t] for t in (1, 2))  # budgets are searched separately, not prefixes
    state = ScanState.empty(2, 1, 32)
    assert pol.next_locations(state).tolist() == [sets[3][0]] * 2
    with pytest.raises(UserError, match="scans=4"):
        pol.sequence(4)
    with pytest.raises(UserError, match="budgets 1..3"):
        pol.budget_set(4)
    pol.reset()
    again = pol.search(torch.Generator().manual_seed(0), first_generator=torch.Generator().manual_seed(1))
    assert again == sets  # reproducible from the generators


def test_uncond_ties_spread_over_seeds():
    # every draw has a bright centre: EIG is 0 everywhere, the first location is a uniform pick
    clf = RegionClassifier(GEO.box(CENTRE), gain=12, bias=-3)
    firsts = {UncondPolicy(clf, DatasetSampler(region_dataset([255] * 4)), "edema", GEO, n_samples=4)
              .sequence(1, torch.Generator().manual_seed(k))[0] for k in range(30)}
    assert len(firsts) >= 10


def test_nongreedy_finds_the_only_informative_patch():
    clf = RegionClassifier(GEO.box(CENTRE), gain=12, bias=-6)
    pol = NonGreedyUncondPolicy(clf, DatasetSampler(region_dataset([0, 255] * 5)), "effusion", GEO,
                                n_samples=6, n_sequences=30, scans=2)
    best = pol.sequence(2, torch.Generator().manual_seed(1))
    has_centre = (pol.candidates[2] == CENTRE).any(1)
    assert has_centre.any() and CENTRE in best


def test_full_image_policy():
    pol = FullImagePolicy()
    assert pol.observes_everything and pol.name == "full"
    assert not RandomPolicy(GEO).observes_everything


# ----------------------------------------------------------------------------- clairvoyant reference
def test_clairvoyant_scans_the_one_cell_the_classifier_reads_first():
    """A classifier that reads only the centre patch: on the true image only that scan moves the
    belief, so the clairvoyant scans it first; once it is seen nothing moves the belief any more."""
    clf = RegionClassifier(GEO.box(CENTRE))
    images = region_dataset([255, 200]).images  # (2, 1, 32, 32): bright centre patch, zero elsewhere
    pol = ClairvoyantPolicy(clf, "effusion", GEO)
    state = ScanState.empty(2, 1, 32)
    state.truth = images
    assert pol.next_locations(state, torch.Generator().manual_seed(0)).tolist() == [CENTRE, CENTRE]
    scores = pol.scores(state)  # (B, L)
    assert scores.shape == (2, GEO.num_locations) and (scores[:, CENTRE] > 0).all()
    others = torch.ones(GEO.num_locations, dtype=torch.bool)
    others[CENTRE] = False
    overlap = torch.tensor([bool((GEO.mask([l]) * GEO.mask([CENTRE])).sum() > 0) for l in range(GEO.num_locations)])
    assert (scores[:, others & ~overlap] == 0).all()  # cells that do not touch the box change nothing
    after = state.scan(images, torch.tensor([CENTRE, CENTRE]), GEO)
    assert torch.equal(after.truth, images)  # the truth travels with the state
    assert float(pol.scores(after).abs().max()) < 1e-6


def test_clairvoyant_needs_the_truth_and_never_reads_labels():
    clf = RegionClassifier(GEO.box(CENTRE))
    pol = ClairvoyantPolicy(clf, "effusion", GEO)
    assert pol.reads_truth and not RandomPolicy(GEO).reads_truth
    with pytest.raises(UserError, match="true test images"):
        pol.next_locations(ScanState.empty(1, 1, 32))
    # the choices depend on the images alone: the same images with other labels give the same scans
    a, b = region_dataset([255, 0, 128]), region_dataset([255, 0, 128])
    b.labels = 1 - b.labels
    picks = []
    for ds in (a, b):
        state = ScanState.empty(3, 1, 32)
        state.truth = ds.images
        picks.append(pol.next_locations(state, torch.Generator().manual_seed(3)).tolist())
    assert picks[0] == picks[1] and picks[0][0] == CENTRE and picks[0][2] == CENTRE
