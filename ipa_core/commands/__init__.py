"""Subcommands of the `ipa_core` console script: one module each (HELP, configure, main)."""
