"""`ipa_core`: train the hierarchical VAE and the IPA partial encoder, sample completions."""

from xray.cli_base import make_main

main = make_main("ipa_core", __doc__, {
    "train": "ipa_core.commands.train",
    "sample": "ipa_core.commands.sample",
})


if __name__ == "__main__":  # python -m ipa_core.cli (e.g. under torchrun)
    main()
