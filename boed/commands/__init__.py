"""Subcommands of the `boed` console script: one module each (HELP, configure, main)."""
