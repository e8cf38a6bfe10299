"""IPATask through the real trainer: only psi moves, checkpoints/figures/eval written, model reloads."""

from __future__ import annotations

import json

import pytest
import torch

from ipa_core.ipa import IPA
from ipa_core.ipa_task import IPA_TRAIN_DEFAULTS, IPATask, fixed_sample_masks
from ipa_core.trainer import TrainConfig, fit
from ipa_core.masks import MaskMixture
from tests.ipa_core.test_ipa import images, micro_vae
from xray.errors import UserError

torch.set_num_threads(1)


class Bank(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        self.x, self.y = images(n, seed), torch.zeros(n, 15)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("objective", ["forward", "reverse"])
def test_fit_trains_only_psi(tmp_path, objective):
    vae = micro_vae()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = IPA.from_vae(vae, objective=objective)
    task = IPATask(model, masks=MaskMixture(p_freeform=0.5), sample_n=2, eval_max_images=4, eval_batch_size=4)
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-3, warmup=1, ema_rate=0.5, log_every=2, sample_every=2, ckpt_every=2, device="cpu")
    out = fit(task, Bank(12, 1), cfg, tmp_path, test_set=Bank(4, 2))
    out_sd, model_sd = out.state_dict(), model.state_dict()
    for k, v in vae.state_dict().items():
        assert torch.equal(out_sd[k], v), k  # theta, phi bit-identical (EMA included)
        assert torch.equal(model_sd[k], v), k
    assert any(not torch.equal(a, b) for (n, a), b in zip(model.named_parameters(), IPA.from_vae(vae).parameters())
               if IPA.is_partial_name(n))
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert {"kl_0-20%", "kl_80-100%", "kl_patches", "kl_mean_bins"} <= set(ev)
    assert ev["kl_0-20%"] > ev["kl_80-100%"] >= 0  # less observed, further from q
    back = IPA.from_pretrained(tmp_path)
    assert back.config.objective == objective
    back_sd = back.state_dict()
    for k, v in out_sd.items():
        assert torch.equal(back_sd[k], v)


def test_task_pieces():
    assert IPA_TRAIN_DEFAULTS["xray256"].batch_size == 8 and IPA_TRAIN_DEFAULTS["xray256"].lr == 1.5e-4
    m = fixed_sample_masks(4, 16)
    assert m.shape == (4, 1, 16, 16) and torch.equal(m, fixed_sample_masks(4, 16))
    with pytest.raises(UserError, match="IPA model"):
        IPATask(micro_vae())


def test_provenance_names_the_frozen_vae():
    vae = micro_vae()
    task = IPATask(IPA.from_vae(vae))
    prov = task.provenance()
    assert prov["objective"] == "forward" and prov["model"]["objective"] == "forward"
    assert prov["masks"]["p_freeform"] == task.masks.p_freeform
    with torch.no_grad():  # training psi does not change the VAE digest
        for p in task.model.partial_parameters():
            p.add_(1.0)
    assert task.provenance()["vae"] == prov["vae"]
    with torch.no_grad():  # another VAE (one weight trained on) does
        next(iter(vae.parameters())).add_(1e-3)
    assert IPATask(IPA.from_vae(vae)).provenance()["vae"] != prov["vae"]
    assert IPATask(IPA.from_vae(micro_vae(), objective="reverse")).provenance()["objective"] == "reverse"


def test_evaluate_scores_every_mask_set_on_one_frozen_pass():
    """The frozen VAE's half of O_for runs once per batch; the numbers are those of one full
    ``forward_kl`` per mask set with the noise restarted per set (the definition)."""
    import numpy as np

    from ipa_core.ipa_task import OBSERVED_BINS, bin_name, freeform_masks, random_patch_masks

    torch.manual_seed(0)
    model = IPA.from_vae(micro_vae()).eval()
    for p in model.partial_parameters():  # psi away from the warm start: c differs from q
        p.data.add_(0.01 * torch.randn_like(p))
    task = IPATask(model, eval_max_images=5, eval_batch_size=2)
    data = Bank(7, 3)
    res = task.evaluate(model, data)
    n, S = 5, model.config.image_size
    mask_g = torch.Generator().manual_seed(0)
    sets = {f"kl_{bin_name(b)}": freeform_masks(n, S, mask_g, observed_range=b) for b in OBSERVED_BINS}
    sets["kl_patches"] = random_patch_masks(n, S, task.masks.patch_frac, task.masks.max_patches, 0, mask_g)
    with torch.no_grad():
        for name, masks in sets.items():
            g = torch.Generator().manual_seed(0)
            total = sum(float(model.forward_kl(data.x[i:i + 2][: n - i], masks[i:min(i + 2, n)], g).sum()) for i in range(0, n, 2))
            assert res[name] == pytest.approx(total / n, rel=1e-6, abs=1e-9), name
    assert res["n_images"] == n and res["kl_mean_bins"] == pytest.approx(np.mean([res[f"kl_{bin_name(b)}"] for b in OBSERVED_BINS]))
