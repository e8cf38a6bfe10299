"""`xray`: download the NIH release, prepare caches, generate phantoms, inspect NIH-format folders."""

from .cli_base import make_main

main = make_main("xray", __doc__, {
    "download": "xray.commands.download",
    "prepare": "xray.commands.prepare",
    "phantom": "xray.commands.phantom",
    "info": "xray.commands.info",
})


if __name__ == "__main__":  # python -m xray.cli (e.g. under torchrun)
    main()
