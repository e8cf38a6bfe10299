"""python -m boed"""

from .cli import main

main()
