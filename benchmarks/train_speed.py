"""Training / evaluation speed benchmark (same as ``python -m anchor_lib bench``).

    python benchmarks/train_speed.py [--out FILE] [--tiny]

Writes DESIGN §6 JSON to ``data/results/bench/<device>.json``; see ``anchor_lib/bench.py``.
"""

import sys

from anchor_lib.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
