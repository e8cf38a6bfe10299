"""Bayesian optimal experimental design for chest x-ray scanning (EIG with IPA completions)."""
