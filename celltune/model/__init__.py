"""celltune.model layer (see docs/ARCHITECTURE.md)."""
