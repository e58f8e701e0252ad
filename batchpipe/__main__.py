"""`python -m batchpipe` runs the CLI."""

from batchpipe.cli import main

main()
