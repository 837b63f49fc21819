"""`python -m lemonslice` runs the CLI."""

from .cli import main

main()
