"""The paper's baseline scan policies (Random, Uncond, non-greedy Uncond, full image) and the
retrieval completer, subclasses of :class:`boed.policies.Policy` and samplers of the
:mod:`boed.samplers` protocol. The GDFS peer lives beside the distilled policy in
:mod:`boed.amortised.gdfs`."""
