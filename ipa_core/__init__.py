"""VD-VAE style hierarchical VAE and the IPA partial encoder (conditional VAE by amortised inference).

The public API::

    from ipa_core import IPA, VAE, get_config, sample_completions

- :class:`VAE` / :class:`VAEConfig`, :data:`CONFIGS`, :func:`get_config` ("tiny", "ffhq256", ...):
  the unconditional hierarchical VAE (``VAE.from_official(path, "ffhq256")`` loads official
  VD-VAE checkpoints).
- :class:`IPA` / :class:`IPAConfig`: the VAE plus the partial encoder; ``IPA.from_pretrained(dir)``
  loads a trained one (a run folder or its ``model/``), ``save_pretrained(dir)`` writes one.
- :func:`sample_completions` ``(model, x_obs_u8, mask, n, ...) -> uint8 (B, N, C, S, S)``.
"""

from xray import __version__

from .config import CONFIGS, VAEConfig, get_config
from .ipa import IPA, IPAConfig
from .sampling import sample_completions
from .vae import VAE

__all__ = ["__version__", "VAE", "VAEConfig", "CONFIGS", "get_config", "IPA", "IPAConfig", "sample_completions"]
