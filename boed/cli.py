"""`boed`: choose where to scan by expected information gain; train the AVP-CNN; evaluate; demo."""

from xray.cli_base import make_main

main = make_main("boed", __doc__, {
    "run": "boed.commands.run",
    "train-avp": "boed.commands.train_avp",
    "train-policy": "boed.commands.train_policy",
    "evaluate": "boed.commands.evaluate",
    "demo": "boed.commands.demo",
    "study": "boed.commands.study",
})


if __name__ == "__main__":  # python -m boed.cli (e.g. under torchrun)
    main()
