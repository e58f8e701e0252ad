"""`python -m batchpipe` runs the CLI, as the `batchpipe` command does (``batchpipe.entry``)."""

from batchpipe.entry import main

main()
