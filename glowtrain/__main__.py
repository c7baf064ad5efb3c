"""`python -m glowtrain` runs the CLI (and is what torchrun launches)."""

from glowtrain.cli import main

if __name__ == "__main__":
    main()
