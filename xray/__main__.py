"""python -m xray"""

from .cli import main

main()
