"""``python -m flora_lightning.bench``: the same as ``flora bench``."""

import sys

from flora_lightning.bench.run import main

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, RuntimeError) as err:
        print(f"flora bench: error: {err}", file=sys.stderr)
        sys.exit(2)
