"""python -m ipa_core"""

from .cli import main

main()
