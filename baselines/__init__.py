"""Baseline scan policies and completion samplers, behind the interfaces `boed` uses."""
