"""Checkpoint integrity: a flipped bit anywhere falls back to the previous good checkpoint."""

from __future__ import annotations

import struct
import warnings
import zipfile

import pytest
import torch

from ipa_core.checkpoint import checkpoint_paths, load_latest_checkpoint, read_checkpoint, save_checkpoint
from ipa_core.trainer import fit
from ipa_core.vae_task import VAETask
from tests.ipa_core.test_trainer import ImageSet, flat, new_vae, tcfg
from xray.errors import UserError
from xray.integrity import sidecar_path

torch.set_num_threads(1)


def payload_offset(path, pick=max) -> int:
    """Byte offset of the middle of a tensor payload (the largest ``data/N`` entry) in a torch.save zip."""
    with zipfile.ZipFile(path) as z:
        info = pick((i for i in z.infolist() if "/data/" in i.filename and not i.filename.endswith("/")),
                    key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def flip_bit(path, offset: int, bit: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    fit(VAETask(new_vae()), ImageSet(), tcfg(steps=6, ckpt_every=3), run)
    ref = fit(VAETask(new_vae()), ImageSet(), tcfg(steps=6, ckpt_every=3), run.parent / "ref")
    return run, flat(ref)


def test_every_checkpoint_has_a_digest(trained):
    run, _ = trained
    for p in checkpoint_paths(run):
        assert sidecar_path(p).read_text().split() == [__import__("hashlib").sha256(p.read_bytes()).hexdigest(), p.name]


@pytest.mark.parametrize("where", ["tensor", "key"])
def test_flipped_bit_falls_back_to_the_previous_checkpoint(trained, tmp_path, where):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    latest = checkpoint_paths(run)[0]
    if where == "tensor":
        off = payload_offset(latest)
    else:  # a key name inside data.pkl (stored uncompressed)
        off = latest.read_bytes().index(b"decoder") + 2
    flip_bit(latest, off)
    with pytest.warns(UserWarning, match=r"ckpt-00000006.pt is damaged \(SHA-256.*falling back"):
        state = load_latest_checkpoint(run)
    assert state["step"] == 3
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = fit(VAETask(new_vae()), ImageSet(), tcfg(steps=6, ckpt_every=3), run)
    assert torch.equal(flat(out), trained[1])  # redone from step 3: the same model as an uninterrupted run


def test_checkpoint_without_digest_is_read_with_a_warning(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    latest = checkpoint_paths(run)[0]
    sidecar_path(latest).unlink()
    with pytest.warns(UserWarning, match="no recorded digest"):
        assert read_checkpoint(latest)["step"] == 6


def test_full_disk_is_one_line_and_leaves_old_checkpoints(tmp_path, monkeypatch):
    fit(VAETask(new_vae()), ImageSet(), tcfg(steps=3, ckpt_every=3), tmp_path)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    state = read_checkpoint(checkpoint_paths(tmp_path)[0])
    real_save = torch.save

    def full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1024 vs 960")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match=r"^no space left on /\S*.*need about .* MB, have .* MB") as e:
        save_checkpoint(tmp_path, {**state, "step": 9}, [3])
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # no temp file, no sidecar
    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(UserError, match="no space left.*need about"):  # checked before writing anything
        save_checkpoint(tmp_path, {**state, "step": 9}, [3])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


@pytest.mark.slow
def test_bit_flip_harness(trained, tmp_path, capsys):
    """Random single-bit flips anywhere in a checkpoint, a model.safetensors, a config.json and a
    prepared cache's files: every one is detected (fallback, refusal or repair), none is a traceback."""
    import random
    import shutil

    from ipa_core import VAE
    from tests.ipa_core.test_trainer import micro_cfg
    from tests.xray.conftest import make_nih
    from xray import cache
    from xray.integrity import DamagedError

    rng, n = random.Random(22), 32
    figures = {}

    def flip_random(path):
        data = bytearray(path.read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))

    # checkpoints: the resume must fall back to step 3 with a warning
    caught = 0
    for i in range(n):
        run = tmp_path / f"ck{i}"
        shutil.copytree(trained[0], run)
        flip_random(checkpoint_paths(run)[0])
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            state = load_latest_checkpoint(run)
        caught += state["step"] == 3 and any("damaged" in str(x.message) for x in w)
    figures["checkpoint"] = caught
    # model folders: from_pretrained refuses with one line
    torch.manual_seed(0)
    VAE(micro_cfg()).save_pretrained(tmp_path / "m")
    for name in ("model.safetensors", "config.json"):
        caught = 0
        for i in range(n):
            d = tmp_path / f"m-{name}-{i}"
            shutil.copytree(tmp_path / "m", d)
            flip_random(d / name)
            try:
                VAE.from_pretrained(d)
            except DamagedError as e:
                caught += "\n" not in str(e)
        figures[name] = caught
    # the prepared cache: the full check finds every flip, prepare repairs it
    root = make_nih(tmp_path / "nih", n=40, px=32)
    ref = cache.prepare(root, 16, out=tmp_path / "c", workers=0, progress=False)
    for name in ("images.u8", "labels.csv"):
        caught = 0
        for i in range(n // 2):
            c = tmp_path / f"c-{name}-{i}"
            shutil.copytree(ref, c)
            flip_random(c / name)
            caught += cache.check_files(c, 16, full=True) is not None
            cache.prepare(root, 16, out=c, workers=0, progress=False, verify=True)
            caught -= cache.check_files(c, 16, full=True) is not None  # repaired
        figures[name] = caught
    total = {k: (v, n // 2 if k in ("images.u8", "labels.csv") else n) for k, v in figures.items()}
    with capsys.disabled():
        print("\nbit flips detected: " + ", ".join(f"{k} {v}/{m}" for k, (v, m) in total.items())
              + f"; all {sum(v for v, _ in total.values())}/{sum(m for _, m in total.values())}")
    assert all(v == m for v, m in total.values()), total


def test_lower_steps_on_a_finished_run_is_refused_and_writes_nothing(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(UserError, match=r"already trained to step 6, more than --steps 4; pass --steps 6"):
        fit(VAETask(new_vae()), ImageSet(), tcfg(steps=4, ckpt_every=3), run)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


STEPS = 120  # long enough that the random kills (0.3-3 s after start-up) land inside the training


@pytest.mark.slow
def test_kill_loop_harness(tmp_path, capsys):
    """kill -9 a training run at random instants (and flip a bit in its newest checkpoint every other
    time), rerun until it finishes: the final model equals an uninterrupted run's, bit for bit."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    rng = random.Random(22)
    run = tmp_path / "run"
    script = ("import sys, warnings, torch; warnings.simplefilter('ignore'); torch.set_num_threads(1)\n"
              "from ipa_core.trainer import fit; from ipa_core.vae_task import VAETask\n"
              "from tests.ipa_core.test_trainer import ImageSet, new_vae, tcfg\n"
              "print('start', flush=True)\n"
              f"fit(VAETask(new_vae()), ImageSet(), tcfg(steps={STEPS}, ckpt_every=4), {str(run)!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    kills, flips, finished = 0, 0, False
    for attempt in range(10):
        p = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        p.stdout.readline()  # imports done
        # kill at a random instant after this attempt wrote a checkpoint (whatever the machine's
        # load: a fixed delay landed every kill before the first checkpoint on a busy machine)
        started, extra, saved_at = time.time(), rng.uniform(0.0, 1.5), None
        while p.poll() is None:
            if saved_at is None and any(c.is_file() and c.stat().st_mtime >= started for c in checkpoint_paths(run)):
                saved_at = time.monotonic()
            if saved_at is not None and time.monotonic() - saved_at >= extra:
                break
            time.sleep(0.01)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            kills += 1
            if kills % 2 == 0 and checkpoint_paths(run):
                flip_bit(checkpoint_paths(run)[0], rng.randrange(checkpoint_paths(run)[0].stat().st_size), rng.randrange(8))
                flips += 1
            continue
        err = p.stderr.read()
        assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
        finished = True
        break
    if not finished:
        subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True)
    ref = fit(VAETask(new_vae()), ImageSet(), tcfg(steps=STEPS, ckpt_every=4), tmp_path / "ref")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fit(VAETask(new_vae()), ImageSet(), tcfg(steps=STEPS, ckpt_every=4), run)  # finished: loads the final state
    same = torch.equal(flat(out), flat(ref))
    with capsys.disabled():
        print(f"\nkill loop: {kills} kills (+{flips} bit flips in the newest checkpoint), final model identical: {same}")
    assert kills >= 2 and flips >= 1, f"the harness killed the run {kills} times ({flips} flips): the training finished before the kills (raise STEPS)"
    assert same
    assert not list((run / "checkpoints").glob(".*.tmp"))


@pytest.mark.parametrize("name", [b"decoder", b"exp_avg_sq", b"consecutive", b"epoch", b"gauss_next", b"lr"])
def test_damaged_name_in_a_checkpoint_without_digest_falls_back(trained, tmp_path, name):
    """An old run (no .sha256 sidecars) whose newest checkpoint has a damaged key name: the resume
    falls back to the previous checkpoint with a one-line warning, never a load_state_dict traceback."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    for p in checkpoint_paths(run):
        sidecar_path(p).unlink()
    latest = checkpoint_paths(run)[0]
    flip_bit(latest, latest.read_bytes().index(name) + 1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fit(VAETask(new_vae()), ImageSet(), tcfg(steps=6, ckpt_every=3), run)
    damaged = [str(x.message) for x in w if "is damaged" in str(x.message)]
    assert len(damaged) == 1 and "ckpt-00000006.pt is damaged" in damaged[0] and "falling back" in damaged[0], damaged
    assert "\n" not in damaged[0]
    assert torch.equal(flat(out), trained[1])  # redone from step 3: the same model as an uninterrupted run
