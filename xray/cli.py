"""`xray`: prepare caches, generate phantoms, inspect NIH-format folders."""

from .cli_base import make_main

main = make_main("xray", __doc__, {
    "prepare": "xray.commands.prepare",
    "phantom": "xray.commands.phantom",
    "info": "xray.commands.info",
})
