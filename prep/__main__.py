"""`python -m prep` runs the CLI (also under `torchrun -m prep train ...`)."""

from prep.cli import main

if __name__ == "__main__":
    main()
