"""`batchpipe emulator`: serve the local Message Batches API emulator (filled in by the emulator work)."""
