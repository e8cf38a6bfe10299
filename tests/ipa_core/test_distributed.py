"""``torchrun --nproc_per_node 2`` on the CPU (gloo): the trainer runs unchanged, the replicas
end with identical weights, rank 0 alone writes, the data are sharded, and a resume (rank 0 reads
the checkpoint and broadcasts it) continues on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ipa_core.distributed import env_world, gather_objects, max_scalar, resolve_device
from xray.errors import UserError

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {repo!r})
    from tests.ipa_core.test_trainer import ImageSet, micro_cfg, tcfg
    from ipa_core import VAE
    from ipa_core.trainer import fit
    from ipa_core.vae_task import VAETask

    class Recording(VAETask):
        def loss(self, model, batch, generator):
            with open(os.path.join({out!r}, f"seen-{{os.environ['RANK']}}.txt"), "a") as f:
                f.write(",".join(str(int(v)) for v in batch[0].flatten(1)[:, 0]) + "\\n")
            return super().loss(model, batch, generator)

    torch.manual_seed(int(os.environ["RANK"]))  # different initial weights: DDP must broadcast rank 0's
    fit(Recording(VAE(micro_cfg())), ImageSet(), tcfg(steps=4, batch_size=4, ckpt_every=2), {run!r})
    # train on: rank 0 reads the step-4 checkpoint and broadcasts it; every rank resumes at step 4
    ema = fit(Recording(VAE(micro_cfg())), ImageSet(), tcfg(steps=6, batch_size=4, ckpt_every=2), {run!r})
    torch.save({{"ema": ema.state_dict(), "cfg": (ema.config.shift, ema.config.scale)}},
               os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
""")


@pytest.mark.slow  # two fresh torch processes: ~25-50 s on 2 shared cores
def test_torchrun_two_cpu_processes(tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT.format(repo=str(REPO), out=str(out), run=str(run)))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--standalone", str(script)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert r0["cfg"] == r1["cfg"]
    for k, v in r0["ema"].items():
        assert torch.equal(v, r1["ema"][k]), k
    # the replicas trained on different images at every step (sharded data)
    seen0 = (out / "seen-0.txt").read_text().splitlines()
    seen1 = (out / "seen-1.txt").read_text().splitlines()
    assert len(seen0) == len(seen1) == 6 and seen0 != seen1
    # rank 0 wrote one run folder
    assert (run / "model" / "config.json").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["ckpt-00000004.pt", "ckpt-00000006.pt"]
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]  # log_every 2, one writer, no duplicate after the resume
    ck = torch.load(run / "checkpoints" / "ckpt-00000006.pt", weights_only=True)
    assert ck["world"] == 2 and len(ck["rng"]) == 2 and ck["provenance"]["world"] == 2
    # the single-process run on the same folder is another run: refused (world size 2 vs 1)
    from ipa_core import VAE
    from ipa_core.trainer import fit
    from ipa_core.vae_task import VAETask
    from tests.ipa_core.test_trainer import ImageSet, micro_cfg, tcfg

    with pytest.raises(UserError, match=r"the number of processes \(torchrun --nproc-per-node\) changed: .* made with 2, this run has 1"):
        fit(VAETask(VAE(micro_cfg())), ImageSet(), tcfg(steps=8, batch_size=4, ckpt_every=2), run)


def test_single_process_helpers(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert env_world() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_world() == (3, 4, 1)
    assert max_scalar(2.5) == 2.5 and gather_objects("a") == ["a"]
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="is not a device"):
        resolve_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")
