"""``python -m celltune`` (also what ``torchrun -m celltune`` runs)."""

from celltune.cli.main import main

if __name__ == "__main__":
    main()
