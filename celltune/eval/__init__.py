"""celltune.eval layer (see docs/ARCHITECTURE.md)."""
