"""Labels are data: one ordered label list, saved with every classifier and dataset.

``PATHOLOGIES`` are the 14 NIH ChestX-ray14 findings in the official spelling. ``LABELS`` is the
15-output vocabulary of every classifier and dataset here: the 14 pathologies, then
``"Any Finding"`` (= not ``"No Finding"``). ``"No Finding"`` is not an output of its own: it is
the complement of ``"Any Finding"`` (see :func:`resolve_illness`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from .errors import UserError

PATHOLOGIES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
    "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)
NO_FINDING = "No Finding"
ANY_FINDING = "Any Finding"
LABELS: tuple[str, ...] = PATHOLOGIES + (ANY_FINDING,)
NUM_LABELS = len(LABELS)  # K = 15


@dataclass(frozen=True)
class Illness:
    """A binary target v read off the 15 classifier outputs.

    ``p(v=1) = probs[..., index]`` or ``1 - probs[..., index]`` when ``negate`` (for "No Finding").
    """

    name: str  # canonical spelling, e.g. "Effusion", "No Finding"
    index: int  # index into LABELS
    negate: bool = False

    @property
    def slug(self) -> str:
        return self.name.lower().replace(" ", "-").replace("_", "-")

    def prob(self, probs):
        """p(v=1) from classifier probabilities ``(..., K)`` -> ``(...)``."""
        p = probs[..., self.index]
        return 1 - p if self.negate else p

    def target(self, labels):
        """Binary target from a label table ``(..., K)`` -> ``(...)``."""
        v = labels[..., self.index]
        return 1 - v if self.negate else v


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


_ILLNESSES = {_key(n): Illness(n, i) for i, n in enumerate(LABELS)}
_ILLNESSES[_key(NO_FINDING)] = Illness(NO_FINDING, LABELS.index(ANY_FINDING), negate=True)
_ILLNESSES[_key("Infiltrate")] = _ILLNESSES[_key("Infiltration")]

ILLNESS_NAMES: tuple[str, ...] = PATHOLOGIES + (ANY_FINDING, NO_FINDING)


def resolve_illness(name: str) -> Illness:
    """Case-, space- and underscore-insensitive illness lookup ("effusion", "No finding", ...)."""
    ill = _ILLNESSES.get(_key(name))
    if ill is None:
        valid = ", ".join(n.lower() for n in ILLNESS_NAMES)
        close = difflib.get_close_matches(_key(name), list(_ILLNESSES), n=1, cutoff=0.6)
        hint = f"did you mean {_ILLNESSES[close[0]].name.lower()!r}? " if close else ""
        raise UserError(f"unknown illness {name!r}; {hint}valid names: {valid}")
    return ill
