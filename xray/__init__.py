"""Chest x-ray data: NIH ChestX-ray14 (PNG + CSV), DICOM, a prepared-image cache, and phantoms."""

from .errors import UserError
from .labels import ANY_FINDING, LABELS, NO_FINDING, NUM_LABELS, PATHOLOGIES, Illness, resolve_illness

__all__ = ["UserError", "LABELS", "PATHOLOGIES", "NO_FINDING", "ANY_FINDING", "NUM_LABELS", "Illness", "resolve_illness"]
