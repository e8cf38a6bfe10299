"""One image, T scans: the loop shared by ``boed run`` (greedy EIG/EPE) and ``boed run --policy``
(an amortised policy).

The loop reads top to bottom: the classifier's belief with nothing observed, then per scan a
``decide(t, state)`` that returns a :class:`Decision`, the scan of the true image at the chosen
location, the new belief, one printed line, the step's figure and its record. What differs between
the two commands (how a location is chosen, what a step records and draws) lives in ``decide``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from boed.geometry import ScanGeometry
from boed.heatmaps import plot_summary
from boed.policies import ScanState, scan_start
from xray.errors import UserError
from xray.labels import Illness


@dataclass
class Decision:
    """One scan's choice and what the command records and draws about it.

    ``fields``: extra keys of the step's record (e.g. ``eig``, ``pi``); ``text``: printed between
    the location and the belief; ``after``: printed after the belief; ``value``: the step's bar in
    the summary figure; ``plot(path, state, new)``: the step's figure (None: no figure);
    ``seconds``: the decision's own time, if the command reports that rather than the whole step's.
    """

    location: int
    fields: dict = field(default_factory=dict)
    text: str = ""
    after: str = ""
    value: float = float("nan")
    plot: Callable[[Path, ScanState, ScanState], None] | None = None
    seconds: float | None = None


@dataclass
class ScanResult:
    probs: list[float]  # the illness probability before any scan, then after each
    steps: list[dict]  # one record per scan
    state: ScanState  # after the last scan
    target: float | None  # the image's label, None when unknown


def scan_image(x: torch.Tensor, labels, classifier, illness: Illness, geometry: ScanGeometry, scans: int,
               decide: Callable[[int, ScanState], Decision], out: Path | None, device, source: str = "",
               detail: str = "", models: str = "the model files") -> ScanResult:
    """Scan ``x`` (uint8 (1, C, S, S)) ``scans`` times with the choices of ``decide``; figures go to
    ``out`` (``step_t.png`` per scan, ``summary.png``), none when ``out`` is None. Prints
    "ILLNESS on SOURCE (label): DETAIL", the belief before any scan, then a line per scan. A
    non-finite belief stops the loop with one line naming ``models`` (nothing more is saved)."""
    C, S = x.shape[1], x.shape[-1]
    prob, state, target = scan_start(classifier, illness, labels, C, S, device)
    probs, steps, values = [prob(state)], [], []
    truth = "" if target is None else f" (label: {int(target)})"
    print(f"{illness.name} on {source}{truth}: {detail}")
    print(f"t=0  p({illness.name}) = {probs[0]:.3f} with nothing observed")
    for t in range(1, scans + 1):
        if not math.isfinite(probs[-1]):
            raise UserError(f"scan {t}: the classifier gives a non-finite probability (p = {probs[-1]}); {models} "
                            "are damaged or diverged; nothing more is saved")
        t0 = time.perf_counter()
        d = decide(t, state)
        new = state.scan(x, torch.tensor([d.location]), geometry)
        probs.append(prob(new))
        row, col = divmod(d.location, geometry.grid)
        top, left, bottom, right = geometry.box(d.location)
        steps.append(dict(t=t, location=d.location, row=row, col=col, box=[top, left, bottom, right], **d.fields,
                          prob=probs[-1], seconds=time.perf_counter() - t0 if d.seconds is None else d.seconds))
        print(f"t={t}  location {d.location:3d} (row {row:2d}, col {col:2d})  {d.text}  p({illness.name}) = {probs[-1]:.3f}"
              + d.after)
        if out is not None and d.plot is not None:
            d.plot(out / f"step_{t}.png", state, new)
        values.append(d.value)
        state = new
    if out is not None:
        plot_summary(out / "summary.png", geometry, x[0], state.x_obs[0], state.mask[0], state.locations[0], probs,
                     values, illness.name, target)
    return ScanResult(probs, steps, state, target)
