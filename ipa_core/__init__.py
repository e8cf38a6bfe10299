"""VD-VAE style hierarchical VAE and the IPA partial encoder (conditional VAE by amortised inference)."""

from .config import CONFIGS, VAEConfig, get_config
from .ipa import IPA, IPAConfig
from .sampling import sample_completions
from .vae import VAE

__all__ = ["VAE", "VAEConfig", "CONFIGS", "get_config", "IPA", "IPAConfig", "sample_completions"]
