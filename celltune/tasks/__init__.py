"""celltune.tasks layer (see docs/ARCHITECTURE.md)."""
