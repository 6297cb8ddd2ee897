"""``python -m cheff`` runs the ``cheff`` command; ``torchrun -m cheff train ...`` needs it."""

from cli.cheff_cli import main

if __name__ == "__main__":
    main()
