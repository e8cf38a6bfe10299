"""VD-VAE style hierarchical VAE and the IPA partial encoder (conditional VAE by amortised inference)."""
