"""Batched completions: shapes, pasting, temperature, batching order, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ipa_core.dmol import to_uint8
from ipa_core.ipa import IPA
from ipa_core.sampling import completion_figure, sample_completions, save_png
from ipa_core.vae import Block, c1_share, split_cat_block
from tests.ipa_core.test_ipa import half_mask, images, micro_vae
from xray.errors import UserError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ipa() -> IPA:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return IPA.from_vae(micro_vae(), warm_start=False).eval()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_paste_and_reproducibility(ipa):
    x, m = images(3), half_mask(3)
    s = sample_completions(ipa, x, m, 5, generator=gen())
    assert s.shape == (3, 5, 1, 16, 16) and s.dtype == torch.uint8
    keep = m.bool()[:, None].expand_as(s)
    assert torch.equal(s[keep], x[:, None].expand_as(s)[keep])  # observed pixels pasted back
    assert not torch.equal(s[:, 0], s[:, 1])  # samples differ
    assert torch.equal(s, sample_completions(ipa, x, m, 5, generator=gen()))
    raw = sample_completions(ipa, x, m, 5, generator=gen(), paste=False)
    assert not torch.equal(raw[keep], x[:, None].expand_as(s)[keep])
    assert torch.equal(raw[~keep], s[~keep])  # same noise: only the observed pixels differ


def test_empty_and_full_masks(ipa):
    x = images(2)
    prior_like = sample_completions(ipa, x, torch.zeros(2, 1, 16, 16), 3, generator=gen())
    assert prior_like.shape == (2, 3, 1, 16, 16)
    full = sample_completions(ipa, x, torch.ones(2, 1, 16, 16), 3, generator=gen())
    assert torch.equal(full, x[:, None].expand(2, 3, 1, 16, 16))
    # with nothing observed the image is ignored: two different images give the same samples
    other = sample_completions(ipa, images(2, seed=9), torch.zeros(2, 1, 16, 16), 3, generator=gen())
    assert torch.equal(prior_like, other)


def test_temperature_changes_samples(ipa):
    x, m = images(2), half_mask(2)
    cold = sample_completions(ipa, x, m, 8, t=0.1, generator=gen(), paste=False)
    warm = sample_completions(ipa, x, m, 8, t=1.0, generator=gen(), paste=False)
    hot = sample_completions(ipa, x, m, 8, t=3.0, generator=gen(), paste=False)
    assert not torch.equal(cold, warm)
    # per-layer list with equal entries = the float
    n_layers = len(ipa.decoder.dec_blocks)
    assert torch.equal(warm, sample_completions(ipa, x, m, 8, t=[1.0] * n_layers, generator=gen(), paste=False))
    # the latent spread grows with t: look at decoder outputs without the pixel noise
    spread = []
    for t in (0.0, 1.0, 3.0):
        with torch.no_grad():
            inp, _ = ipa.preprocess(x[:1].expand(16, -1, -1, -1))
            pacts = ipa.partial_acts(inp, m[:1].expand(16, -1, -1, -1))
            h, _ = ipa.decoder.run(16, ipa.partial_step(pacts, t, gen()))
            spread.append(float(ipa.decoder.out_net.mean(h).std(dim=0).mean()))
    assert spread[0] < 1e-6 < spread[1] < spread[2], spread
    assert not torch.equal(warm, hot)


def test_batched_equals_one_image_at_a_time(ipa, monkeypatch):
    """With t = 0 and the pixel noise replaced by the mixture mean, samples are deterministic:
    image b's completions must not depend on the other images of the batch."""
    net = ipa.decoder.out_net
    monkeypatch.setattr(net, "sample", lambda h, generator=None: to_uint8(net.mean(h)))
    x, m = images(3), torch.stack([half_mask(1)[0], torch.zeros(1, 16, 16), torch.ones(1, 16, 16)])
    m[2, 0, 4:8, 4:8] = 0
    batched = sample_completions(ipa, x, m, 4, t=0.0, paste=False)
    chunked = sample_completions(ipa, x, m, 4, t=0.0, paste=False, max_batch=3)  # chunks cut across images
    torch.testing.assert_close(chunked.float(), batched.float(), atol=1, rtol=0)
    for b in range(3):
        alone = sample_completions(ipa, x[b:b + 1], m[b:b + 1], 4, t=0.0, paste=False)
        torch.testing.assert_close(batched[b].float(), alone[0].float(), atol=1, rtol=0)  # float rounding across batch sizes only
    assert not torch.equal(batched[0], batched[1])


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_split_cat_block_is_the_block_on_the_concatenation(fmt):
    """c1's share of the acts half computed once per image (broadcast to the samples' rows) plus
    its share of the state gives the block's output on cat(state, acts) up to float rounding."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        block = Block(16, 4, 6)
    acts = torch.randn(2, 8, 8, 8).contiguous(memory_format=fmt)  # 2 images
    rows = torch.arange(6) // 3  # (6,): 3 samples per image
    x = torch.randn(6, 8, 8, 8, generator=gen(1)).contiguous(memory_format=fmt)
    with torch.no_grad():
        out = split_cat_block(block, x, c1_share(block, acts)[rows])
        torch.testing.assert_close(out, block(torch.cat([x, acts[rows]], dim=1)), rtol=1e-5, atol=1e-6)


def test_fast_path_is_the_plain_top_down_pass(ipa):
    """sample_completions' CPU path (NHWC maps, the partial activations' share of every part_enc's
    first conv once per image, latents drawn on NCHW copies) computes the plain pass: from the same
    noise the same final maps up to float rounding, and the same samples but for rare rounding flips."""
    x, m = images(3), half_mask(3)
    m[1, 0, :, :3] = 1
    n, rows = 4, torch.arange(12) // 4  # (B*N,) image of each row
    with torch.inference_mode():
        inp, _ = ipa.preprocess(x)
        plain = {r: a[rows] for r, a in ipa.partial_acts(inp, m).items()}
        g0, g1 = gen(3), gen(3)
        h0, _ = ipa.decoder.run(12, ipa.partial_step(plain, 0.8, g0))
        fast = ipa.partial_acts(inp, m, torch.channels_last)
        shares = [c1_share(block.part_enc, fast[block.base])[rows] for block in ipa.decoder.dec_blocks]
        h1, _ = ipa.decoder.run(12, ipa.partial_step({}, 0.8, g1, shares=shares), memory_format=torch.channels_last)
        s0 = ipa.decoder.out_net.sample(h0, g0).reshape(3, n, 1, 16, 16)
    assert h1.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-5)
    s1 = sample_completions(ipa, x, m, n, t=0.8, generator=gen(3), paste=False)
    assert (s1 != s0).float().mean() < 1e-3


def test_bad_input(ipa):
    x, m = images(2), half_mask(2)
    with pytest.raises(UserError, match="resize"):
        sample_completions(ipa, images(2, S=32), torch.ones(2, 1, 32, 32), 2)
    with pytest.raises(UserError, match="mask of shape"):
        sample_completions(ipa, x, m[:1], 2)
    with pytest.raises(UserError, match="per-layer"):
        sample_completions(ipa, x, m, 2, t=[1.0, 1.0])
    with pytest.raises(UserError, match=">= 0"):
        sample_completions(ipa, x, m, 2, t=-1.0)
    with pytest.raises(UserError, match=">= 1"):
        sample_completions(ipa, x, m, 0)
    with pytest.raises(UserError, match="max_batch"):
        sample_completions(ipa, x, m, 2, max_batch=0)
    with pytest.raises(UserError, match="IPA model"):
        sample_completions(micro_vae(), x, m, 2)


def test_completion_figure(ipa, tmp_path):
    x, m = images(2), half_mask(2)
    s = sample_completions(ipa, x, m, 3, generator=gen())
    fig = completion_figure(x, m, s, pad=2)
    assert fig.shape == (2 * 18 + 2, 7 * 18 + 2, 3) and fig.dtype.name == "uint8"
    assert (fig[2:18, 2:18, 0] == x[0, 0].numpy()).all()  # ground truth panel first
    assert (fig[2:18, 2 + 2 * 18:18 + 2 * 18, 0] == s[0, 0, 0].numpy()).all()  # then the masked input, then samples
    from PIL import Image
    out = save_png(fig, tmp_path / "f.png")
    assert Image.open(out).size[1] >= 256


def test_grid_png_has_column_titles_above_the_panels(tmp_path):
    from PIL import Image

    from ipa_core.sampling import TITLE_BAND, completion_titles, save_png

    assert completion_titles(2) == ["truth", "observed", "completion 1", "completion 2", "mean", "variance"]
    assert completion_titles(9)[2:4] == ["1", "2"]
    S, pad, cols = 16, 2, 6
    img = np.full((S + 2 * pad, cols * (S + pad) + pad, 3), 128, np.uint8)
    plain = np.asarray(Image.open(save_png(img, tmp_path / "a.png", min_size=64)))
    titled = np.asarray(Image.open(save_png(img, tmp_path / "b.png", min_size=64, titles=completion_titles(2), cell=S)))
    assert titled.shape[0] == plain.shape[0] + TITLE_BAND and (titled[TITLE_BAND:] == plain).all()
    band = titled[:TITLE_BAND]  # (TITLE_BAND, W, 3)
    k = plain.shape[0] // img.shape[0]
    for c in range(cols):  # ink above every column
        left, right = k * (pad + c * (S + pad)), k * (pad + c * (S + pad) + S)
        assert (band[:, left:right] < 128).any(), c
