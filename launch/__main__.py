"""``python -m launch local ...``: see launch/local.py."""

import sys

from launch.local import main

if __name__ == "__main__":
    if sys.argv[1:2] != ["local"]:
        sys.exit("usage: python -m launch local --nproc-per-node N -- TRAINER_ARGS")
    sys.exit(main(sys.argv[2:]))
