import errno
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from boed.classifier import AVPClassifier, AVPConfig
from boed.baselines.policies import ClairvoyantPolicy, NonGreedyUncondPolicy
from boed.evaluation.config import CONFIG_NAME, EvalConfig, select_test_indices, t1_generator
from boed.evaluation.loop import evaluate, shard_positions
from boed.evaluation.methods import BuildContext, build_policies, parse_methods
from boed.evaluation.records import RecordsWriter, load_records, missing_records, read_records_file, records_path
from boed.evaluation.report import CSV_COLUMNS
from boed.evaluation.run import finish
from boed.geometry import ScanGeometry
from boed.policies import Policy
from boed.samplers import DatasetSampler
from xray.cli_base import parse_shard
from xray.errors import UserError
from xray.integrity import LINE_KEY, open_line, seal_line

S = 64
L = ScanGeometry(S).num_locations


class TinySet:
    """A stand-in test split: uint8 images and 0/1 labels."""

    def __init__(self, n=10, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 1, S, S), generator=g, dtype=torch.uint8)
        self.labels = (torch.rand(n, 15, generator=g) > 0.5).float().numpy()
        self.image_size = S

    def __len__(self):
        return len(self.images)

    def get_batch(self, idx):
        return self.images[torch.as_tensor(idx)]


class RandomStandIn(Policy):
    """Random locations from the generator (the policy's only randomness)."""

    name = "random"

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def next_locations(self, state, generator=None):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # a kill in the middle of the run
        return torch.randint(L, (state.batch_size,), generator=generator)


class CachedStandIn(Policy):
    """Like Uncond: a sequence drawn once (from the ``prime`` generator) and cached."""

    name = "uncond"

    def __init__(self):
        self._seq = None

    def reset(self):
        self._seq = None

    def prime(self, scans, first_generator=None, generator=None):
        self.sequence(scans, generator)

    def sequence(self, T, generator=None):
        if self._seq is None:
            self._seq = torch.randint(L, (T,), generator=generator).tolist()
        return self._seq[:T]

    def next_locations(self, state, generator=None):
        t = len(state.locations[0])
        return torch.full((state.batch_size,), self.sequence(t + 1, generator)[t], dtype=torch.long)


class FullStandIn(Policy):
    name, observes_everything = "full", True

    def next_locations(self, state, generator=None):
        raise AssertionError("never called")


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return AVPClassifier(AVPConfig(arch="tiny", image_size=S, width=4)).eval()


def _cfg(dataset, **kw):
    base = dict(tasks=("effusion", "edema"), methods=("random", "uncond", "full"), scans=3, seed=1,
                indices=select_test_indices(len(dataset), 7, seed=1), batch_size=3, image_size=S, n_boot=50)
    base.update(kw)
    return EvalConfig(**base)


def _policies(cfg, fail_after=None):
    out = {}
    for m, t in cfg.jobs():
        out[(m, t)] = {"random": lambda: RandomStandIn(fail_after), "uncond": CachedStandIn, "full": FullStandIn}[m]()
    return out


def _canon(recs):
    return sorted((json.dumps({k: v for k, v in r.items() if k != "pos"}, sort_keys=True) for r in recs))


def test_records_content(tmp_path, classifier):
    data = TinySet()
    cfg = _cfg(data)
    evaluate(_policies(cfg), classifier, data, cfg, tmp_path, progress=False)
    recs = load_records(tmp_path)
    # random and full are task-free (scanned once), uncond once per task
    assert len(recs) == 7 * (1 + 2 + 1) and missing_records(tmp_path, cfg) == 0
    assert {r["repeat"] for r in recs if r["method"] == "full"} == {None}  # full does not depend on the repeat
    assert {r["fp"] for r in recs} == {cfg.fingerprint_digest()}
    empty = classifier.predict_proba(torch.zeros(1, 1, S, S, dtype=torch.uint8), torch.zeros(1, 1, S, S))[0]
    for r in recs:
        P = np.array(r["probs"])
        assert P.shape == (4, 15)
        np.testing.assert_array_equal(r["labels"], data.labels[r["index"]])
        if r["method"] == "full":
            assert r["locations"] == [] and (P == P[0]).all()
            x = data.get_batch([r["index"]])
            full = classifier.predict_proba(x, torch.ones(1, 1, S, S))[0]
            np.testing.assert_allclose(P[0], full.numpy(), rtol=1e-5, atol=1e-6)
        else:
            assert len(r["locations"]) == 3 and all(0 <= l < L for l in r["locations"])
            np.testing.assert_allclose(P[0], empty.numpy(), rtol=1e-5, atol=1e-6)
    uncond = [r for r in recs if r["method"] == "uncond"]
    assert len({tuple(r["locations"]) for r in uncond if r["task"] == "Effusion"}) == 1


def test_probabilities_follow_the_scans(tmp_path, classifier):
    """Re-scoring the recorded locations by hand gives the recorded probabilities."""
    data = TinySet()
    cfg = _cfg(data, methods=("random",), tasks=("effusion",))
    evaluate(_policies(cfg), classifier, data, cfg, tmp_path, progress=False)
    g = ScanGeometry(S)
    for r in load_records(tmp_path)[:3]:
        x = data.get_batch([r["index"]])
        for t in range(1, 4):
            m = g.mask(r["locations"][:t])[None]
            p = classifier.predict_proba(x * m.to(torch.uint8), m)[0]
            np.testing.assert_allclose(r["probs"][t], p.numpy(), rtol=1e-5, atol=1e-6)


def test_resume_after_kill_gives_same_records(tmp_path, classifier):
    data = TinySet()
    cfg = _cfg(data)
    evaluate(_policies(cfg), classifier, data, cfg, tmp_path / "ref", progress=False)
    ref = _canon(load_records(tmp_path / "ref"))

    # kill in the second batch of the random policy (3 images x 3 scans per batch), then tear a line
    with pytest.raises(KeyboardInterrupt):
        evaluate(_policies(cfg, fail_after=11), classifier, data, cfg, tmp_path / "run", progress=False)
    path = records_path(tmp_path / "run", (0, 1))
    n_before = len(load_records(tmp_path / "run"))
    assert 0 < n_before < len(ref)
    with open(path, "a") as f:
        f.write('{"method": "random", "ta')  # torn write
    evaluate(_policies(cfg), classifier, data, cfg, tmp_path / "run", progress=False)  # fresh policies, resumed
    assert _canon(load_records(tmp_path / "run")) == ref
    lines = open(path).read().splitlines()
    assert len(lines) == 1 + len(ref) and '"header"' in lines[0]  # header, no duplicates, torn line gone


def test_records_independent_of_shards_and_of_batch_size_up_to_float32(tmp_path, classifier):
    data = TinySet()
    cfg = _cfg(data, batch_size=2)
    evaluate(_policies(cfg), classifier, data, cfg, tmp_path / "ref", progress=False)
    for i in range(3):
        evaluate(_policies(cfg), classifier, data, cfg, tmp_path / "sharded", shard=(i, 3), progress=False)
        if i < 2:
            assert missing_records(tmp_path / "sharded", cfg) > 0
    assert len(list((tmp_path / "sharded").glob("records-*.jsonl"))) == 3
    assert _canon(load_records(tmp_path / "sharded")) == _canon(load_records(tmp_path / "ref"))  # exactly
    cfg3 = _cfg(data, batch_size=3)
    evaluate(_policies(cfg3), classifier, data, cfg3, tmp_path / "b3", progress=False)
    got = {(r["method"], r["task"], r["index"]): r for r in load_records(tmp_path / "b3")}
    want = {(r["method"], r["task"], r["index"]): r for r in load_records(tmp_path / "ref")}
    assert got.keys() == want.keys()
    for k, r in want.items():  # same scans; probabilities equal up to float32 batching noise
        assert got[k]["locations"] == r["locations"]
        np.testing.assert_allclose(got[k]["probs"], r["probs"], rtol=1e-5, atol=1e-6)
    # so the batch size is fingerprinted: a resume with another one is refused, naming the flag
    with pytest.raises(UserError, match=r"^--batch-size changed: the evaluation in \S+ref was made with 2, this run has 3; "):
        evaluate(_policies(cfg3), classifier, data, cfg3, tmp_path / "ref", progress=False)


def test_a_batch_cut_by_a_kill_is_recomputed_whole(tmp_path):
    """Records of a batch whose write was cut (some lines written) equal an uninterrupted run's bit
    for bit: the whole batch runs again, so every image is scored with the same batch neighbours."""
    class BatchDependent(AVPClassifier):  # a real classifier's batched convolutions, exaggerated
        def predict_proba(self, x, mask, chunk_size=None):
            return super().predict_proba(x, mask, chunk_size=chunk_size) * (1 - 1e-3 * len(x))

    torch.manual_seed(0)
    classifier = BatchDependent(AVPConfig(arch="tiny", image_size=S, width=4)).eval()
    data = TinySet()
    cfg = _cfg(data, methods=("random",))
    evaluate(_policies(cfg), classifier, data, cfg, tmp_path / "ref", progress=False)
    ref = _canon(load_records(tmp_path / "ref"))
    run = tmp_path / "run"
    evaluate(_policies(cfg), classifier, data, cfg, run, progress=False)
    path = records_path(run, (0, 1))
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]))  # a kill mid-write: batch [3, 6) keeps 2 of its 3 records, [6, 7) none
    evaluate(_policies(cfg), classifier, data, cfg, run, progress=False)
    assert _canon(load_records(run)) == ref


def test_batch_rng_mode_resumes_exactly(tmp_path, classifier):
    data = TinySet()
    cfg = _cfg(data, rng="batch", methods=("random",))
    evaluate(_policies(cfg), classifier, data, cfg, tmp_path / "ref", progress=False)
    ref = _canon(load_records(tmp_path / "ref"))
    with pytest.raises(KeyboardInterrupt):
        evaluate(_policies(cfg, fail_after=4), classifier, data, cfg, tmp_path / "run", progress=False)
    evaluate(_policies(cfg), classifier, data, cfg, tmp_path / "run", progress=False)
    assert _canon(load_records(tmp_path / "run")) == ref
    with pytest.raises(UserError, match="--batch-size changed: .* made with 3, this run has 2"):  # batch size changes the numbers
        evaluate(_policies(cfg), classifier, data, _cfg(data, rng="batch", methods=("random",), batch_size=2),
                 tmp_path / "run", progress=False)


def test_different_config_in_same_out_dir_is_user_error(tmp_path, classifier):
    data = TinySet()
    cfg = _cfg(data, methods=("full",))
    evaluate(_policies(cfg), classifier, data, cfg, tmp_path, progress=False)
    with pytest.raises(UserError, match="--scans changed: .* made with 3, this run has 2"):
        cfg2 = _cfg(data, methods=("full",), scans=2)
        evaluate(_policies(cfg2), classifier, data, cfg2, tmp_path, progress=False)


def test_parsing_and_selection():
    assert parse_methods("eig, epe,random,uncond,nongreedy,full,eig") == ("eig-ipa", "epe-ipa", "random", "uncond", "nongreedy", "full")
    with pytest.raises(UserError, match="unknown method 'foo'"):
        parse_methods("eig,foo")
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) == (0, 1)
    for bad in ("4/4", "a/b", "1"):
        with pytest.raises(UserError):
            parse_shard(bad)
    with pytest.raises(UserError, match="unknown illness"):
        EvalConfig(tasks=("flu",))
    idx = select_test_indices(100, 10, seed=3)
    assert idx == select_test_indices(100, 10, seed=3) and len(set(idx)) == 10
    with pytest.warns(UserWarning, match="larger than the test set"):
        assert sorted(select_test_indices(5, 9, seed=0)) == list(range(5))
    pos = [shard_positions(10, 3, (i, 2)) for i in range(2)]
    assert pos == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9]]


def test_repeats_redraw_policy_randomness_and_resume(tmp_path, classifier):
    data = TinySet()
    cfg = _cfg(data, repeats=3)
    evaluate(_policies(cfg), classifier, data, cfg, tmp_path / "ref", progress=False)
    recs = load_records(tmp_path / "ref")
    assert len(recs) == 7 * 3 * (1 + 2) + 7  # random (task-free) and uncond x 2 tasks, per repeat; full once
    assert missing_records(tmp_path / "ref", cfg) == 0
    by = {}
    for r in recs:
        by.setdefault((r["method"], r["task"], r["repeat"]), {})[r["index"]] = r["locations"]
    for task in ("Effusion", "Edema"):  # the cached sequence is drawn again for every repeat
        seqs = [next(iter(by["uncond", task, k].values())) for k in range(3)]
        assert all(len({tuple(v) for v in by["uncond", task, k].values()}) == 1 for k in range(3))
        assert len({tuple(q) for q in seqs}) > 1
    for i in cfg.indices:  # Random's per-image streams differ between repeats
        assert len({tuple(by["random", None, k][i]) for k in range(3)}) > 1
    ref = _canon(recs)
    with pytest.raises(KeyboardInterrupt):  # a kill in the second repeat of random
        evaluate(_policies(cfg, fail_after=30), classifier, data, cfg, tmp_path / "run", progress=False)
    evaluate(_policies(cfg), classifier, data, cfg, tmp_path / "run", progress=False)
    assert _canon(load_records(tmp_path / "run")) == ref


def test_more_repeats_extend_an_evaluation_to_the_records_of_a_fresh_run(tmp_path, classifier):
    """A resume with a larger --repeats keeps every record (bytes unchanged), computes only the new
    repeats, and ends with the records and metrics of an evaluation run with that many repeats from
    the start; a smaller --repeats and a record outside its own fingerprint's repeats are refused."""
    data = TinySet()
    cfg2, cfg3 = _cfg(data, repeats=2), _cfg(data, repeats=3)
    evaluate(_policies(cfg2), classifier, data, cfg2, tmp_path / "grown", progress=False)
    path = records_path(tmp_path / "grown", (0, 1))
    before = path.read_bytes()
    pols = _policies(cfg3)
    evaluate(pols, classifier, data, cfg3, tmp_path / "grown", progress=False)
    assert path.read_bytes().startswith(before)  # kept as they were
    assert pols[("random", None)].calls == 3 * 7  # only repeat 2 was scanned (T = 3 scans of 7 images)
    evaluate(_policies(cfg3), classifier, data, cfg3, tmp_path / "fresh", progress=False)

    def content(recs):
        return sorted(json.dumps({k: v for k, v in r.items() if k not in ("pos", "fp")}, sort_keys=True) for r in recs)

    grown, fresh = load_records(tmp_path / "grown"), load_records(tmp_path / "fresh")
    assert content(grown) == content(fresh) and len(fresh) == 7 * 3 * 3 + 7
    assert {r["fp"] for r in grown} == {cfg2.fingerprint_digest(), cfg3.fingerprint_digest()}
    assert missing_records(tmp_path / "grown", cfg3) == 0
    for run in ("grown", "fresh"):
        finish(tmp_path / run)
    assert (tmp_path / "grown" / "metrics.csv").read_bytes() == (tmp_path / "fresh" / "metrics.csv").read_bytes()
    assert json.loads((tmp_path / "grown" / CONFIG_NAME).read_text())["repeats"] == 3
    with pytest.raises(UserError, match=r"^--repeats changed: .* was made with 3, this run has 2"):
        evaluate(_policies(cfg2), classifier, data, cfg2, tmp_path / "grown", progress=False)
    # a record of repeat 2 stamped with the 2-repeat fingerprint was not made by that evaluation
    lines = path.read_text().splitlines()
    rec = open_line(lines[-1])
    assert rec["repeat"] == 2
    rec["fp"] = cfg2.fingerprint_digest()
    path.write_text("\n".join(lines[:-1] + [seal_line(rec)]) + "\n")
    with pytest.raises(UserError, match=f"fingerprint {cfg2.fingerprint_digest()}"):
        evaluate(_policies(cfg3), classifier, data, cfg3, tmp_path / "grown", progress=False)


def test_common_random_numbers_across_eig_completers(tmp_path, classifier):
    """Every EIG method makes the same t = 1 computation from the same draws: identical t = 1 records
    per repeat (computed once per repeat and shared), and new draws in every repeat."""
    data, train = TinySet(10), TinySet(30, seed=7)
    cfg = _cfg(data, methods=("eig-retrieval", "uncond", "nongreedy"), tasks=("effusion",), repeats=3, scans=2,
               n_samples=4, n_sequences=5, indices=[0, 1, 2, 3])
    ctx = BuildContext(cfg, classifier, ScanGeometry(S), torch.device("cpu"), train)
    evaluate(build_policies(cfg, ctx), classifier, data, cfg, tmp_path, progress=False)
    assert (ctx.first_cache.misses, ctx.first_cache.hits) == (3, 3)  # one t = 1 computation per repeat, shared
    recs = {(r["method"], r["repeat"], r["index"]): r for r in load_records(tmp_path)}
    firsts = set()
    for k in range(3):
        for i in cfg.indices:
            a, b = recs["eig-retrieval", k, i], recs["uncond", k, i]
            assert a["locations"][0] == b["locations"][0] and a["probs"][:2] == b["probs"][:2]
            firsts.add((k, a["locations"][0]))
    assert len({k for k, _ in firsts}) == 3 and len(firsts) == 3  # one first location per repeat
    # the non-greedy search used the same N dataset images as the t = 1 choice of its repeat
    pol = build_policies(cfg, ctx)[("nongreedy", "Effusion")]
    pol.prime(2, t1_generator(cfg.seed, "Effusion", 1), torch.Generator())
    want = DatasetSampler(train).sample(torch.zeros(1, 1, S, S, dtype=torch.uint8), torch.zeros(1, 1, S, S), 4,
                                        t1_generator(cfg.seed, "Effusion", 1))[0]
    assert torch.equal(pol.draws, want)


def test_nongreedy_records_use_the_budget_t_set(tmp_path, classifier):
    data, train = TinySet(), TinySet(12, seed=5)
    cfg = _cfg(data, methods=("nongreedy",), tasks=("effusion",), repeats=2)
    pol = NonGreedyUncondPolicy(classifier, DatasetSampler(train), "effusion", ScanGeometry(S), n_samples=3,
                                n_sequences=6, scans=3)
    evaluate({("nongreedy", "Effusion"): pol}, classifier, data, cfg, tmp_path, progress=False)
    g = ScanGeometry(S)
    recs = load_records(tmp_path)
    assert {r["repeat"] for r in recs} == {0, 1}
    for r in recs[:4]:
        assert [len(s) for s in r["sets"]] == [1, 2, 3] and r["locations"] == r["sets"][-1]
        x = data.get_batch([r["index"]])
        for t in (1, 2, 3):
            m = g.mask(r["sets"][t - 1])[None]
            p = classifier.predict_proba(x * m.to(torch.uint8), m)[0]
            np.testing.assert_allclose(r["probs"][t], p.numpy(), rtol=1e-5, atol=1e-6)


def test_resume_with_other_settings_is_refused(tmp_path, classifier):
    data = TinySet()
    cfg = _cfg(data, methods=("random",), temperature=1.0, data={"test": "aaaa", "train": None}, repeats=2)
    evaluate(_policies(cfg), classifier, data, cfg, tmp_path, progress=False)
    for change, flag in (({"temperature": 0.5}, "--temperature"), ({"data": {"test": "bbbb", "train": None}}, "the test data"),
                         ({"repeats": 1}, "--repeats"), ({"n_sequences": 5}, "--n-sequences"), ({"seed": 2}, "--seed"),
                         ({"rng": "batch"}, "--rng"), ({"batch_size": 2}, "--batch-size")):
        other = _cfg(data, methods=("random",), **{"temperature": 1.0, "data": {"test": "aaaa", "train": None},
                                                   "repeats": 2, **change})
        with pytest.raises(UserError, match=rf"^{re.escape(flag)}.* changed: .*--restart"):
            evaluate(_policies(other), classifier, data, other, tmp_path, progress=False)
    # without eval_config.json the records files' headers still refuse it ...
    (tmp_path / CONFIG_NAME).unlink()
    other = _cfg(data, methods=("random",), temperature=0.5, data={"test": "aaaa", "train": None}, repeats=2)
    with pytest.raises(UserError, match=r"--temperature changed: \S+records.jsonl was made with 1.0, this run has 0.5"):
        evaluate(_policies(other), classifier, data, other, tmp_path, progress=False)
    # ... and so does every record's own fingerprint digest
    path = records_path(tmp_path, (0, 1))
    lines = path.read_text().splitlines()
    rec = open_line(lines[1])
    rec["fp"], rec["index"] = "0123456789abcdef", 10 ** 6
    path.write_text("\n".join(lines + [seal_line(rec)]) + "\n")
    with pytest.raises(UserError, match="fingerprint 0123456789abcdef"):
        evaluate(_policies(cfg), classifier, data, cfg, tmp_path, progress=False)


def test_edited_damaged_or_duplicated_records_are_refused(tmp_path, classifier):
    """Valid-JSON edits of a record (a probability, a label), a damaged key and an inserted
    duplicate with other content are refused in one line; records of an older boed (no checksums)
    are still read."""
    data = TinySet()
    cfg = _cfg(data, methods=("random",), temperature=1.0, data={"test": "aaaa", "train": None})
    evaluate(_policies(cfg), classifier, data, cfg, tmp_path, progress=False)
    path = records_path(tmp_path, (0, 1))
    good = path.read_text()
    lines = good.splitlines()
    assert all(LINE_KEY in json.loads(l) for l in lines)
    assert len(load_records(tmp_path)) == len(lines) - 1
    changed = json.loads(lines[1])
    changed["probs"][0][0] = 0.5 if changed["probs"][0][0] != 0.5 else 0.25  # a valid-JSON edit of one probability
    edits = {"probability": json.dumps(changed), "key": lines[1].replace('"method"', '"methud"', 1)}
    for what, line in edits.items():
        assert line != lines[1], what
        path.write_text("\n".join([lines[0], line, *lines[2:]]) + "\n")
        with pytest.raises(UserError, match="line 2"):
            load_records(tmp_path)
    dup = open_line(lines[1])
    dup["probs"][0][0] = 0.123456
    path.write_text("\n".join([*lines, seal_line(dup)]) + "\n")  # a second, different record of the same key
    with pytest.raises(UserError, match="two different records"):
        load_records(tmp_path)
    path.write_text("\n".join(json.dumps(open_line(l)) for l in lines) + "\n")  # an older boed's file
    assert len(load_records(tmp_path)) == len(lines) - 1


def test_writers_never_touch_each_others_files(tmp_path, classifier):
    data = TinySet()
    cfg = _cfg(data)
    evaluate(_policies(cfg), classifier, data, cfg, tmp_path, shard=(0, 2), progress=False)
    other = records_path(tmp_path, (0, 2))
    with open(other, "a") as f:  # shard 0 is "alive", in the middle of writing a line
        f.write('{"method": "random", "ta')
    before = other.read_bytes()
    evaluate(_policies(cfg), classifier, data, cfg, tmp_path, shard=(1, 2), progress=False)
    assert other.read_bytes() == before  # shard 1 read it (skipping the torn line) and left it alone
    assert missing_records(tmp_path, cfg) == 0
    # a second writer of the same shard is refused while the first holds its file
    holder = RecordsWriter(records_path(tmp_path, (1, 2)), {})
    try:
        with pytest.raises(UserError, match="another process is writing"):
            evaluate(_policies(cfg), classifier, data, cfg, tmp_path, shard=(1, 2), progress=False)
    finally:
        holder.close()


def test_concurrent_shard_writers_lose_nothing(tmp_path, classifier):
    import threading

    data = TinySet(12)
    cfg = _cfg(data, indices=select_test_indices(12, 12, seed=0), batch_size=1, repeats=2)
    errors = []

    def run(i):
        try:
            evaluate(_policies(cfg), classifier, data, cfg, tmp_path, shard=(i, 2), progress=False)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert missing_records(tmp_path, cfg) == 0 and len(load_records(tmp_path)) == len(cfg.expected_keys())
    for i in range(2):
        text = records_path(tmp_path, (i, 2)).read_text()
        assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())  # no torn line


def test_torchrun_ranks_split_a_shard():
    n, B = 23, 2
    for shard_n in (1, 3):
        for i in range(shard_n):
            whole = shard_positions(n, B, (i, shard_n))
            parts = [shard_positions(n, B, (i, shard_n), (r, 2)) for r in range(2)]
            assert sorted(parts[0] + parts[1]) == whole and not set(parts[0]) & set(parts[1])
    assert records_path(Path("o"), (1, 3), (0, 2)).name == "records-001-of-003-rank-000-of-002.jsonl"
    assert records_path(Path("o"), (0, 1), (1, 2)).name == "records-001-of-002.jsonl"


def test_merge_refuses_mixed_shards(tmp_path, classifier):
    data = TinySet()
    cfg = _cfg(data, methods=("random",))
    evaluate(_policies(cfg), classifier, data, cfg, tmp_path / "a", shard=(0, 2), progress=False)
    other = _cfg(data, methods=("random",), seed=7, indices=cfg.indices)
    evaluate(_policies(other), classifier, data, other, tmp_path / "b", shard=(1, 2), progress=False)
    records_path(tmp_path / "b", (1, 2)).rename(records_path(tmp_path / "a", (1, 2)))
    with pytest.raises(UserError, match=r"shard file .*records-001-of-002.jsonl was made with seed=1.*seed=7"):
        finish(tmp_path / "a")


# ----------------------------------------------------------------------------- the CLI, end to end
@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    import dataclasses

    from ipa_core.config import get_config
    from ipa_core.ipa import IPA, IPAConfig
    from tests.xray.conftest import finding_for, make_nih

    root = tmp_path_factory.mktemp("evalcli")
    torch.manual_seed(0)
    AVPClassifier(AVPConfig(arch="tiny", image_size=S, width=4)).save_pretrained(root / "avp" / "model")
    AVPClassifier(AVPConfig(arch="tiny", image_size=128, width=4)).save_pretrained(root / "avp128")
    AVPClassifier(AVPConfig(arch="tiny", image_size=S, width=4)).save_pretrained(root / "avp_b")  # other weights
    vae_cfg = dataclasses.replace(get_config("tiny"), shift=-127.5, scale=1 / 64)
    IPA(IPAConfig.from_vae(vae_cfg)).save_pretrained(root / "ipa" / "model")
    IPA(IPAConfig.from_vae(vae_cfg, objective="reverse")).save_pretrained(root / "ipar" / "model")
    small = dataclasses.replace(vae_cfg, image_size=16, width=16, custom_width_str="", num_mixtures=2,
                                enc_blocks="16x1,16d2,8x1,8d2,4x1,4d4,1x1", dec_blocks="1x1,4m1,4x1,8m4,8x1,16m8,16x1")
    IPA(IPAConfig.from_vae(small)).save_pretrained(root / "ipa16")
    def findings(i: int) -> str:  # both classes of Effusion and Edema among the 4 test images of seed 0
        base = [x for x in finding_for(i).split("|") if x not in ("Effusion", "Edema", "No Finding")]
        return "|".join(base + (["Effusion", "Edema"] if i % 2 else [])) or "No Finding"

    nih = make_nih(root / "nih", n=40, px=48, findings=findings)
    make_nih(root / "nih2", n=40, px=40, findings=findings)  # the same size of set and labels, other images
    data = ["--data", "chestxray", "--data-root", str(nih), "--cache-dir", str(root / "cache")]
    return root, data


def _cli(argv, capsys):
    from xray.cli_base import make_main

    main = make_main("boed", "test", {"evaluate": "boed.commands.evaluate"})
    with pytest.raises(SystemExit) as e:
        main(["evaluate", *argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_evaluate_all_methods_and_cross_task(cli_setup, tmp_path, capsys):
    import csv


    root, data = cli_setup
    common = ["--ipa", str(root / "ipa"), "--avp", str(root / "avp"), "--illness", "effusion", "--scans", "2",
              "--n-test", "4", "--n-samples", "2", "--n-sequences", "4", "--n-boot", "30", "--batch-size", "3",
              "--repeats", "2", "--no-progress", *data]
    code, out, err = _cli(["--methods", "eig,random,uncond,nongreedy,full", "--cross-task", "edema",
                           "--out", str(tmp_path / "ev"), *common], capsys)
    assert code == 0, err
    with open(tmp_path / "ev" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert {r["method"] for r in rows} == {"eig-ipa", "random", "uncond", "nongreedy", "full"}
    assert {r["illness"] for r in rows} == {"Effusion", "Edema"} and {r["t"] for r in rows} == {"0", "1", "2"}
    assert all(r["n"] == "4" and r["repeats"] == ("1" if r["method"] == "full" else "2") for r in rows)  # full: repeat-free
    for name in ("auroc.png", "nll.png", "paired.csv", "cross_task.csv", "cross_task_eig-ipa.png"):
        assert (tmp_path / "ev" / name).is_file()
    with open(tmp_path / "ev" / "paired.csv") as f:
        assert {r["t"] for r in csv.DictReader(f)} == {"1", "2", "2-2"}
    recs = load_records(tmp_path / "ev")
    eig = [r for r in recs if r["method"] == "eig-ipa"]
    assert len(eig) == 2 * 2 * 4  # tasks x repeats x images
    assert all(len(set(r["locations"])) == 2 for r in eig)  # a scanned patch is never chosen again
    for task in ("Effusion", "Edema"):
        for rep in (0, 1):  # common random numbers: eig-ipa and uncond make identical t = 1 records
            e = {r["index"]: r for r in eig if r["task"] == task and r["repeat"] == rep}
            u = {r["index"]: r for r in recs if r["method"] == "uncond" and r["task"] == task and r["repeat"] == rep}
            assert e.keys() == u.keys() and len({r["locations"][0] for r in e.values()}) == 1
            for i in e:
                assert e[i]["locations"][0] == u[i]["locations"][0] and e[i]["probs"][:2] == u[i]["probs"][:2]
    ng = [r for r in recs if r["method"] == "nongreedy"]
    assert all(len(r["sets"]) == 2 and [len(s) for s in r["sets"]] == [1, 2] for r in ng)

    # shards across "machines", then --merge: the same records and metrics
    for i in range(2):
        code, out, err = _cli(["--methods", "random", "--shard", f"{i}/2", "--out", str(tmp_path / "sh"), *common], capsys)
        assert code == 0, err
        if i == 0:
            assert "--merge" in out and not (tmp_path / "sh" / "metrics.csv").exists()
    code, out, err = _cli(["--merge", "--out", str(tmp_path / "sh")], capsys)
    assert code == 0, err
    code, out, err = _cli(["--methods", "random", "--out", str(tmp_path / "single"), *common], capsys)
    assert (tmp_path / "sh" / "metrics.csv").read_text() == (tmp_path / "single" / "metrics.csv").read_text()


def _as_before_batch_size_was_fingerprinted(out: Path) -> str:
    """Rewrite an evaluation folder as an older boed wrote it: no batch_size in any fingerprint, the
    records' digests of that fingerprint, every line resealed. Returns that digest."""
    cfg = json.loads((out / CONFIG_NAME).read_text())
    cfg["fingerprint"].pop("batch_size")
    old = EvalConfig.from_dict(cfg)
    assert not old.batch_in_fingerprint and "batch_size" not in old.fingerprint()
    fp = old.fingerprint_digest()
    cfg["fp"] = fp
    (out / CONFIG_NAME).write_text(json.dumps(cfg))
    for path in sorted(out.glob("records*.jsonl")):
        lines = []
        for n, line in enumerate(path.read_text().splitlines()):
            obj = open_line(line, source=str(path), lineno=n + 1, require=True)
            if "header" in obj:
                obj["header"]["fingerprint"].pop("batch_size")
                obj["header"]["fp"] = fp
                obj["header"]["config"]["fingerprint"] = obj["header"]["fingerprint"]
            else:
                obj["fp"] = fp
            lines.append(seal_line(obj))
        path.write_text("\n".join(lines) + "\n")
    return fp


def test_an_evaluation_begun_before_batch_size_was_fingerprinted_resumes_and_merges(cli_setup, tmp_path, capsys):
    """Shards written by an older boed (no batch size in the fingerprint) are merged and resumed by
    this one as they are, never refused or recomputed (a power study in flight across the upgrade)."""
    root, data = cli_setup
    common = ["--avp", str(root / "avp"), "--illness", "effusion", "--scans", "2", "--n-test", "4", "--methods", "random",
              "--n-boot", "20", "--no-progress", "--out", str(tmp_path / "ev"), *data]
    for i in range(2):
        code, out, err = _cli(common + ["--shard", f"{i}/2"], capsys)
        assert code == 0, err
    (tmp_path / "ev" / "metrics.csv").unlink(missing_ok=True)
    fp = _as_before_batch_size_was_fingerprinted(tmp_path / "ev")
    records = {p.name: p.read_bytes() for p in (tmp_path / "ev").glob("records*.jsonl")}
    code, out, err = _cli(["--merge", "--out", str(tmp_path / "ev")], capsys)
    assert code == 0, err
    assert (tmp_path / "ev" / "metrics.csv").is_file()
    code, out, err = _cli(common + ["--shard", "0/2", "--batch-size", "4"], capsys)  # a resume: nothing left to do
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "ev").glob("records*.jsonl")} == records  # nothing recomputed
    assert json.loads((tmp_path / "ev" / CONFIG_NAME).read_text())["fp"] == fp  # still the folder's own fingerprint


def test_cli_errors_are_one_line(cli_setup, tmp_path, capsys):
    root, data = cli_setup
    base = ["--ipa", str(root / "ipa"), "--avp", str(root / "avp"), "--out", str(tmp_path / "e"), "--n-test", "4", *data]
    cases = [
        (["--methods", "eig,magic"], "unknown method 'magic'"),
        (["--illness", "flu"], "unknown illness 'flu'"),
        (["--avp", str(tmp_path / "none")], "no AVP model"),
        (["--avp", str(root / "avp128")], "works at"),
        (["--ipa", str(tmp_path / "none"), "--methods", "eig"], "ipa_core train --stage ipa"),
        (["--avp", str(root / "ipa")], "expected 'avp-cnn'"),
        (["--shard", "3/2"], "--shard"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--n-sequences", "0"], "--n-sequences must be >= 1"),
        (["--temperature", "0"], "--temperature: 0 is out of range"),
        (["--device", "tpu9"], "--device"),
        (["--methods", "eig,ipar"], "method eig-ipar needs --ipar RUN"),
        (["--methods", "ipa-under"], "method eig-ipa-under needs --ipa-under RUN"),
        (["--methods", "ipar", "--ipar", str(root / "ipa")], "objective 'forward', expected 'reverse'"),
        (["--methods", "eig,ipar", "--ipar", str(root / "ipar"), "--ipa", str(root / "ipa16")], "works at 16 px"),
        (["--restart", "--shard", "0/2"], "--restart with --shard"),
        # the 2 test images of seed 0 hold no Effusion positive: refused before any model work
        (["--n-test", "2"], "Effusion has 0 positives among the 2 test images (of 4 positives in the test split); "
                            "raise --n-test, draw with --draw stratified, or drop the task"),
        (["--n-test", "2", "--illness", "edema", "--cross-task", "no finding"], "Edema has 0 positives"),
    ]
    for extra, msg in cases:
        code, out, err = _cli(base + extra, capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (tmp_path / "e").exists(), extra  # nothing created by a refused command
    code, out, err = _cli(["--merge", "--out", str(tmp_path / "empty")], capsys)
    assert code == 2 and "no evaluation" in err
    # the same 2 images drawn stratified by Effusion hold one positive: evaluated
    strat = ["--illness", "effusion", "--n-test", "2", "--draw", "stratified", "--methods", "full", "--n-boot", "10", "--no-progress"]
    code, out, err = _cli(base + strat + ["--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    ok = ["--methods", "full", "--n-boot", "10", "--no-progress"]
    code, out, err = _cli(base + ok, capsys)
    assert code == 0, err
    code, out, err = _cli(base + ok + ["--avp", str(root / "avp_b")], capsys)  # resume with another model
    assert code == 2 and "--avp changed" in err and "--restart" in err
    code, out, err = _cli(base + ok + ["--data-root", str(root / "nih2")], capsys)  # another data root
    assert code == 2 and "the test data (--data/--data-root) changed" in err, err
    # a changed flag is named as the flag, and refused before any data is prepared (a new cache would be built)
    fresh = ["--cache-dir", str(tmp_path / "new-cache")]
    for extra, said in ((["--seed", "1"], "--seed changed: the evaluation in {} was made with 0, this run has 1; "),
                        (["--rng", "batch"], "--rng changed: the evaluation in {} was made with image, this run has batch; "),
                        (["--batch-size", "3"], "--batch-size changed: the evaluation in {} was made with 16, this run has 3; ")):
        code, out, err = _cli(base + ok + extra + fresh, capsys)
        assert code == 2 and err.startswith("error: " + said.format(tmp_path / "e")) and len(err.splitlines()) == 1, err
        assert not (tmp_path / "new-cache").exists(), extra  # nothing created by a refused command
    code, out, err = _cli(base + ok + ["--avp", str(root / "avp_b"), "--restart"], capsys)  # start over
    assert code == 0, err
    assert [p.name for p in tmp_path.glob("e.old-*")] and "--restart: moved" in out
    assert json.loads((tmp_path / "e" / CONFIG_NAME).read_text())["paths"]["avp"] == str(root / "avp_b")


@pytest.mark.slow
def test_torchrun_two_ranks_merge(cli_setup, tmp_path):
    """Two torchrun ranks take one shard each; rank 0 waits and writes the metrics."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root, data = cli_setup
    boed_script = Path(sys.executable).parent / "boed"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None or not boed_script.exists():
        pytest.skip("torchrun or the boed console script is not installed in this environment")
    argv = [torchrun, "--nproc-per-node", "2", str(boed_script), "evaluate", "--methods", "random,full", "--scans", "2",
            "--n-boot", "20", "--batch-size", "2", "--avp", str(root / "avp"), "--out", str(tmp_path / "ev"),
            "--no-progress", *data]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((tmp_path / "ev").glob("records-*-of-002.jsonl"))) == 2
    assert (tmp_path / "ev" / "metrics.csv").is_file()


def test_cli_evaluates_amortised_policies_and_refuses_a_wrong_one(cli_setup, tmp_path, capsys):
    from boed.amortised.network import PolicyConfig, PolicyNet

    root, data = cli_setup
    torch.manual_seed(1)
    for method, name in (("distill", "distilled"), ("gdfs", "gdfs")):
        PolicyNet(PolicyConfig(method=method, illness="effusion", image_size=S, patch_size=S // 4, grid=17, width=4,
                               scans=2)).save_pretrained(root / f"pol-{name}" / "model")
    common = ["--avp", str(root / "avp"), "--illness", "effusion", "--scans", "2", "--n-test", "4", "--n-boot", "20",
              "--repeats", "2", "--no-progress", *data]
    code, out, err = _cli(["--methods", "distilled,gdfs,random", "--distilled", str(root / "pol-distilled"),
                           "--gdfs", str(root / "pol-gdfs"), "--out", str(tmp_path / "ev"), *common], capsys)
    assert code == 0, err
    recs = load_records(tmp_path / "ev")
    for m in ("distilled", "gdfs"):
        mine = [r for r in recs if r["method"] == m]
        assert len(mine) == 2 * 4 and all(len(set(r["locations"])) == 2 for r in mine)
    # a method without its policy, or a policy of another illness: one line, nothing created
    for argv in (["--methods", "gdfs"], ["--methods", "distilled", "--distilled", str(root / "pol-distilled"),
                                         "--illness", "edema"]):
        code, out, err = _cli([*common, *argv, "--out", str(tmp_path / "bad")], capsys)
        assert code == 2 and err.count("\n") == 1 and not (tmp_path / "bad").exists(), err


def test_records_writer_on_a_full_disk_says_one_line_and_keeps_complete_lines(tmp_path):
    path = tmp_path / "records.jsonl"
    w = RecordsWriter(path, {"x": 1})
    w.append([{"method": "random", "index": 0}])
    good = path.read_bytes()
    real = w._f

    class Full:  # the file, except that a write fills the disk halfway
        def __getattr__(self, name):
            return getattr(real, name)

        def write(self, b):
            real.write(b[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

    w._f = Full()
    with pytest.raises(UserError, match="no space left") as e:
        w.append([{"method": "random", "index": 1}])
    assert "\n" not in str(e.value)
    w._f = real
    w.close()
    assert path.read_bytes() == good and len(read_records_file(path)[1]) == 1


def test_clairvoyant_in_the_evaluator_sees_images_never_labels(tmp_path, classifier):
    """The evaluator hands the true images to a reads_truth policy only; scrambled labels give the
    same scans (it never reads them) and the records say what it chose."""
    geo = ScanGeometry(S)
    locs = []
    for k, flip in enumerate((False, True)):
        data = TinySet()
        if flip:
            data.labels = 1 - data.labels
        cfg = _cfg(data, tasks=("effusion",), methods=("clairvoyant",))
        pol = ClairvoyantPolicy(classifier, "effusion", geo)
        evaluate({("clairvoyant", "Effusion"): pol}, classifier, data, cfg, tmp_path / str(k), progress=False)
        recs = sorted(load_records(tmp_path / str(k)), key=lambda r: r["index"])
        assert recs and all(len(r["locations"]) == cfg.scans for r in recs)
        locs.append([r["locations"] for r in recs])
    assert locs[0] == locs[1]
    seen = []

    class Spy(RandomStandIn):
        def next_locations(self, state, generator=None):
            seen.append(state.truth)
            return super().next_locations(state, generator)

    data = TinySet()
    cfg = _cfg(data, tasks=("effusion",), methods=("random",))
    evaluate({("random", None): Spy()}, classifier, data, cfg, tmp_path / "spy", progress=False)
    assert seen and all(t is None for t in seen)  # an ordinary policy never gets the images
