"""Difficulty knobs of the phantom generator and the named presets (``xray phantom --difficulty``).

The default phantom is an easy test bed: patients are positioned alike, findings are fairly
conspicuous, nothing else in the chest looks like a finding and the films are clean. A classifier
can score well on it and still fail on real ChestX-ray14 films (issue 24: the default set did not
show a 0.24 AUROC drop that a harder set did). The knobs below make each of those differences
explicit; every one is a multiplier or a probability whose *neutral* value gives the default
phantom byte for byte (the published results are computed on it).

Knobs (all per film unless said otherwise):

- ``position``: multiplies the spread (std) of the lung box centre (x and y) and widens its clip range.
- ``scale``: multiplies the spread of the lung box size (patient size, film-to-patient distance).
- ``rotation``: multiplies the spread of the patient's in-plane rotation.
- ``inspiration``: multiplies the spread of inspiration depth (lung height, apex fixed), and
  ``shallow`` lowers its mean (a shallower breath: higher domes, as on supine portable films).
- ``finding_size``: multiplies the size of focal findings (blobs, nodules, masses, atelectasis)
  and the height of pleural effusions.
- ``contrast``: multiplies how much each finding changes the film (opacity, lucency, heart
  enlargement): < 1 gives more subtle findings.
- ``bilateral``: probability that an effusion is on both sides (else one side, uniformly): the
  lower, the more often the finding is on one side only (laterality matters for where to scan).
- ``distractors``: mean number (Poisson) of look-alike normal variants per film, drawn on every
  film whatever its labels: a smooth basal density at one lung base (subpulmonic fat, a raised
  hemidiaphragm or a breast shadow; looks like a small effusion but has a dome, not a meniscus),
  a small round density (nipple shadow or bone island; looks like a nodule) and a thin linear scar
  (looks like plate atelectasis). They carry no label and no box.
- ``noise``: multiplies the film's quantum noise (std) and the spread of its exposure.

Presets (:data:`PRESETS`), justified by what real films show. The numbers come from the files the
generator already uses: the 435 real lung masks (v7labs, as shipped by torchxrayvision) and the
984 real NIH boxes (``BBox_List_2017``):

- ``default``: today's phantom (every knob neutral). Lung box centre std 0.02-0.03 (x) and
  0.025-0.035 (y), size std 6-8 %: tighter than the real masks.
- ``realistic``: the pose spread of the real lung masks, whose boxes have centre std 0.031 (x)
  and 0.058 (y), width std 0.097 on a mean of 0.83 (12 %) and lowest-lung-row std 0.099 of the
  image: ``position`` 1.6 (y std ~0.05), ``scale`` 1.6 (~11 %), ``rotation`` 1.5, ``inspiration``
  1.5. Findings keep their real box sizes; real reports call many findings "subtle", and
  the NIH labels are mined from reports with ~10 % label noise, so ``contrast`` 0.8. Real films
  carry overlapping normal structures that mimic findings on a fair share of films
  (``distractors`` 0.3) and more grain than the default (``noise`` 1.5).
- ``hard``: beyond the real spread in every direction at once, a stress test of the classifier
  and of the policies' adaptivity: ``position`` 2.2, ``scale`` 2, ``rotation`` 2, ``inspiration``
  2 with mean 0.04 shallower (portable AP films), ``finding_size`` 0.75 (the real effusion boxes
  range over 0.11-0.39 of the image (10-90 %), the smaller end), ``contrast`` 0.6, unilateral
  effusions mostly (``bilateral`` 0.15; the real effusion boxes are left/right 51/49 %),
  ``distractors`` 0.8 and ``noise`` 2.5.

The presets are test beds, fixed from these real statistics; they were not tuned to any policy's
or classifier's result. Measured afterwards (``benchmarks/results/classifier.md``, tiny AVP-CNN,
cpu budget, 64 px): full-image AUROC (mean of Effusion and Edema) about 0.93-0.98 on ``default``,
0.82-0.94 on ``realistic`` (where dropping the fully observed training images costs ~0.05, the
issue-24 regression) and 0.65-0.76 on ``hard`` (Effusion barely above chance: a stress test).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class Difficulty:
    """The phantom's difficulty knobs (see the module docstring); the defaults give the default phantom."""

    name: str = "default"
    position: float = 1.0
    scale: float = 1.0
    rotation: float = 1.0
    inspiration: float = 1.0
    shallow: float = 0.0
    finding_size: float = 1.0
    contrast: float = 1.0
    bilateral: float = 0.35
    distractors: float = 0.0
    noise: float = 1.0

    def __post_init__(self):
        for f in ("position", "scale", "rotation", "inspiration", "finding_size", "noise"):
            v = getattr(self, f)
            if not 0 <= v <= 5:
                raise UserError(f"phantom difficulty {f} is {v}; expected a multiplier in [0, 5] (1 = the default phantom)")
        if not 0 < self.contrast <= 2:
            raise UserError(f"phantom difficulty contrast is {self.contrast}; expected a multiplier in (0, 2] (1 = default)")
        if not 0 <= self.shallow <= 0.2:
            raise UserError(f"phantom difficulty shallow is {self.shallow}; expected 0..0.2 (lung-height fraction)")
        if not 0 <= self.bilateral <= 1:
            raise UserError(f"phantom difficulty bilateral is {self.bilateral}; expected a probability in [0, 1]")
        if not 0 <= self.distractors <= 10:
            raise UserError(f"phantom difficulty distractors is {self.distractors}; expected a mean count in [0, 10]")

    @property
    def is_default(self) -> bool:
        """True when every knob is neutral (the images are the default phantom's)."""
        return dataclasses.replace(self, name="default") == DEFAULT

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DEFAULT = Difficulty()

#: Named presets of ``xray phantom --difficulty`` (see the module docstring for the reasons).
PRESETS: dict[str, Difficulty] = {
    "default": DEFAULT,
    "realistic": Difficulty("realistic", position=1.6, scale=1.6, rotation=1.5, inspiration=1.5, contrast=0.8,
                            distractors=0.3, noise=1.5),
    "hard": Difficulty("hard", position=2.2, scale=2.0, rotation=2.0, inspiration=2.0, shallow=0.04, finding_size=0.75,
                       contrast=0.6, bilateral=0.15, distractors=0.8, noise=2.5),
}
DEFAULT_DIFFICULTY = "default"


def resolve_difficulty(spec: "str | Difficulty | None") -> Difficulty:
    """A preset name (``default``, ``realistic``, ``hard``) or a :class:`Difficulty` -> a Difficulty."""
    if spec is None:
        return DEFAULT
    if isinstance(spec, Difficulty):
        return spec
    if isinstance(spec, str) and spec in PRESETS:
        return PRESETS[spec]
    raise UserError(f"phantom difficulty is {spec!r}; expected one of {', '.join(PRESETS)} (or a Difficulty)")
