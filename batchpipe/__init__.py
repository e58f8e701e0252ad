"""batchpipe: push datasets through the Message Batches API and join the answers back."""

__version__ = "0.1.0"
