"""Amortised scan policies: one network forward per decision instead of N completions and L x N
classifier passes.

- the distilled EIG policy: greedy EIG-IPA's EIG maps on training images (:mod:`.teacher`)
  distilled into pi(l | cat(x * m, m)) with KL(softmax(EIG / tau) || pi) (:mod:`.distill`);
- the GDFS peer (Covert et al. 2023), trained in :mod:`.gdfs`, saved as the same network.

Both load with :func:`load_policy` (checked against the caller's illness and geometry) into an
:class:`AmortisedPolicy` (``name``, ``observes_everything = False``, ``next_locations``).
"""

from .network import (ARCHS, METHODS, POLICY_NAMES, AmortisedPolicy, PolicyConfig, PolicyNet, load_policy,
                      masked_logits)

__all__ = ["ARCHS", "METHODS", "POLICY_NAMES", "AmortisedPolicy", "PolicyConfig", "PolicyNet", "load_policy",
           "masked_logits"]
