"""celltune.train layer (see docs/ARCHITECTURE.md)."""
