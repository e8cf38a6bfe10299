"""Subcommands of the `xray` console script: one module each (HELP, configure, main)."""
