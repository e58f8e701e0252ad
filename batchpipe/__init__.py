"""batchpipe: push large datasets through Anthropic's Message Batches API and join the answers back."""

__version__ = "0.1.0"
