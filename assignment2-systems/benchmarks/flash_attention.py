"""FlashAttention-2 benchmark script: the same as `cs336-systems bench-attention` (see --help).

    PYTHONPATH=assignment1-basics:assignment2-systems python3 assignment2-systems/benchmarks/flash_attention.py --quick
"""

import sys

from cs336_systems.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench-attention", *sys.argv[1:]]))
