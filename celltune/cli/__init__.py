"""Command-line interface (``celltune`` / ``python -m celltune``)."""
