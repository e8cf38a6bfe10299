"""Chest x-ray data: NIH ChestX-ray14 (PNG + CSV), DICOM, a prepared-image cache, and phantoms."""

__version__ = "0.1.0"  # the one version of the boed distribution (pyproject.toml says the same; a test checks)

from .errors import UserError
from .labels import ANY_FINDING, LABELS, NO_FINDING, NUM_LABELS, PATHOLOGIES, Illness, resolve_illness

__all__ = ["__version__", "UserError", "LABELS", "PATHOLOGIES", "NO_FINDING", "ANY_FINDING", "NUM_LABELS", "Illness", "resolve_illness"]
