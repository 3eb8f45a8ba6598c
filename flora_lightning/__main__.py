"""Entry point: ``flora`` / ``python -m flora_lightning``."""

from flora_lightning.cli import main

if __name__ == "__main__":
    main()
