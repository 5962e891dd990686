"""celltune.losses layer (see docs/ARCHITECTURE.md)."""
